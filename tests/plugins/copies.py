"""Two plugins that release noisy copies of the training images: the audit's cases of a correct mechanism and of
one that claims ε but adds no noise.

noisy-copies: a public pool of `pool` outputs (pool ≥ the training set): one copy of each record plus Gaussian
noise N(0, (σ·S)²) per pixel, S = 255·√(C·H·W) (every image's L2 norm is at most S), padded with pure-noise dummies
(0 + noise), in a random order; labels are not released (unconditional). Adding or removing one record turns one
dummy into a record's copy or back: a Gaussian mechanism of L2 sensitivity ≤ S, so with σ calibrated for one
Gaussian release the pool is (ε, δ)-DP; sampling returns images of the pool (post-processing).

leaky-copies: the same ledger, and no noise: the copies are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench.privacy import PrivacyLedger, Stage, calibrate


@dataclass(frozen=True, kw_only=True)
class Config:
    pool: int = 2500  # public number of outputs (≥ the training records)


class NoisyCopies:
    name: ClassVar[str] = "noisy-copies"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = False
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False
    add_noise: ClassVar[bool] = True

    def __init__(self, config: Config, *, spec: Any, device: torch.device) -> None:
        self.config, self.spec = config, spec
        self.pool = torch.zeros(0, spec.channels, spec.height, spec.width, dtype=torch.uint8)

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        def stages(s: float) -> list[Stage]:
            return [Stage(name="copies", mechanism="gaussian", noise_multiplier=s, count=1)]

        sigma = calibrate(budget.epsilon, stages, delta=budget.delta, accountant=budget.accountant)
        n, pool = len(train), self.config.pool
        if n > pool:
            raise ValueError(f"pool {pool} is smaller than the {n} training records")
        x = torch.zeros(pool, *train.images.shape[1:])
        x[:n] = train.images.float()
        if self.add_noise:
            x += sigma * 255.0 * math.sqrt(x[0].numel()) * torch.randn(x.shape, generator=generator)
        self.pool = x[torch.randperm(pool, generator=generator)].clamp(0, 255).round().to(torch.uint8)
        progress.start(1)
        progress.advance()
        ledger = PrivacyLedger()
        for stage in stages(sigma):
            ledger.add(stage)
        return ledger

    def sample(self, n: int, *, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return self.pool[torch.arange(n) % len(self.pool)]

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = state["pool"].clone()


class LeakyCopies(NoisyCopies):
    name: ClassVar[str] = "leaky-copies"
    add_noise: ClassVar[bool] = False
