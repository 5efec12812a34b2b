"""A grid's wall time: the Ray executor with 2 workers against the local executor, the same 4 cells.

    .venv/bin/pytest benchmarks/bench_executors.py --benchmark-only -q

The cells: dpdm at the test suite's tiny profile on `synthetic` (2,000 records of 1×16×16) with 2 epochs
(62 DP-SGD steps), ε ∈ {1, 10} × seeds {0, 1}, scored on fd_domain; one torch thread per cell (the local
executor sets one in this process; Ray's tasks reserve --cpus-per-run 1 on a local instance of 2 CPUs). The
Ray instance is started once before the rounds (its start-up, about 4 s, is not in the times); a worker's
first task pays its imports and data loading (in the times, as in a real grid). Each round runs the grid in
a fresh results folder. On 2 cores the ideal ratio is 2×.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from bench import grid as harness
from bench.grid.executors.ray import RayExecutor
from bench.grid.store import Store

TINY = str(Path(__file__).parents[1] / "tests" / "profiles" / "tiny.toml")
CASE = "grid of 4 dpdm cells"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize("executor", ["local", "ray"])  # the reference first: ratios need it
def test_grid_wall_time(
    benchmark: Any, ratios: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory, local_ray: None,
    executor: str,
) -> None:  # fmt: skip
    specs = harness.plan(methods=["dpdm"], epsilons=[1.0, 10.0], datasets=["synthetic"], seeds=[0, 1], delta=None,
                        accountant="rdp", profile=TINY, sets=["dpdm.epochs=2"])  # fmt: skip

    def fresh() -> tuple[tuple[harness.Runner], dict[str, Any]]:
        store = Store(tmp_path_factory.mktemp(executor))
        return (harness.Runner(store, device=torch.device("cpu"), metrics=("fd_domain",)),), {}

    def grid(r: harness.Runner) -> None:
        ex = RayExecutor(cpus_per_run=1, device="cpu") if executor == "ray" else harness.LocalExecutor()
        with ex:
            outcome = harness.run_grid(r, specs, real=False, executor=ex)
        assert outcome.count("done") == 4, outcome.errors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the local executor's cells: one thread each, as each Ray task's
    try:
        benchmark.pedantic(grid, setup=fresh, rounds=2, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(case=CASE, executor=executor, cells=len(specs))
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    rows = ratios.setdefault(CASE, {})
    rows[executor] = (stats.min, stats.median)
    if "local" in rows and executor != "local":
        ref_min, ref_med = rows["local"]
        benchmark.extra_info.update(speedup_min=ref_min / stats.min, speedup_median=ref_med / stats.median)
