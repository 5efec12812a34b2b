"""A plugin whose ledger charges more than its budget: the harness must refuse the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench.privacy import PrivacyLedger, Stage


@dataclass(frozen=True, kw_only=True)
class Config:
    sigma: float = 0.5  # far too little noise for any ε used in the tests


class Overspend:
    name: ClassVar[str] = "overspend"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Config, *, spec: Any, device: torch.device) -> None:
        self.config, self.spec = config, spec

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        ledger = PrivacyLedger()
        ledger.add(Stage(name="release", mechanism="gaussian", noise_multiplier=self.config.sigma, count=100))
        return ledger

    def sample(self, n: int, *, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros((n, self.spec.channels, self.spec.height, self.spec.width), dtype=torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
