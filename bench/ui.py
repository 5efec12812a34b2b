"""Terminal display: progress bars for the grid and for each run's training (rich, on stderr)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def describe(job: Any) -> str:
    """A job of the grid in a few words: method, dataset, ε, seed."""
    return f"{job.method} {job.dataset} ε={job.epsilon:g} seed={job.seed}"


class GridUI:
    """One bar for the grid, and one for each job in progress (several at once under the Ray executor, labelled
    with where each runs). Without a terminal (logs, CI) one line per finished job, and one per started job that
    runs elsewhere; with `lines=False` none (the caller says what happened)."""

    def __init__(self, total_runs: int, *, title: str = "grid", lines: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.total, self.finished, self.lines = total_runs, 0, lines
        self.grid: TaskID = self.progress.add_task(title, total=total_runs)
        self.bars: dict[str, TaskID] = {}  # job key -> its bar
        self.where: dict[str, str] = {}  # job key -> where it runs (Ray: host, pid, GPU)

    def __enter__(self) -> GridUI:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _line(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def started(self, job: Any, where: str) -> None:
        """A job started on another process or machine (`where`)."""
        self.where[job.key] = where
        if self.progress.disable and self.lines:
            self._line(f"started {describe(job)} on {where}")

    def grid_advance(self, job: Any, outcome: str, error: str | None = None) -> None:
        """One job of the grid is over; without a terminal say so in one line, and with one too when it failed
        (with its one-line error)."""
        self.finished += 1
        self.progress.advance(self.grid)
        if self.lines and (self.progress.disable or error):
            where = f" on {w}" if (w := self.where.pop(job.key, "")) else ""
            self._line(
                f"[{self.finished}/{self.total}] {describe(job)}{where}: {outcome}" + (f" ({error})" if error else "")
            )
        if (bar := self.bars.pop(job.key, None)) is not None:
            self.progress.remove_task(bar)

    def run_callbacks(self, job: Any) -> tuple[Callable[[int, str], None], Callable[[int], None]]:
        key = job.key

        def start(total: int, description: str) -> None:
            if (bar := self.bars.pop(key, None)) is not None:
                self.progress.remove_task(bar)
            where = f" on {w}" if (w := self.where.get(key)) else ""
            self.bars[key] = self.progress.add_task(f"  {describe(job)}{where} {description}", total=total)

        def advance(n: int) -> None:
            if (bar := self.bars.get(key)) is not None and n:
                self.progress.advance(bar, n)

        return start, advance


def print_plan(specs: list[Any]) -> None:
    """--dry-run: the resolved grid, one JSON object per run (stdout)."""
    for spec in specs:
        print(json.dumps(spec.to_json(), default=str, sort_keys=True))
    console.print(f"{len(specs)} run(s) planned; nothing was run (--dry-run)")
