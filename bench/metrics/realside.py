"""The real set's side of FD, KID and precision/recall, computed once per (reference set, extractor) and cached.

Why not torch-fidelity's `calculate_metrics` here: it caches a reference's features and FD statistics, but at every
call it recomputes the real-vs-real k-NN radii of precision/recall and the real-real kernel blocks of KID, and
extracts the fake features once per metric group: most of the time of a second scoring. Here everything that
depends on the real set alone is a RealSide, stored in $BENCH_CACHE/fidelity; a scoring extracts the fake features
once and computes the fake side and the cross terms (one metric a file: bench.metrics.fid, .kid, .prc).

Provenance: our own cache (no reference code): it stores what
toshas/torch-fidelity@2e5d88dcd8f374602fc68be872e3d0aee11913e3 recomputes at every `calculate_metrics` call
(torch_fidelity/metric_kid.py's real-real kernel sums, metric_prc.py's real k-NN radii); the estimators themselves are
in fid.py, kid.py and prc.py, each with its reference. (The commit is torch-fidelity v0.4.0, the version pyproject.toml
pins.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.data import cache_root

CACHE_VERSION = 1  # bump when anything stored here changes meaning
CHUNK = 2048  # rows of a distance or kernel block computed at once (2048 × 60,000 floats ≈ 0.5 GB)


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
