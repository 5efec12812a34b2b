"""Fidelity metrics (FD, KID, precision/recall, IS) computed by torch-fidelity.

torch-fidelity extracts the features, computes the statistics and the metrics; we only hand it uint8
datasets and a registered extractor (the domain CNN here, Inception in `bench.metrics.inception`).
Reference statistics and features of the real set are cached by torch-fidelity under
$BENCH_CACHE/fidelity, named after the data fingerprint and the extractor's weights.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics

from bench.contract import ImageDataset
from bench.data import cache_root
from bench.metrics import realside
from bench.metrics.features import DomainExtractor, extract_features, fingerprint
from bench.metrics.realside import RealSide, RealSideCache

PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al.; torch-fidelity counts the point itself apart)
PRC_MAX_REF = 10_000  # more real images than this: precision/recall against a fixed seeded subset
PRC_SEED = 0
KID_SUBSET_SIZE = 1000  # torch-fidelity's default, lowered to the sample counts when they are smaller
KID_SUBSETS = 100


class UInt8Images(Dataset[Tensor]):
    """Items are uint8 [C, H, W], what torch-fidelity feeds to feature extractors.

    `rgb`: single-channel images are repeated to 3 channels (Inception expects RGB)."""

    def __init__(self, images: Tensor, *, rgb: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if rgb and images.shape[1] not in (1, 3):
            raise ValueError(f"cannot make RGB images of {images.shape[1]} channels")
        self.images = images
        self.rgb = rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if self.rgb and x.shape[0] == 1 else x


def reference_cache_name(real: ImageDataset, extractor: DomainExtractor) -> str:
    """The torch-fidelity cache entry of `real`'s statistics.

    torch-fidelity names its files <input cache name>-<extractor registry name>-stat-fid-<layer>; the
    registry name is the same for every dataset and every set of weights, so the weights' key goes here.
    """
    return f"{extractor.key}-ref-{fingerprint(real)}"


def frechet_distance(
    fake: Tensor,
    real: ImageDataset,
    *,
    extractor: DomainExtractor,
    cache: bool = True,
    batch_size: int = 256,
    cuda: bool | None = None,
) -> float:
    """Fréchet distance between uint8 `fake` [N, C, H, W] and `real` in `extractor`'s feature space.

    `cache`: reuse torch-fidelity's cached statistics (and features) of `real`. `cuda`: run the extractor
    on the GPU; default when one is available. Non-negative; 0 for identical feature distributions.
    """
    if tuple(fake.shape[1:]) != tuple(real.images.shape[1:]):
        raise ValueError(
            f"fake images {tuple(fake.shape[1:])} differ in shape from real {tuple(real.images.shape[1:])}"
        )
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(fake),
        input2=UInt8Images(real.images),
        input2_cache_name=reference_cache_name(real, extractor),
        fid=True,
        feature_extractor=extractor.name,
        feature_layer_fid=extractor.feature_layer,
        feature_extractor_weights_path=str(extractor.weights_path),
        cache=cache,
        cache_root=str(cache_root() / "fidelity"),
        batch_size=batch_size,
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        save_cpu_ram=True,  # no DataLoader worker processes: the data are already in memory
        verbose=False,
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


def prc_reference_index(n_real: int, max_ref: int | None = None, seed: int = PRC_SEED) -> Tensor | None:
    """Sorted indices of the fixed seeded subset of the real set used for precision/recall; None: all of it."""
    max_ref = PRC_MAX_REF if max_ref is None else max_ref
    if n_real <= max_ref:
        return None
    perm = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed))
    return perm[:max_ref].sort().values


def fidelity_scores(
    fake: Tensor,
    real: Tensor,
    *,
    metrics: Collection[str],
    cache_name: str,
    feature_extractor: str,
    weights_path: str,
    rgb: bool = False,
    feature_layer: str | None = None,
    batch_size: int = 256,
    cuda: bool | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """torch-fidelity's metrics of uint8 `fake` against uint8 `real` (both [N, C, H, W]).

    `metrics` ⊆ {"fid", "kid", "prc", "isc"}. One `calculate_metrics` call computes them, with `real`'s
    features and statistics cached under `cache_name`; when `real` has more than PRC_MAX_REF images,
    precision/recall are computed in a second call against a fixed seeded subset of it (cached too).
    Returns the keys "fid", "kid", "kid_std", "kid_subset_size", "isc", "isc_std", "precision", "recall",
    "n_ref_prc" of what was asked; "error_<metric>" says why one could not be computed.
    """
    unknown = set(metrics) - {"fid", "kid", "prc", "isc"}
    if unknown:
        raise ValueError(f"unknown fidelity metrics {sorted(unknown)}")
    n_fake, n_real = len(fake), len(real)
    out: dict[str, Any] = {}
    want = set(metrics)
    if "kid" in want and min(n_fake, n_real) < 2:
        out["error_kid"] = "needs at least 2 samples in each set"
        want.discard("kid")
    if "prc" in want and min(n_fake, n_real) < PRC_NEIGHBORHOOD + 1:
        out["error_prc"] = f"needs at least {PRC_NEIGHBORHOOD + 1} samples in each set"
        want.discard("prc")
    prc_index = prc_reference_index(n_real) if "prc" in want else None
    common: dict[str, Any] = dict(
        input1=UInt8Images(fake, rgb=rgb),
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights_path,
        cache=cache,
        cache_root=str(cache_root() / "fidelity"),
        batch_size=batch_size,
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        save_cpu_ram=True,  # no DataLoader worker processes: the data are already in memory
        verbose=False,
    )
    if feature_layer is not None:
        common.update(feature_layer_fid=feature_layer, feature_layer_kid=feature_layer, feature_layer_prc=feature_layer)
    kid_subset_size = min(KID_SUBSET_SIZE, n_fake, n_real)
    first = {m for m in want if m != "prc" or prc_index is None}
    if first:
        res = torch_fidelity.calculate_metrics(
            **common,
            input2=UInt8Images(real, rgb=rgb),
            input2_cache_name=cache_name,
            fid="fid" in first,
            kid="kid" in first,
            prc="prc" in first,
            isc="isc" in first,
            kid_subsets=KID_SUBSETS,
            kid_subset_size=kid_subset_size,
            prc_neighborhood=PRC_NEIGHBORHOOD,
            isc_splits=min(10, n_fake),
        )
        out.update(_pick(res, first))
        if "kid" in first:
            out["kid_subset_size"] = kid_subset_size
        if "prc" in first:
            out["n_ref_prc"] = n_real
    if "prc" in want and prc_index is not None:
        res = torch_fidelity.calculate_metrics(
            **common,
            input2=UInt8Images(real[prc_index], rgb=rgb),
            input2_cache_name=f"{cache_name}-prc{len(prc_index)}s{PRC_SEED}",
            prc=True,
            prc_neighborhood=PRC_NEIGHBORHOOD,
        )
        out.update(_pick(res, {"prc"}))
        out["n_ref_prc"] = len(prc_index)
    return out


def _pick(res: dict[str, float], metrics: Collection[str]) -> dict[str, float]:
    keys = {
        "fid": {"fid": torch_fidelity.KEY_METRIC_FID},
        "kid": {"kid": torch_fidelity.KEY_METRIC_KID_MEAN, "kid_std": torch_fidelity.KEY_METRIC_KID_STD},
        "prc": {"precision": torch_fidelity.KEY_METRIC_PRECISION, "recall": torch_fidelity.KEY_METRIC_RECALL},
        "isc": {"isc": torch_fidelity.KEY_METRIC_ISC_MEAN, "isc_std": torch_fidelity.KEY_METRIC_ISC_STD},
    }
    return {ours: float(res[theirs]) for m in metrics for ours, theirs in keys[m].items()}


def prc_note(n_ref_prc: int, n_real: int) -> str:
    if n_ref_prc == n_real:
        return ""
    return f"precision/recall against a fixed seeded subset of {n_ref_prc} of the {n_real} reference images"


DOMAIN_METRICS = {"fd": "fid", "kid": "kid", "prc": "prc"}


def domain_fidelity(
    fake: Tensor,
    real: ImageDataset,
    *,
    extractor: DomainExtractor,
    metrics: Collection[str] = ("fd", "kid", "prc"),
    batch_size: int = 256,
    cuda: bool | None = False,
) -> dict[str, dict[str, Any]]:
    """FD, KID and precision/recall (k=3) of uint8 `fake` [N, C, H, W] against `real` in `extractor`'s features.

    `metrics` ⊆ {"fd", "kid", "prc"}. Returns records "fd_domain", "kid_domain" (with "kid_std"),
    "precision_domain" and "recall_domain" of what was asked, each labelled with the extractor, the
    reference split and the sample counts. Everything that depends on `real` alone (its features, FD
    statistics, k-NN radii, KID kernel sums) is computed once and cached (bench.metrics.realside); the
    fake features are extracted once per call.
    """
    unknown = set(metrics) - set(DOMAIN_METRICS)
    if unknown:
        raise ValueError(f"unknown domain metrics {sorted(unknown)}; choose from {sorted(DOMAIN_METRICS)}")
    if tuple(fake.shape[1:]) != tuple(real.images.shape[1:]):
        raise ValueError(
            f"fake images {tuple(fake.shape[1:])} differ in shape from real {tuple(real.images.shape[1:])}"
        )
    device = "cuda" if cuda or (cuda is None and torch.cuda.is_available()) else "cpu"
    n_fake, n_real = len(fake), len(real)
    prc_index = prc_reference_index(n_real)
    cache = RealSideCache(f"{reference_cache_name(real, extractor)}-prc{PRC_MAX_REF}s{PRC_SEED}")
    side = cache.load()
    changed = side is None
    if side is None:
        feats = extract_features(extractor, real.images, batch_size=batch_size, device=device)
        side = RealSide(features=feats, stats=fid_features_to_statistics(feats.double()), prc_index=prc_index)
    fake_feats = extract_features(extractor, fake, batch_size=batch_size, device=device)
    scores: dict[str, Any] = {}
    if "fd" in metrics:
        scores["fid"] = realside.frechet(fake_feats, side)
    if "kid" in metrics:
        if min(n_fake, n_real) < 2:
            scores["error_kid"] = "needs at least 2 samples in each set"
        else:
            size = min(KID_SUBSET_SIZE, n_fake, n_real)
            kid = realside.kid(fake_feats, side, subset_size=size, subsets=KID_SUBSETS)
            scores["kid"], scores["kid_std"], new = kid
            scores["kid_subset_size"] = size
            changed |= new
    if "prc" in metrics:
        if min(n_fake, n_real) < PRC_NEIGHBORHOOD + 1:
            scores["error_prc"] = f"needs at least {PRC_NEIGHBORHOOD + 1} samples in each set"
        else:
            scores["precision"], scores["recall"], new = realside.precision_recall(fake_feats, side, k=PRC_NEIGHBORHOOD)
            scores["n_ref_prc"] = len(side.prc_features)
            changed |= new
    if changed:
        cache.save(side)
    base = {
        "extractor": extractor.name,
        "extractor_key": extractor.key,
        "feature_layer": extractor.feature_layer,
        "reference": "train",
        "n_gen": n_fake,
        "n_ref": n_real,
    }
    return fidelity_records(scores, base, metrics=[DOMAIN_METRICS[m] for m in metrics], suffix="domain",
                            fd_name="fd")  # fmt: skip


def fidelity_records(
    scores: dict[str, Any], base: dict[str, Any], *, metrics: Collection[str], suffix: str, fd_name: str
) -> dict[str, dict[str, Any]]:
    """Records "<fd_name>_<suffix>", "kid_<suffix>", "is_<suffix>", "precision_<suffix>", "recall_<suffix>"."""
    out: dict[str, dict[str, Any]] = {}

    def record(name: str, metric: str, key: str, **extra: Any) -> None:
        if f"error_{metric}" in scores:
            out[name] = {"value": None, **base, "note": f"unavailable: {scores[f'error_{metric}']}"}
        else:
            out[name] = {"value": scores[key], **base, "note": "", **extra}

    if "fid" in metrics:
        record(f"{fd_name}_{suffix}", "fid", "fid")
    if "kid" in metrics:
        extra = (
            {}
            if "error_kid" in scores
            else {"kid_std": scores["kid_std"], "kid_subset_size": scores["kid_subset_size"]}
        )
        record(f"kid_{suffix}", "kid", "kid", **extra)
    if "isc" in metrics:
        record(f"is_{suffix}", "isc", "isc", **({} if "error_isc" in scores else {"is_std": scores["isc_std"]}))
    if "prc" in metrics:
        for what in ("precision", "recall"):
            extra = {}
            if "error_prc" not in scores:
                extra = {"k": PRC_NEIGHBORHOOD, "n_ref_prc": scores["n_ref_prc"],
                         "note": prc_note(scores["n_ref_prc"], base["n_ref"])}  # fmt: skip
            record(f"{what}_{suffix}", "prc", what, **extra)
    return out
