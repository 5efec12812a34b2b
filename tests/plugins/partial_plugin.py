"""A plugin whose pipeline touches private data outside its mechanism: it must be reported as partial.

Like noisy-means (DP per-class means, Gaussian mechanism), but it rescales its samples to the private
data's exact pixel range, a statistic computed without noise: the ledger lists that access under
`non_private`, the guarantee is "partial", and `claimed_epsilon` holds what an analysis that ignores the
access would claim (the mechanism's ε alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench.privacy import PrivacyLedger, Stage, calibrate, epsilon


@dataclass(frozen=True, kw_only=True)
class Config:
    pixel_std: float = 30.0


class PartialMeans:
    name: ClassVar[str] = "partial-means"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "partial"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Config, *, spec: Any, device: torch.device) -> None:
        self.config, self.spec = config, spec
        self.means = torch.zeros(spec.num_classes, spec.channels, spec.height, spec.width)
        self.lo, self.hi = 0.0, 255.0

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        stages = lambda s: [Stage(name="sums", mechanism="gaussian", noise_multiplier=s, count=2)]  # noqa: E731
        sigma = calibrate(budget.epsilon, stages, delta=budget.delta, accountant=budget.accountant)
        x = train.images.float()
        sens = 255.0 * math.sqrt(x[0].numel())
        for c in range(self.spec.num_classes):
            xs = x[train.labels == c]
            total = xs.sum(0) + sigma * sens * torch.randn(xs.shape[1:], generator=generator)
            self.means[c] = total / max(len(xs) + sigma * float(torch.randn((), generator=generator)), 1.0)
        self.lo, self.hi = float(x.min()), float(x.max())  # the non-private access
        progress.start(1)
        progress.advance()
        ledger = PrivacyLedger()
        for stage in stages(sigma):
            ledger.add(stage)
        ledger.mark_non_private("pixel range of the private data, without noise")
        ledger.claimed_epsilon = epsilon(ledger, budget.delta, budget.accountant)
        return ledger

    def sample(self, n: int, *, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        assert labels is not None
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator) * self.config.pixel_std
        return (self.means[labels] + noise).clamp(self.lo, self.hi).round().to(torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.clone(), "range": (self.lo, self.hi)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means, (self.lo, self.hi) = state["means"].clone(), state["range"]
