"""`bench report` on a results folder made by tiny real runs: tables, marks, LaTeX, privacy and cost."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.grid.store import Store
from bench.report import best_cells, metric_table
from bench.report.frame import REAL_LABEL, load_frame
from bench.report.tables import to_latex
from tests.conftest import TESTS, TINY_PROFILE, bench

PLUGINS = [
    "--plugin",
    str(TESTS / "plugins" / "good_plugin.py"),
    "--plugin",
    str(TESTS / "plugins" / "partial_plugin.py"),
]
METRICS = "fd_domain,acc_logreg,acc_cnn_datalens"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two plugin methods (one partial) × ε 1, 10 × generator seeds 0, 1, two classifier seeds each."""
    out = tmp_path_factory.mktemp("results")
    r = bench("run", "--methods", "noisy-means,partial-means", "--eps", "1,10", "--seeds", "0,1", "--dataset",
              "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--results", str(out), "--metrics", METRICS,
              "--set", "eval.classifier_seeds=2", *PLUGINS)  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def report(results: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("reports")
    r = bench("report", "--results", str(results), "--out", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    return out, r.stdout


def test_cells_pool_generator_and_classifier_seeds(results: Path, report: tuple[Path, str]) -> None:
    out, _ = report
    df = load_frame(Store(results))
    mine = df[(df["method"] == "noisy-means") & (df["eps"] == "1") & (df["metric"] == "acc_logreg")]
    values = [v for vs in mine["values"] for v in vs]
    assert len(mine) == 2 and len(values) == 4  # 2 generator seeds × 2 classifier seeds
    table = pd.read_csv(out / "acc_logreg.csv", index_col="method")
    s = pd.Series(values)
    assert table.loc["noisy-means", "synthetic ε=1"] == f"{s.mean():.2f} ± {s.std(ddof=1):.2f} (n=4)"
    # the real-data row: one dataset row, its classifiers with the same two seeds
    assert table.loc[REAL_LABEL, "synthetic ε=∞"].endswith("(n=2)")


def test_marks_and_footnotes_everywhere(report: tuple[Path, str]) -> None:
    out, stdout = report
    assert "| partial-means† |" in stdout and "| noisy-means |" in stdout
    assert "† partial guarantee" in stdout and "‡ test-selected" in stdout
    for name in ("summary.md", "acc_cnn_datalens.md", "privacy.md"):
        text = (out / name).read_text()
        assert "partial-means†" in text and "† partial guarantee" in text, name
    assert "‡ test-selected" in (out / "acc_cnn_datalens.md").read_text()
    assert "acc_cnn_datalens‡° [datalens]" in (out / "summary.md").read_text()
    assert "° shortened protocol" in (out / "summary.md").read_text()
    assert r"$^\circ$ shortened protocol" in (out / "acc_cnn_datalens.tex").read_text()
    tex = (out / "acc_cnn_datalens.tex").read_text()
    assert r"partial-means$^\dagger$" in tex and r"$^\ddagger$ test-selected" in tex


def test_privacy_table_has_every_stage(results: Path, report: tuple[Path, str]) -> None:
    out, _ = report
    table = pd.read_csv(out / "privacy.csv")
    assert len(table) == 4 and REAL_LABEL not in set(table["method"])
    row = table[(table["method"] == "partial-means†") & (table["ε target"] == 10)].iloc[0]
    assert row["guarantee"] == "partial" and row["non-private"] == "pixel range of the private data, without noise"
    assert row["accountant"] == "rdp" and float(row["ε recomputed"]) <= 10
    assert float(row["ε claimed"]) == pytest.approx(float(row["ε recomputed"]), abs=1e-3)
    assert re.fullmatch(r"sums \(gaussian: σ=[0-9.]+, count=2\)", row["stages"])
    full = table[table["method"] == "noisy-means"]
    assert set(full["guarantee"]) == {"end-to-end"} and set(full["non-private"]) == {"—"}


def test_cost_table(report: tuple[Path, str]) -> None:
    out, _ = report
    cost = pd.read_csv(out / "cost.csv")
    row = cost[cost["method"] == "noisy-means"].iloc[0]
    assert row["runs"] == 2 and row["device"] == "cpu" and row["peak RSS [MiB]"] > 0
    assert row["score [s]"] >= 0 and row["CPU-hours/run"] > 0


def parse_tabular(tex: str) -> list[list[str]]:
    """The rows of a booktabs tabular: checks the rules, returns the cells."""
    body = tex[tex.index(r"\begin{tabular}") : tex.index(r"\end{tabular}")]
    assert body.count(r"\toprule") == body.count(r"\midrule") == body.count(r"\bottomrule") == 1
    rows = [ln.removesuffix(r" \\") for ln in body.splitlines() if ln.endswith(r" \\")]
    cols = re.search(r"\\begin\{tabular\}\{([lr]+)\}", body).group(1)
    assert all(len(split_cells(r)) == len(cols) for r in rows), "ragged table"
    return [split_cells(r) for r in rows]


def split_cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)&", row)]


def test_latex_is_booktabs_with_the_best_cell_bold(results: Path, report: tuple[Path, str]) -> None:
    out, _ = report
    rows = parse_tabular((out / "fd_domain.tex").read_text())
    header, body = rows[0], rows[1:]
    assert header[0] == "method" and r"synthetic $\varepsilon$=1" in header
    table, numbers = metric_table(load_frame(Store(results)), "fd_domain [bench-domain-cnn]")
    best = best_cells(numbers, "fd_domain")
    assert {c for _, c in best} >= {"synthetic ε=1", "synthetic ε=10"}
    for row in body:
        method = row[0].replace(r"$^\dagger$", "†")
        for col, cell in zip(table.columns, row[1:], strict=True):
            assert cell.startswith(r"\textbf{") == ((method, col) in best), (method, col, cell)
    # lower FD is better: the bold cell holds the column's smallest mean (the real row is not competing)
    col = "synthetic ε=1"
    winners = [m for m, c in best if c == col]  # ties are all bold
    assert winners and all(numbers.loc[w, col] == numbers[col].drop(REAL_LABEL).min() for w in winners)


def test_best_cells_direction() -> None:
    numbers = pd.DataFrame({"a": [1.0, 2.0, 0.5]}, index=["x", "y", REAL_LABEL])
    assert best_cells(numbers, "fd_domain") == {("x", "a")}
    assert best_cells(numbers, "acc_cnn") == {("y", "a")}


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine on this machine")
def test_latex_compiles(report: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = report
    inputs = "\n".join(rf"\input{{{p}}}" for p in sorted(out.glob("*.tex")))
    doc = tmp_path / "doc.tex"
    doc.write_text(rf"\documentclass{{article}}\usepackage{{booktabs}}\begin{{document}}{inputs}\end{{document}}")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", doc.name], cwd=tmp_path, capture_output=True)
    assert r.returncode == 0, r.stdout[-2000:]


def test_to_latex_escapes() -> None:
    t = pd.DataFrame({"m_1": ["50% & 1 ± 2 ∞"]}, index=pd.Index(["a_b"], name="method"))
    tex = to_latex(t, index=True, caption="x_y", bold=[("a_b", "m_1")])
    assert r"a\_b & \textbf{50\% \& 1 $\pm$ 2 $\infty$} \\" in tex and r"\caption{x\_y}" in tex


def test_metrics_and_format_options(results: Path, tmp_path: Path) -> None:
    r = bench("report", "--results", str(results), "--out", str(tmp_path), "--format", "tex", "--metrics",
              "acc_logreg", "--no-plots")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc_logreg.tex", "cost.tex", "privacy.tex", "summary.tex"]
    r = bench("report", "--results", str(results), "--out", str(tmp_path), "--format", "tex,pdf")
    assert r.exit_code == 2 and "unknown format 'pdf'; choose from md, csv, tex, html" in r.stderr
    r = bench("report", "--results", str(results), "--metrics", "fid")
    assert r.exit_code == 2 and "unknown metric 'fid'" in r.stderr


def test_bad_results_folders(tmp_path: Path) -> None:
    r = bench("report", "--results", str(tmp_path / "absent"))
    assert r.exit_code == 2 and "does not exist" in r.stderr
    Store(tmp_path / "empty")
    r = bench("report", "--results", str(tmp_path / "empty"))
    assert r.exit_code == 2 and "no runs in" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    future = tmp_path / "future"
    Store(future)
    import sqlite3

    with sqlite3.connect(future / "bench.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    r = bench("report", "--results", str(future))
    assert r.exit_code == 2 and "schema version 99" in r.stderr


def test_report_of_many_runs_takes_seconds(results: Path, tmp_path: Path) -> None:
    """1,000 stored runs (copies of the fixture's index rows under new keys): the whole report in seconds."""
    store = Store(tmp_path / "many")
    runs, metrics = Store(results).rows()
    import json

    for i in range(1000):
        src = runs[i % len(runs)]
        key = f"{src['key']}-copy{i}"
        fields = {k: v for k, v in src.items() if k not in ("key", "updated", "run_dir")}
        store.record_run(key, **fields | {"seed": i})
        store.record_metrics(key, {m["metric"]: json.loads(m["info"]) for m in metrics if m["key"] == src["key"]})
    t0 = time.perf_counter()
    r = bench("report", "--results", str(store.root), "--out", str(tmp_path / "rep"), "--no-plots")
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    print(f"report of 1000 runs: {seconds:.2f} s")
    assert seconds < 30


def test_stage_labels_name_the_noise_parameter() -> None:
    from bench.report.summary import _stage

    assert _stage({"name": "votes", "mechanism": "laplace", "noise_multiplier": 2.0, "count": 3}) == (
        "votes (laplace: b=2, count=3)"
    )
    dp = {"name": "d", "mechanism": "poisson_gaussian", "noise_multiplier": 1.1, "sampling_rate": 0.01, "steps": 7,
          "max_grad_norm": 1.0}  # fmt: skip
    assert _stage(dp) == "d (poisson_gaussian: σ=1.1, q=0.01, steps=7, C=1)"
