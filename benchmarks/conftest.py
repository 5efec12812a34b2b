"""Benchmark session helpers: a `ratios` log that the benchmarks fill and a summary printed at the end."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.allocator import keep_freed_memory

_RATIOS = pytest.StashKey[dict[str, dict[str, Any]]]()  # a RatioLog
_THREADS = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--threads", type=int, default=0, help="torch threads for the benchmarks (0: torch's default)")
    parser.addoption(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory for reuse, as `bench` sets it (bench.allocator); default: glibc's own",
    )


@pytest.fixture(scope="session", autouse=True)
def _threads(request: pytest.FixtureRequest) -> Any:
    threads, wanted = torch.get_num_threads(), request.config.getoption("--threads")
    if wanted:
        torch.set_num_threads(wanted)
    request.config.stash[_THREADS] = torch.get_num_threads()
    if request.config.getoption("--malloc") == "keep":
        keep_freed_memory()  # what a `bench run` process does before it trains
    yield
    torch.set_num_threads(threads)


class RatioLog(dict[str, dict[str, Any]]):
    """{case: {reference: (min_s, median_s), mode: (min_s, median_s), ...}}, shared by one session; the reference
    row is "non-private" (a DP step's) or "local" (a grid's executor)."""

    def record(self, benchmark: Any, case: str, mode: str, reference: str = "non-private") -> None:
        """Log `mode`'s (min, median) seconds under `case`; once the reference row is logged, add the ratios
        (reference time ÷ this time) to the benchmark's extra_info. Nothing under --benchmark-disable (no stats)."""
        if benchmark.stats is None:
            return
        stats = benchmark.stats.stats
        rows = self.setdefault(case, {})
        rows[mode] = (stats.min, stats.median)
        if reference in rows:
            ref_min, ref_med = rows[reference]
            benchmark.extra_info.update(ratio_min=ref_min / stats.min, ratio_median=ref_med / stats.median)


@pytest.fixture(scope="session")
def ratios(request: pytest.FixtureRequest) -> RatioLog:
    return request.config.stash.setdefault(_RATIOS, RatioLog())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    table = config.stash.get(_RATIOS, {})
    if not table:
        return
    write = terminalreporter.write_line
    write("")
    write(
        f"speed ÷ the reference's (a DP step: the non-private step of the same network and batch; a grid: the local "
        f"executor's wall time; a report: pandas' to_html of the same tables), side by side in this run "
        f"({config.stash.get(_THREADS, '?')} torch threads, malloc {config.getoption('--malloc')})"
    )
    write(f"{'case':<22} {'mode':<12} {'min ms':>8} {'median ms':>10} {'ratio(min)':>11} {'ratio(median)':>14}")
    for case, rows in table.items():
        ref = rows.get("non-private", rows.get("local", rows.get("pandas")))
        for mode, (t_min, t_med) in rows.items():
            r_min = f"{ref[0] / t_min:.2f}x" if ref else "-"
            r_med = f"{ref[1] / t_med:.2f}x" if ref else "-"
            write(f"{case:<22} {mode:<12} {t_min * 1e3:>8.1f} {t_med * 1e3:>10.1f} {r_min:>11} {r_med:>14}")
