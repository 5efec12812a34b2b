"""A third-party method as a single plugin file: a real (if crude) class-conditional generator.

It memorises nothing: each class is sampled as Gaussian pixel noise around a DP mean image of that
class (Gaussian mechanism on per-class pixel sums, σ calibrated to the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench.privacy import PrivacyLedger, Stage, calibrate


@dataclass(frozen=True, kw_only=True)
class Config:
    pixel_std: float = 30.0  # spread of generated pixels around the DP class mean (0..255 scale)


class NoisyMeans:
    name: ClassVar[str] = "noisy-means"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Config, *, spec: Any, device: torch.device) -> None:
        self.config, self.spec = config, spec
        self.means = torch.zeros(spec.num_classes, spec.channels, spec.height, spec.width)

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        # One Gaussian release of per-class pixel sums (L2 sensitivity 255·sqrt(C·H·W) under add/remove)
        # and of per-class counts (sensitivity 1): one composed Gaussian with σ relative to sensitivity.
        sigma = calibrate(
            budget.epsilon,
            lambda s: [Stage(name="sums", mechanism="gaussian", noise_multiplier=s, count=2)],
            delta=budget.delta,
            accountant=budget.accountant,
        )
        x = train.images.float()
        sens = 255.0 * math.sqrt(x[0].numel())
        for c in range(self.spec.num_classes):
            xs = x[train.labels == c]
            total = xs.sum(0) + sigma * sens * torch.randn(xs.shape[1:], generator=generator)
            count = len(xs) + sigma * float(torch.randn((), generator=generator))
            self.means[c] = total / max(count, 1.0)
        progress.start(1)
        progress.advance()
        ledger = PrivacyLedger()
        ledger.add(Stage(name="sums", mechanism="gaussian", noise_multiplier=sigma, count=2))
        return ledger

    def sample(self, n: int, *, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        assert labels is not None
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator) * self.config.pixel_std
        return (self.means[labels] + noise).clamp(0, 255).round().to(torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means = state["means"].clone()
