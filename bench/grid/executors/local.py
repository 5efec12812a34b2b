"""The local executor: the jobs one after another in this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.grid.executors.base import wait_for_busy
from bench.grid.planning import Job
from bench.grid.runner import Runner


class LocalExecutor:
    """Runs the jobs one after another in this process: `ui` shows each fit's bar and advances the grid's bar
    after each job."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, runner: Runner, jobs: list[Job], ui: Any, echo: Callable[[str], None]) -> list[str]:
        def one_pass(batch: list[Job], wait: bool) -> list[str]:
            outcomes = []
            for job in batch:
                outcomes.append(runner.run(job, ui=ui, wait=wait))
                if outcomes[-1] != "busy":
                    ui.grid_advance(job, outcomes[-1], runner.errors.get(job.key))
            return outcomes

        return wait_for_busy(runner, jobs, one_pass, echo)
