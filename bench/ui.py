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


class GridUI:
    """One bar for the grid, one for the run in progress."""

    def __init__(self, total_runs: int) -> None:
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
        self.total, self.finished = total_runs, 0
        self.grid: TaskID = self.progress.add_task("grid", total=total_runs)
        self.current: TaskID | None = None

    def __enter__(self) -> GridUI:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def grid_advance(self, spec: Any, outcome: str, error: str | None = None) -> None:
        """One run of the grid is over; without a terminal (logs, CI) say so in one line, and with one too
        when it failed (with its one-line error)."""
        self.finished += 1
        self.progress.advance(self.grid)
        if self.progress.disable or error:
            self.progress.console.print(
                f"[{self.finished}/{self.total}] {spec.method} {spec.dataset} ε={spec.epsilon:g} "
                f"seed={spec.seed}: {outcome}" + (f" ({error})" if error else ""),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None

    def run_callbacks(self, spec: Any) -> tuple[Callable[[int, str], None], Callable[[int], None]]:
        label = f"  {spec.method} {spec.dataset} ε={spec.epsilon:g} seed={spec.seed}"

        def start(total: int, description: str) -> None:
            if self.current is not None:
                self.progress.remove_task(self.current)
            self.current = self.progress.add_task(f"{label} {description}", total=total)

        def advance(n: int) -> None:
            if self.current is not None and n:
                self.progress.advance(self.current, n)

        return start, advance


def print_plan(specs: list[Any]) -> None:
    """--dry-run: the resolved grid, one JSON object per run (stdout)."""
    for spec in specs:
        print(json.dumps(spec.to_json(), default=str, sort_keys=True))
    console.print(f"{len(specs)} run(s) planned; nothing was run (--dry-run)")
