"""FD, KID and precision/recall from features, with the real set's side computed once and cached.

Why not torch-fidelity's `calculate_metrics` here: it caches a reference's features and FD statistics,
but at every call it recomputes the real-vs-real k-NN radii of precision/recall and the real-real kernel
blocks of KID, and extracts the fake features once per metric group: most of the time of a second
scoring. Here everything that depends on the real set alone is computed once per (reference set,
extractor) and stored in $BENCH_CACHE/fidelity; a scoring extracts the fake features once and computes
the fake side and the cross terms. The estimators are torch-fidelity's (the tests compare on identical
features):

- FD: torch-fidelity's `fid_features_to_statistics` and `fid_statistics_to_metric`.
- KID: unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y/d + 1)³, mean and std over
  `KID_SUBSETS` pairs of random subsets of `subset_size` samples of each set. The real subsets come from
  their own seeded stream (torch-fidelity interleaves them with the fake ones), so that they and their
  kernel sums do not depend on the fake set and can be cached.
- precision/recall (Kynkäänniemi et al. 2019, k = 3): a sample counts when it lies within the distance
  to the k-th nearest neighbour (itself excluded) of some point of the other set; the real side is a
  fixed seeded subset of at most `PRC_MAX_REF` images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from bench.data import cache_root

CACHE_VERSION = 1  # bump when anything stored here changes meaning
KID_SEED = 2020  # torch-fidelity's default rng_seed
KID_DEGREE = 3
CHUNK = 2048  # rows of a distance or kernel block computed at once (2048 × 60,000 floats ≈ 0.5 GB)


def poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """(x·y/d + 1)³ of float32 [S, m, d] and [S, n, d] -> float32 [S, m, n] (sum it in float64)."""
    one = torch.ones(1, 1, 1, dtype=x.dtype)
    return torch.baddbmm(one, x, y.transpose(-1, -2), alpha=1.0 / x.shape[-1]).pow_(KID_DEGREE)


def _sums(k: Tensor) -> Tensor:
    return k.sum(dim=(1, 2), dtype=torch.float64)


def _offdiag_sums(x: Tensor) -> Tensor:
    """Sum of the off-diagonal kernel entries of each subset in x [S, m, d] -> float64 [S]."""
    k = poly_kernel(x, x)
    return _sums(k) - k.diagonal(dim1=1, dim2=2).sum(dim=1, dtype=torch.float64)


def kid_subsets(n: int, subset_size: int, subsets: int, seed: int) -> Tensor:
    """int64 [subsets, subset_size]: subsets drawn without replacement, each independently, from one stream."""
    rng = np.random.RandomState(seed)
    return torch.from_numpy(np.stack([rng.choice(n, subset_size, replace=False) for _ in range(subsets)]))


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each row of features [N, d] to its k-th nearest other row -> [N]."""
    out = [torch.cdist(c, features).topk(k + 1, largest=False).values[:, k] for c in features.split(CHUNK)]
    return torch.cat(out)


@dataclass
class RealSide:
    """What the metrics need of one reference set, computed once: see the module docstring."""

    features: Tensor  # float32 [N, d], all reference features (KID's cross terms gather from them)
    stats: dict[str, np.ndarray]  # FD statistics of `features` (torch-fidelity's format)
    prc_index: Tensor | None  # the seeded subset used for precision/recall; None: all of them
    prc_radii: Tensor | None = None  # k-NN radii within the precision/recall reference
    kid: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # subset size -> (indices, sums)

    @property
    def prc_features(self) -> Tensor:
        return self.features if self.prc_index is None else self.features[self.prc_index]


class RealSideCache:
    """RealSide objects on disk, one file per reference (named by the caller), written atomically."""

    def __init__(self, name: str) -> None:
        self.path = cache_root() / "fidelity" / f"{name}-realside-v{CACHE_VERSION}.pt"

    def load(self) -> RealSide | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        return RealSide(**state)

    def save(self, side: RealSide) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{self.path}.tmp{os.getpid()}")
        torch.save(side.__dict__, tmp)
        os.replace(tmp, self.path)  # atomic: a concurrent reader never sees half a file


def frechet(fake: Tensor, real: RealSide) -> float:
    stats = fid_features_to_statistics(fake.double().cpu())
    ref = {k: np.asarray(v, dtype=np.float64) for k, v in real.stats.items()}
    return float(fid_statistics_to_metric(stats, ref, verbose=False)[KEY_METRIC_FID])


def kid(fake: Tensor, real: RealSide, *, subset_size: int, subsets: int) -> tuple[float, float, bool]:
    """(mean, std) of the unbiased MMD² over `subsets` subset pairs; the bool says whether `real` changed."""
    changed = subset_size not in real.kid
    if changed:
        index = kid_subsets(len(real.features), subset_size, subsets, KID_SEED)
        sums = torch.cat([_offdiag_sums(real.features[i]) for i in index.split(max(1, CHUNK // subset_size))])
        real.kid[subset_size] = (index, sums)
    real_index, yy = real.kid[subset_size]
    fake_index = kid_subsets(len(fake), subset_size, subsets, KID_SEED + 1)
    xx, xy = [], []
    for fi, ri in zip(
        fake_index.split(max(1, CHUNK // subset_size)), real_index.split(max(1, CHUNK // subset_size)), strict=True
    ):
        x, y = fake[fi], real.features[ri]
        xx.append(_offdiag_sums(x))
        xy.append(_sums(poly_kernel(x, y)))
    m = subset_size
    mmd2 = (torch.cat(xx) + yy) / (m * (m - 1)) - 2 * torch.cat(xy) / (m * m)
    return float(mmd2.mean()), float(mmd2.std(unbiased=False)), changed


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
    for chunk, radii in zip(fake.split(CHUNK), fake_radii.split(CHUNK), strict=True):
        d = torch.cdist(chunk, ref)  # [c, M], computed once for both directions
        precise[start : start + len(chunk)] = (d <= real.prc_radii[None, :]).any(dim=1)
        recalled |= (d <= radii[:, None]).any(dim=0)
        start += len(chunk)
    return float(precise.float().mean()), float(recalled.float().mean()), changed
