"""What an executor is, and the two passes every executor makes (the busy cells waited for in the second)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from bench.grid.planning import Job
from bench.grid.runner import Runner


class Executor(Protocol):
    """Runs a grid's jobs (cells or real-data rows) and returns each one's outcome ("done", "skipped", "failed"),
    in order; the one-line error of each failed job lands in `runner.errors`. `ui` (bench.ui.GridUI) shows the
    progress, `echo` gets the one-line messages. Implementations: LocalExecutor (local.py), RayExecutor (ray.py)."""

    def run(self, runner: Runner, jobs: list[Job], ui: Any, echo: Callable[[str], None]) -> list[str]: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


def wait_for_busy(
    runner: Runner,
    jobs: list[Job],
    one_pass: Callable[[list[Job], bool], list[str]],
    echo: Callable[[str], None],
) -> list[str]:
    """Both executors' two passes: every job without waiting (a cell another process holds is "busy"), then the
    busy ones again, waiting for their locks: each ends skipped (the other process finished it) or resumed here
    (it did not), so every process of a shared results folder ends with the whole grid."""
    outcomes = one_pass(jobs, False)
    busy = [i for i, o in enumerate(outcomes) if o == "busy"]
    if busy:
        holders = sorted({h for i in busy if (h := runner.lock_holder(jobs[i].key))})
        echo(
            f"waiting for {len(busy)} cell(s) that another process is running ({'; '.join(holders) or 'unknown'}); "
            "each is skipped if it finishes there, resumed here if not; Ctrl-C stops waiting"
        )
        for i, outcome in zip(busy, one_pass([jobs[i] for i in busy], True), strict=True):
            outcomes[i] = outcome
    return outcomes
