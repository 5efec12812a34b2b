"""Precision and recall (Kynkäänniemi et al. 2019, k = 3) from features: a sample counts when it lies within the
distance to the k-th nearest neighbour (itself excluded) of some point of the other set; the real side is a fixed
seeded subset of at most `PRC_MAX_REF` images, its radii kept in its RealSide (bench.metrics.realside).

Provenance: reproduces toshas/torch-fidelity@2e5d88dcd8f374602fc68be872e3d0aee11913e3:torch_fidelity/metric_prc.py
(`calculate_precision_recall_full`, neighbourhood 3, the point itself excluded as its `kthvalue(k + 1)`). Deviations:
the real side is a fixed seeded subset of at most PRC_MAX_REF images (torch-fidelity uses all of them) and its radii are
cached; distances are computed in chunks of realside.CHUNK rows. (The commit is torch-fidelity v0.4.0, the version
pyproject.toml pins.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.metrics import realside
from bench.metrics.realside import RealSide

PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al.; torch-fidelity counts the point itself apart)
PRC_MAX_REF = 10_000  # more real images than this: precision/recall against a fixed seeded subset
PRC_SEED = 0


def prc_reference_index(n_real: int, max_ref: int | None = None, seed: int = PRC_SEED) -> Tensor | None:
    """Sorted indices of the fixed seeded subset of the real set used for precision/recall; None: all of it."""
    max_ref = PRC_MAX_REF if max_ref is None else max_ref
    if n_real <= max_ref:
        return None
    perm = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed))
    return perm[:max_ref].sort().values


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each row of features [N, d] to its k-th nearest other row -> [N]."""
    out = [torch.cdist(c, features).topk(k + 1, largest=False).values[:, k] for c in features.split(realside.CHUNK)]
    return torch.cat(out)


def precision_recall(fake: Tensor, real: RealSide, *, k: int) -> tuple[float, float, bool]:
    """(precision, recall) against the reference subset; the bool says whether `real` changed."""
    ref = real.prc_features
    changed = real.prc_radii is None
    if real.prc_radii is None:
        real.prc_radii = knn_radii(ref, k)
    fake_radii = knn_radii(fake, k)
    precise = torch.zeros(len(fake), dtype=torch.bool)
    recalled = torch.zeros(len(ref), dtype=torch.bool)
    start = 0
    for chunk, radii in zip(fake.split(realside.CHUNK), fake_radii.split(realside.CHUNK), strict=True):
        d = torch.cdist(chunk, ref)  # [c, M], computed once for both directions
        precise[start : start + len(chunk)] = (d <= real.prc_radii[None, :]).any(dim=1)
        recalled |= (d <= radii[:, None]).any(dim=0)
        start += len(chunk)
    return float(precise.float().mean()), float(recalled.float().mean()), changed


def prc_note(n_ref_prc: int, n_real: int) -> str:
    if n_ref_prc == n_real:
        return ""
    return f"precision/recall against a fixed seeded subset of {n_ref_prc} of the {n_real} reference images"
