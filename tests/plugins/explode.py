"""A plugin that fails inside its own code (a diverging loss in `fit`, or a broken `sample`): the harness must
record the cell as failed with a one-line error and go on with the grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from bench.privacy import PrivacyLedger, Stage


@dataclass(frozen=True, kw_only=True)
class Config:
    fail_in: Literal["fit", "sample"] = "fit"


class Explode:
    name: ClassVar[str] = "explode"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Config, *, spec: Any, device: torch.device) -> None:
        self.config, self.spec = config, spec

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        if self.config.fail_in == "fit":
            raise FloatingPointError("loss is non-finite at step 3\n(a second line that the one-line error drops)")
        ledger = PrivacyLedger()
        ledger.add(Stage(name="release", mechanism="gaussian", noise_multiplier=1e6, count=1))
        return ledger

    def sample(self, n: int, *, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        raise IndexError("sampler broke")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
