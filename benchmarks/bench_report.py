"""The HTML report of a results folder of 1,000 runs: our page against pandas' plain `DataFrame.to_html` of the
same tables, side by side.

    .venv/bin/pytest benchmarks/bench_report.py --benchmark-only -q

The folder: 10 methods × 10 ε × 10 seeds on `synthetic` (tests/many_runs.py writes the run folders and indexes
them; no training), so 100 summary rows with 10 runs folded under each. Both sides start from the index:
- pandas (the reference): `load_frame`, the report's summary, per-metric and cost tables, each `to_html()`, one
  file;
- html: `build_report(formats=("html",), plots=False)`: the same tables plus every run's card (its privacy.json
  read, links to its files) through the Jinja2 template;
- all formats: Markdown, CSV, LaTeX and the page, as `bench report --no-plots` writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.grid.store import Store
from bench.report import build_report, cost_table, metric_table, summary_table
from bench.report.frame import load_frame
from tests.many_runs import write_runs

CASE = "report of 1,000 runs"
EPS = [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("many")
    return write_runs(root / "results", methods=[f"m{i}" for i in range(10)], epsilons=EPS, seeds=list(range(10)))


def pandas_page(store: Store, out: Path) -> None:
    df = load_frame(store)
    parts = [summary_table(df).to_html()]
    parts += [metric_table(df, m)[0].to_html() for m in sorted(df["metric_label"].dropna().unique())]
    parts.append(cost_table(df).to_html())
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.html").write_text("\n".join(parts), encoding="utf-8")


@pytest.mark.parametrize("mode", ["pandas", "html", "all formats"])  # the reference first: ratios need it
def test_report_time(
    benchmark: Any, ratios: dict[str, dict[str, Any]], store: Store, tmp_path: Path, mode: str
) -> None:
    def run() -> None:
        if mode == "pandas":
            pandas_page(store, tmp_path / "pandas")
        else:
            formats = ("html",) if mode == "html" else ("md", "csv", "tex", "html")
            build_report(store, out=tmp_path / "reports", keys=None, echo=lambda line: None, formats=formats)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(case=CASE, mode=mode, runs=1000)
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    ratios.setdefault(CASE, {})[mode] = (stats.min, stats.median)
