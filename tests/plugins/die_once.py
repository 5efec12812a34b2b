"""DPDM whose process dies once mid-fit, as a worker killed by the OOM killer or a lost node would: while the
file `die_marker` exists, the fit deletes it and kills its own process (SIGKILL: no exception, no clean-up)
right after the first checkpoint at or past half of its steps. The rerun (the file gone) resumes from that
checkpoint, and appends the DP-SGD step it resumed at to `<die_marker>.resumed`."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from bench.baselines.dpdm import DPDM
from bench.baselines.dpdm import Config as DPDMConfig

from bench.privacy import PrivacyLedger


@dataclass(frozen=True, kw_only=True)
class Config(DPDMConfig):
    die_marker: str = ""


class _DieAfterHalf:
    def __init__(self, progress: Any, marker: Path) -> None:
        self.inner, self.marker, self.total, self.done = progress, marker, 0, 0

    def start(self, total: int, description: str = "") -> None:
        self.total = total
        self.inner.start(total, description)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.inner.advance(n)

    def resume(self) -> Any:
        state = self.inner.resume()
        if state is not None:
            with open(f"{self.marker}.resumed", "a") as f:
                f.write(f"{state['dpsgd']['steps']}\n")
        return state

    def checkpoint(self, state_fn: Any) -> None:
        self.inner.checkpoint(state_fn)
        if self.done >= self.total // 2 and self.marker.is_file():  # done = steps taken (DP-SGD's bar counts steps)
            self.marker.unlink()
            os.kill(os.getpid(), signal.SIGKILL)


class DieOnce(DPDM):
    name: ClassVar[str] = "die-once"
    Config: ClassVar[type] = Config

    def fit(self, train: Any, *, budget: Any, generator: torch.Generator, progress: Any) -> PrivacyLedger:
        marker = Path(self.config.die_marker)
        progress = _DieAfterHalf(progress, marker) if self.config.die_marker else progress
        return super().fit(train, budget=budget, generator=generator, progress=progress)
