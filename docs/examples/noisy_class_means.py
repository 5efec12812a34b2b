"""A method as one plugin file, to copy and adapt: class-conditional samples around DP class means.

    bench run --plugin docs/examples/noisy_class_means.py --methods noisy-class-means --eps 1,10 --dataset fmnist

The mechanism: each record contributes its pixels x ∈ [0, 1]^D to its class's pixel sum and 1 to its class's
count. Under add/remove-one adjacency the vector (all sums, all counts) moves by at most √(D + 1) in L2 norm,
so releasing it once with N(0, σ²(D + 1)) on every coordinate is one Gaussian mechanism with noise multiplier σ
(σ relative to the sensitivity), calibrated to the budget. Everything after the release (means, sampling) is
post-processing. The ledger states that one release; the harness recomputes ε from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.contract import DataSpec, ImageDataset, Progress
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate


@dataclass(frozen=True, kw_only=True)
class Config:
    pixel_std: float = 0.12  # spread of the generated pixels around their class's DP mean ([0, 1] scale)

    def __post_init__(self) -> None:
        if not self.pixel_std >= 0:
            raise ValueError(f"pixel_std must be ≥ 0, got {self.pixel_std}")  # the harness prints it in one line


def release(sigma: float) -> list[Stage]:
    return [Stage(name="class sums and counts", mechanism="gaussian", noise_multiplier=sigma, count=1)]


class NoisyClassMeans:
    name: ClassVar[str] = "noisy-class-means"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False
    version: ClassVar[int] = 1  # bump when a change alters the results (a plugin's keys also hash this file)

    def __init__(self, config: Config, *, spec: DataSpec, device: torch.device) -> None:
        self.config, self.spec = config, spec
        self.means = torch.zeros(spec.num_classes, spec.channels, spec.height, spec.width)

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        sigma = calibrate(budget.epsilon, release, delta=budget.delta, accountant=budget.accountant)
        progress.start(1, "noisy class means (one Gaussian release)")
        if (state := progress.resume()) is not None:  # an interrupted fit: the release is never drawn twice
            self.load_state_dict(state)
        else:
            x = train.images.flatten(1).double() / 255
            classes = torch.nn.functional.one_hot(train.labels, self.spec.num_classes).double()
            sums, counts = classes.T @ x, classes.sum(0)  # [classes, D], [classes]
            scale = sigma * math.sqrt(x.shape[1] + 1)  # σ × the L2 sensitivity
            sums += scale * torch.randn(sums.shape, generator=generator, dtype=torch.float64)
            counts += scale * torch.randn(counts.shape, generator=generator, dtype=torch.float64)
            means = (sums / counts.clamp(min=1.0)[:, None]).clamp(0, 1)
            self.means = means.float().view(-1, self.spec.channels, self.spec.height, self.spec.width)
            progress.checkpoint(self.state_dict)
        progress.advance()
        ledger = PrivacyLedger()
        for stage in release(sigma):
            ledger.add(stage)
        return ledger

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        assert labels is not None  # conditional: the harness always asks for labels
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator) * self.config.pixel_std
        return ((self.means[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means = state["means"].clone()
