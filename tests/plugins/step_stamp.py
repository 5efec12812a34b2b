"""A method whose every sample carries the training step of the model that drew it: pixel (0, 0, 0) of each image
is the number of steps taken (0..255), so a test can tell which state a sample came from (the quality-against-
compute curve scores each point from its own snapshot, bench.grid.curve).

A real, crude DP generator otherwise: one Gaussian release of per-class pixel sums and counts (as good_plugin.py),
then `steps` post-processing steps moving the model's class means a fraction towards the released ones, each
step sleeping `step_s` (a fit whose seconds a test can see) and checkpointed through the harness's Progress.
`interrupt_at` > 0 with the file `interrupt_marker` present: the fit deletes the file and raises
KeyboardInterrupt right after that step's progress, before its checkpoint, as Ctrl-C would there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from bench.privacy import PrivacyLedger, Stage, calibrate


@dataclass(frozen=True, kw_only=True)
class Config:
    steps: int = 24
    step_s: float = 0.0
    interrupt_at: int = 0
    interrupt_marker: str = ""


def _stage(sigma: float) -> Stage:
    return Stage(name="sums", mechanism="gaussian", noise_multiplier=sigma, count=2)


class StepStamp:
    name: ClassVar[str] = "step-stamp"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Config, *, spec: Any, device: torch.device) -> None:
        self.config, self.spec = config, spec
        shape = (spec.num_classes, spec.channels, spec.height, spec.width)
        self.step, self.means, self.target = 0, torch.zeros(shape), torch.zeros(shape)

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        cfg = self.config
        sigma = calibrate(budget.epsilon, lambda s: [_stage(s)], delta=budget.delta, accountant=budget.accountant)
        if (state := progress.resume()) is not None:  # the release is in the checkpoint: never drawn twice
            self.load_state_dict(state["model"])
        else:
            self._release(train, sigma, generator)
        progress.start(cfg.steps, "step-stamp steps")
        progress.advance(self.step)
        while self.step < cfg.steps:
            time.sleep(cfg.step_s)
            self.means += 0.2 * (self.target - self.means)
            self.step += 1
            progress.advance()
            marker = Path(cfg.interrupt_marker)
            if self.step == cfg.interrupt_at and cfg.interrupt_marker and marker.is_file():
                marker.unlink()
                raise KeyboardInterrupt
            progress.checkpoint(lambda: {"model": self.state_dict()})
        ledger = PrivacyLedger()
        ledger.add(_stage(sigma))
        return ledger

    def _release(self, train: Any, sigma: float, generator: torch.Generator) -> None:
        """Per-class pixel sums (L2 sensitivity 255·sqrt(C·H·W)) and counts (1), one composed Gaussian."""
        x = train.images.float()
        sens = 255.0 * math.sqrt(x[0].numel())
        for c in range(self.spec.num_classes):
            xs = x[train.labels == c]
            total = xs.sum(0) + sigma * sens * torch.randn(xs.shape[1:], generator=generator)
            count = len(xs) + sigma * float(torch.randn((), generator=generator))
            self.target[c] = total / max(count, 1.0)

    def sample(self, n: int, *, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        assert labels is not None
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator) * 20.0
        images = (self.means[labels] + noise).clamp(0, 255).round().to(torch.uint8)
        images[:, 0, 0, 0] = self.step  # the stamp
        return images

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "means": self.means, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.means, self.target = int(state["step"]), state["means"].clone(), state["target"].clone()
