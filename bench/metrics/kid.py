"""KID (Bińkowski et al. 2018) from features: the unbiased MMD² with the cubic polynomial kernel
k(x, y) = (x·y/d + 1)³, mean and std over `subsets` pairs of random subsets of `subset_size` samples of each set
(torch-fidelity's estimator; tests/test_realside.py compares on identical features).

The real subsets come from their own seeded stream (torch-fidelity interleaves them with the fake ones), so that
they and their kernel sums depend on the real set alone and are kept in its RealSide (bench.metrics.realside).

Provenance: reproduces toshas/torch-fidelity@2e5d88dcd8f374602fc68be872e3d0aee11913e3:torch_fidelity/metric_kid.py
(`kernel_poly` with γ = 1/d, coef0 1, degree 3; `mmd2` unbiased; `kid_features_to_metric`). Deviations: the real subsets
are drawn from their own stream (seed 2020, torch-fidelity's default, for the real side; 2021 for the fake side) instead
of interleaved with the fake ones, so individual subset values differ from torch-fidelity's for the same seed while the
estimator is the same (tests/test_realside.py compares both on identical subsets); the std is the population std
(`unbiased=False`), as numpy's default there. (The commit is torch-fidelity v0.4.0, the version pyproject.toml pins.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bench.metrics import realside
from bench.metrics.realside import RealSide

KID_SEED = 2020  # torch-fidelity's default rng_seed
KID_DEGREE = 3
KID_SUBSET_SIZE = 1000  # torch-fidelity's default, lowered to the sample counts when they are smaller
KID_SUBSETS = 100


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


def kid(fake: Tensor, real: RealSide, *, subset_size: int, subsets: int) -> tuple[float, float, bool]:
    """(mean, std) of the unbiased MMD² over `subsets` subset pairs; the bool says whether `real` changed."""
    changed = subset_size not in real.kid
    if changed:
        index = kid_subsets(len(real.features), subset_size, subsets, KID_SEED)
        per_block = max(1, realside.CHUNK // subset_size)
        sums = torch.cat([_offdiag_sums(real.features[i]) for i in index.split(per_block)])
        real.kid[subset_size] = (index, sums)
    real_index, yy = real.kid[subset_size]
    fake_index = kid_subsets(len(fake), subset_size, subsets, KID_SEED + 1)
    xx, xy = [], []
    per_block = max(1, realside.CHUNK // subset_size)
    for fi, ri in zip(fake_index.split(per_block), real_index.split(per_block), strict=True):
        x, y = fake[fi], real.features[ri]
        xx.append(_offdiag_sums(x))
        xy.append(_sums(poly_kernel(x, y)))
    m = subset_size
    mmd2 = (torch.cat(xx) + yy) / (m * (m - 1)) - 2 * torch.cat(xy) / (m * m)
    return float(mmd2.mean()), float(mmd2.std(unbiased=False)), changed
