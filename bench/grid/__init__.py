"""The grid: plan the cells of a benchmark, execute them, and keep what they produce.

    planning.py     methods × datasets × ε × seeds × sweeps -> RunSpecs (typed budget, checked config), each keyed
    runner.py       one cell: fit -> verify ε -> sample -> score -> store (the Runner); a dataset's real-data row
    executors/      who runs the cells: local.py (this process, one after another) and ray.py (Ray tasks), side by side
    run.py          run_grid: check the data, run the cells through an executor, then the real-data rows
    store.py        the results folder: run folders and the SQLite index
    registry.py     the methods: built-ins, `bench.methods` entry points and --plugin files
    shared.py       stages trained once and reused by many cells (dpsad's teacher)
    curve.py        quality against compute: snapshots along a fit, scored afterwards
    paper_plan.py   `bench paper`: a paper's cells planned as `bench run` would, run, and the plan recorded
    profiles/       the named profiles (smoke, cpu, demo, gpu-short, paper)

The report (bench.report) reads the store and never imports the planning or execution modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.grid.executors import Executor, LocalExecutor, make_executor
    from bench.grid.planning import (
        REAL,
        RESULT_VERSION,
        EvalPlan,
        Job,
        RealRow,
        RunSpec,
        plan,
        real_key,
        spec_from_json,
        with_reference_rows,
    )
    from bench.grid.run import GridOutcome, run_grid
    from bench.grid.runner import Runner, RunProgress, resolve_device

# name -> the module that defines it, imported at first use: `from bench.grid.store import Store` (the report's one
# import of the grid) then loads the store alone, not the planner, the runner and the executors
_EXPORTS = {
    **dict.fromkeys(("Executor", "LocalExecutor", "make_executor"), "bench.grid.executors"),
    **dict.fromkeys(
        (
            "REAL",
            "RESULT_VERSION",
            "EvalPlan",
            "Job",
            "RealRow",
            "RunSpec",
            "plan",
            "real_key",
            "spec_from_json",
            "with_reference_rows",
        ),
        "bench.grid.planning",
    ),  # fmt: skip
    **dict.fromkeys(("GridOutcome", "run_grid"), "bench.grid.run"),
    **dict.fromkeys(("RunProgress", "Runner", "resolve_device"), "bench.grid.runner"),
}

__all__ = [
    "REAL",
    "RESULT_VERSION",
    "EvalPlan",
    "Executor",
    "GridOutcome",
    "Job",
    "LocalExecutor",
    "RealRow",
    "RunProgress",
    "RunSpec",
    "Runner",
    "make_executor",
    "plan",
    "real_key",
    "resolve_device",
    "run_grid",
    "spec_from_json",
    "with_reference_rows",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bench.grid' has no attribute {name!r}")
