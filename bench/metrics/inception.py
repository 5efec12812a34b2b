"""Standard Inception metrics (FID, KID, IS, precision/recall), computed by torch-fidelity.

Features are torch-fidelity's "inception-v3-compat" (the network published FIDs use); grayscale images are
repeated to 3 channels and torch-fidelity resizes them to 299×299. The weights come from a file given
explicitly (`--inception-weights`), from $BENCH_INCEPTION_WEIGHTS, or from torch-fidelity's own download
cache; they are never downloaded here. Without weights every Inception record says it is unavailable:
no number from another extractor is ever reported under these names.

`fid_inception` follows the DPDM protocol (its Table 1 FIDs): nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3
utils/util.py `compute_fid` with the statistics of precompute_data_mnist_fid_statistics.py. There: the
TF Inception 2015-12-05 pool features (StyleGAN3's `inception-2015-12-05.pkl`, grayscale repeated to 3
channels) of the generated uint8 images, against the statistics of the whole TRAINING set, Fréchet
distance. The paper's tables use 60,000 samples (its training-time FID uses 5,000). Deviations: features
from torch-fidelity's port of the same TF graph (`inception-v3-compat`), not StyleGAN3's; labels balanced,
not uniform at random; uint8 as the method quantises (the reference truncates x·255).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from functools import lru_cache
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.metrics.features import fingerprint
from bench.metrics.fidelity import fidelity_records, fidelity_scores

EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name
ENV_WEIGHTS = "BENCH_INCEPTION_WEIGHTS"
METRICS = ("fid", "kid", "isc", "prc")
RECORD_NAMES = {
    "fid": ("fid_inception",),
    "kid": ("kid_inception",),
    "isc": ("is_inception",),
    "prc": ("precision_inception", "recall_inception"),
}
UNAVAILABLE = "unavailable: no Inception weights (pass --inception-weights)"
FID_PROTOCOL = "dpdm"
FID_REFERENCE = "nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:utils/util.py"
FID_SAMPLES = {"mnist": 60_000, "fmnist": 60_000}  # the papers' sample counts, per dataset we know them for
FID_DEVIATIONS = (
    "features from torch-fidelity's inception-v3-compat (a port of the TF 2015-12-05 graph); reference: "
    "StyleGAN3's inception-2015-12-05.pkl, a port of the same graph",
    "labels balanced (index mod classes); reference: uniform random labels",
    "uint8 as the method quantises it; reference: truncation of x·255",
)


def fid_protocol_fields(dataset: str, n: int) -> dict[str, Any]:
    """What fid_inception records say about their protocol: name, code, deviations, shortening."""
    wanted = FID_SAMPLES.get(dataset)
    return {
        "protocol": FID_PROTOCOL,
        "reference_code": FID_REFERENCE,
        "deviations": list(FID_DEVIATIONS),
        "shortened": {"n_gen": [wanted, n]} if wanted and n < wanted else {},
    }


def hub_weights_path() -> Path:
    """Where torch-fidelity's FeatureExtractorInceptionV3 downloads its weights to (torch.hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(tf_inception.URL_INCEPTION_V3)


def resolve_inception_weights(path: str | os.PathLike[str] | None) -> Path | None:
    """The Inception weights file: `path`, else $BENCH_INCEPTION_WEIGHTS, else torch-fidelity's cached download.

    None when there is none. An explicitly given file that does not exist is a BenchError.
    """
    for given, source in ((path, "the Inception weights file"), (os.environ.get(ENV_WEIGHTS) or None, ENV_WEIGHTS)):
        if given is not None:
            p = Path(given).expanduser()
            if not p.is_file():
                raise BenchError(f"{source} {p} does not exist")
            return p
    hub = hub_weights_path()
    return hub if hub.is_file() else None


class _Skeleton(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 without loading any weights (randomly initialised)."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if state_dict is None:  # the weights torch-fidelity would have loaded: skipped
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def inception_skeleton(device: torch.device | str = "meta") -> tf_inception.FeatureExtractorInceptionV3:
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights (on "meta": shapes only, no memory)."""
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None), torch.device(device):
        return _Skeleton(EXTRACTOR, ["2048"])


@lru_cache(maxsize=1)
def expected_state_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of every entry of the state dict torch-fidelity's Inception loads."""
    return {k: tuple(v.shape) for k, v in inception_skeleton("meta").state_dict().items()}


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha of files already checked


def check_inception_weights(path: str | os.PathLike[str]) -> str:
    """Check that `path` holds torch-fidelity's Inception-v3 state dict; return its sha256 (16 hex digits).

    Loaded without executing pickled code (weights_only). Anything else is a one-line BenchError.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as e:
        raise BenchError(f"the Inception weights file {p} does not exist ({e.strerror})") from e
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _checked:
        return _checked[key]

    def bad(reason: str) -> BenchError:
        return BenchError(f"{p} is not an Inception-v3 weights file for torch-fidelity: {reason}")

    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise bad(f"cannot load it ({type(e).__name__}: {first[:200]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise bad(f"not a state dict of tensors but a {type(state).__name__}")
    expected = expected_state_shapes()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
        raise bad(", ".join(parts))
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise bad(f"{k} has shape {tuple(state[k].shape)}, expected {shape}")
    sha = _sha(p)
    _checked[key] = sha
    return sha


def unavailable_records(metrics: Collection[str] = METRICS, note: str = UNAVAILABLE) -> dict[str, dict[str, Any]]:
    return {name: {"value": None, "extractor": EXTRACTOR, "note": note} for m in metrics for name in RECORD_NAMES[m]}


def inception_metrics(
    fake: Tensor,
    real: ImageDataset,
    *,
    weights: str | os.PathLike[str] | None,
    metrics: Collection[str] = METRICS,
    batch_size: int = 64,
    cuda: bool | None = False,
    cache_name: str,
) -> dict[str, dict[str, Any]]:
    """Inception FID/KID/IS/precision-recall of uint8 `fake` [N, C, H, W] against the real set `real`.

    `metrics` ⊆ {"fid", "kid", "isc", "prc"}; records "fid_inception", "kid_inception", "is_inception",
    "precision_inception", "recall_inception". `weights`: see `resolve_inception_weights`; when none are
    found every record has value None and says why. `cache_name` names the reference set (e.g.
    "fmnist-train"); the cache entry of its features also carries its fingerprint and the weights' hash.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown Inception metrics {sorted(unknown)}; choose from {list(METRICS)}")
    if tuple(fake.shape[1:]) != tuple(real.images.shape[1:]):
        raise ValueError(
            f"fake images {tuple(fake.shape[1:])} differ in shape from real {tuple(real.images.shape[1:])}"
        )
    path = resolve_inception_weights(weights)
    if path is None:
        return unavailable_records(metrics)
    sha = check_inception_weights(path)
    scores = fidelity_scores(
        fake,
        real.images,
        metrics=list(metrics),
        cache_name=f"{cache_name}-{fingerprint(real)}-{EXTRACTOR}-{sha}",
        feature_extractor=EXTRACTOR,
        weights_path=str(path),
        rgb=True,
        batch_size=batch_size,
        cuda=cuda,
    )
    base = {
        "extractor": EXTRACTOR,
        "weights_sha": sha,
        "reference": "train",
        "n_gen": len(fake),
        "n_ref": len(real),
    }
    return fidelity_records(scores, base, metrics=list(metrics), suffix="inception", fd_name="fid")
