"""The fidelity family's scoring: FD/FID (bench.metrics.fid), KID (.kid), precision/recall (.prc) and IS, on one
feature extraction per sample set, as the records a run stores.

Two paths: `fidelity_scores` hands uint8 images and a registered extractor to torch-fidelity's `calculate_metrics`
(the standard Inception path, bench.metrics.inception); `domain_fidelity` extracts the domain CNN's features once
and computes each metric from them against the real set's cached side (bench.metrics.realside). Reference
statistics and features are cached under $BENCH_CACHE/fidelity, named after the data fingerprint and the
extractor's weights.

Provenance: the calls follow toshas/torch-fidelity@2e5d88dcd8f374602fc68be872e3d0aee11913e3:torch_fidelity/metrics.py
(`calculate_metrics` with a registered feature extractor, its cache under our cache root); the records (names, protocol
fields, notes) are our own. Deviations: the domain path does not go through `calculate_metrics` (see
bench.metrics.realside for why). (The commit is torch-fidelity v0.4.0, the version pyproject.toml pins.)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.metric_fid import fid_features_to_statistics

from bench.contract import ImageDataset
from bench.metrics import prc
from bench.metrics.features import (
    DomainExtractor,
    UInt8Images,
    extract_features,
    fidelity_call_options,
    reference_cache_name,
)
from bench.metrics.fid import frechet
from bench.metrics.kid import KID_SUBSET_SIZE, KID_SUBSETS, kid
from bench.metrics.prc import PRC_NEIGHBORHOOD, PRC_SEED, prc_note, prc_reference_index, precision_recall
from bench.metrics.realside import RealSide, RealSideCache


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
        **fidelity_call_options(cache=cache, batch_size=batch_size, cuda=cuda),
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
    cache = RealSideCache(f"{reference_cache_name(real, extractor)}-prc{prc.PRC_MAX_REF}s{PRC_SEED}")
    side = cache.load()
    changed = side is None
    if side is None:
        feats = extract_features(extractor, real.images, batch_size=batch_size, device=device)
        side = RealSide(features=feats, stats=fid_features_to_statistics(feats.double()), prc_index=prc_index)
    fake_feats = extract_features(extractor, fake, batch_size=batch_size, device=device)
    scores: dict[str, Any] = {}
    if "fd" in metrics:
        scores["fid"] = frechet(fake_feats, side)
    if "kid" in metrics:
        if min(n_fake, n_real) < 2:
            scores["error_kid"] = "needs at least 2 samples in each set"
        else:
            size = min(KID_SUBSET_SIZE, n_fake, n_real)
            scores["kid"], scores["kid_std"], new = kid(fake_feats, side, subset_size=size, subsets=KID_SUBSETS)
            scores["kid_subset_size"] = size
            changed |= new
    if "prc" in metrics:
        if min(n_fake, n_real) < PRC_NEIGHBORHOOD + 1:
            scores["error_prc"] = f"needs at least {PRC_NEIGHBORHOOD + 1} samples in each set"
        else:
            scores["precision"], scores["recall"], new = precision_recall(fake_feats, side, k=PRC_NEIGHBORHOOD)
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
