"""Grid sweeps (`--sweep METHOD.field=v1,v2,...`): planning and keys, one-line errors at --dry-run, a tiny real
swept grid whose tables, page, plots and index carry the swept field, and `bench paper` ablation tables (the
shipped DP-SAD λ ablation, and a toy one reproduced by tiny real runs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench import data, grid
from bench.errors import BenchError
from bench.grid import paper_plan
from bench.grid.store import Store
from bench.report import best_cells, build_report, metric_table, paper, plots
from bench.report.frame import NO_VALUE, load_frame
from bench.report.tables import tex_escape
from tests.conftest import TESTS, TINY_PROFILE, bench
from tests.test_cli import assert_one_line_error
from tests.test_html import cell_texts, parse
from tests.test_paper import toy_reference

GOOD = str(TESTS / "plugins" / "good_plugin.py")
PARTIAL = str(TESTS / "plugins" / "partial_plugin.py")
PLUGINS = ["--plugin", GOOD, "--plugin", PARTIAL]
RUN = ["run", "--dataset", "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--eps", "10"]
METRICS = ["--metrics", "fd_domain,acc_logreg"]
TOY_PAPERS = """
[papers.toy-sweep]
title = "A toy ablation"
venue = "tests"

[[papers.toy-sweep.tables]]
name = "pixel-ablation"
caption = "accuracy against the pixel spread"
methods = ["noisy-means"]
datasets = ["synthetic"]
eps = [10]
delta = 1e-5
metrics = { acc_logreg = "acc_logreg" }
sweep = { field = "pixel_std", values = [10, 60] }

[[papers.toy-sweep.tables]]
name = "plain"
caption = "accuracy, no sweep"
methods = ["noisy-means"]
datasets = ["synthetic"]
eps = [1]
delta = 1e-5
metrics = { acc_logreg = "acc_logreg" }
"""
HEADER = "paper,method,setting,dataset,epsilon,delta,metric,protocol,source_kind,value,source\n"
TOY_ROWS = (
    HEADER
    + """toy-sweep,noisy-means,pixel_std=60,synthetic,10,1e-5,acc_logreg,dpdm,primary,22.0,"toy ablation, row 60"
toy-sweep,noisy-means,pixel_std=10,synthetic,10,1e-5,acc_logreg,dpdm,primary,11.0,"toy ablation, row 10"
toy-sweep,noisy-means,,synthetic,1,1e-5,acc_logreg,dpdm,primary,33.0,"toy plain table"
"""
)


def _plan(methods: list[str], sweeps: list[str] = (), sets: list[str] = (), seeds: list[int] = (0,)) -> list:
    return grid.plan(methods=methods, epsilons=[10.0], datasets=["synthetic"], seeds=list(seeds), delta=None,
                       accountant="rdp", profile=TINY_PROFILE, sets=list(sets), plugins=(GOOD,),
                       sweeps=list(sweeps))  # fmt: skip


def key_before_sweeps(spec: grid.RunSpec) -> str:
    """A run's key as bench computed it before sweeps existed (RESULT_VERSION 3): what every existing results folder
    is keyed by, so a grid without --sweep must keep it."""
    ident = {
        "v": 3, "method": spec.method, "method_version": spec.method_version, "dataset": spec.dataset,
        "epsilon": None if math.isinf(spec.epsilon) else spec.epsilon, "delta": spec.delta,
        "accountant": spec.accountant, "seed": spec.seed, "config": spec.config_json,
        "eval": {k: v for k, v in dataclasses.asdict(spec.eval).items() if k != "metrics"},
    }  # fmt: skip
    blob = json.dumps(ident, sort_keys=True, default=str)
    return (
        f"{data.file_stem(spec.method)}-{data.file_stem(spec.dataset)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    )


# ---------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------


def test_sweep_values_give_distinct_keys_and_unswept_keys_do_not_change() -> None:
    plain = _plan(["noisy-means", "dpmerf"])
    assert [s.sweep for s in plain] == [{}, {}]
    assert [s.key for s in plain] == [key_before_sweeps(s) for s in plain]
    swept = _plan(["noisy-means", "dpmerf"], ["noisy-means.pixel_std=10,30,60"])
    means = [s for s in swept if s.method == "noisy-means"]
    assert [s.sweep for s in means] == [{"pixel_std": 10.0}, {"pixel_std": 30.0}, {"pixel_std": 60.0}]
    assert [s.config_json["pixel_std"] for s in means] == [10.0, 30.0, 60.0]
    assert len({s.key for s in means}) == 3  # each value its own run
    # 30 is the default: the same config, so the same run as the unswept cell; dpmerf is not swept at all
    assert means[1].key == plain[0].key and swept[-1].key == plain[1].key and swept[-1].sweep == {}
    assert [s.key for s in swept] == [key_before_sweeps(s) for s in swept]


def test_two_sweeps_multiply_and_a_bare_field_sweeps_every_method() -> None:
    planned = _plan(["dpsad"], ["dpsad.lambda_adv=0,1,4", "T=20,30"], seeds=[0, 1])
    specs = [s for s in planned if s.method == "dpsad"]  # dpsad's grid also plans its teacher's reference rows
    got = [(s.sweep["lambda_adv"], s.sweep["T"], s.seed) for s in specs]
    assert got == [(lam, t, seed) for lam in (0.0, 1.0, 4.0) for t in (20, 30) for seed in (0, 1)]
    assert all(s.config_json[f] == s.sweep[f] for s in specs for f in ("lambda_adv", "T"))
    assert len({s.key for s in specs}) == 12
    bare = grid.plan(methods=["noisy-means", "partial-means"], epsilons=[10.0], datasets=["synthetic"], seeds=[0],
                       delta=None, accountant="rdp", profile=TINY_PROFILE, sets=[], plugins=(GOOD, PARTIAL),
                       sweeps=["pixel_std=5,7"])  # fmt: skip
    assert [(s.method, s.sweep) for s in bare] == [
        (m, {"pixel_std": v}) for m in ("noisy-means", "partial-means") for v in (5.0, 7.0)
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "noisy-means.pixel_std=10,abc"], "noisy-means.pixel_std: expected a number, got 'abc'"),
        (["--sweep", "dpmerf.gen_lr=0.1,-1"], "dpmerf: "),  # the Config's range check
        (["--sweep", "dpmerf.no_such=1,2"], "dpmerf: unknown key 'no_such'"),
        (["--sweep", "pixel_std=1,2"], "--sweep pixel_std: dpmerf has no field 'pixel_std'; sweep it for one method"),
        (["--sweep", "dpgan.lr=1,2"], "--sweep dpgan.lr: 'dpgan' is not a method of this grid"),
        (["--sweep", "noisy-means.pixel_std=1,2", "--set", "pixel_std=3"], "--set pixel_std: dpmerf has no"),
        (
            ["--sweep", "noisy-means.pixel_std=1,2", "--set", "noisy-means.pixel_std=3"],
            "--sweep pixel_std: noisy-means.pixel_std is also given by --set",
        ),
        (["--sweep", "noisy-means.pixel_std=1,1.0"], "noisy-means at pixel_std=1.0 is given twice"),
        (["--sweep", "noisy-means.pixel_std=1,,2"], "empty value"),
        (["--sweep", "noisy-means.pixel_std"], "--sweep expects key=v1,v2,..."),
        (["--sweep", "eval.n_gen=10,20"], "--sweep eval.n_gen: a sweep is over a method's fields"),
        (["--sweep", "noisy-means.pixel_std=1", "--sweep", "noisy-means.pixel_std=2"], "is given twice"),
    ],
)
def test_a_bad_sweep_is_one_line_exit_2_at_dry_run(tmp_path: Path, args: list[str], message: str) -> None:
    r = bench(*RUN, "--methods", "noisy-means,dpmerf", "--plugin", GOOD, "--results", str(tmp_path), "--dry-run",
              *args)  # fmt: skip
    assert_one_line_error(r, message)


def test_dry_run_prints_each_swept_config(tmp_path: Path) -> None:
    r = bench(*RUN, "--methods", "dpsad", "--dry-run", "--results", str(tmp_path), "--sweep",
              "dpsad.lambda_adv=0,1,4")  # fmt: skip
    assert r.exit_code == 0, r.output
    specs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    specs = [s for s in specs if s["method"] == "dpsad"]
    assert [(s["sweep"], s["config"]["lambda_adv"]) for s in specs] == [({"lambda_adv": v}, v) for v in (0.0, 1.0, 4.0)]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# A tiny real swept grid, the toy ablation paper run on it, and the report
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[dict[str, Any]]:
    """noisy-means unswept (pixel_std 30), then noisy-means × pixel_std 10, 30 beside partial-means (the 30 cell
    reused, recorded without a sweep); `bench paper toy-sweep --run` (pixel_std 10, 60 at ε = 10; a plain table at
    ε = 1), then `bench report` of everything."""
    base = tmp_path_factory.mktemp("swept")
    results, out, ref = base / "results", base / "reports", base / "reference"
    r = bench(*RUN, "--methods", "noisy-means", "--results", str(results), "--no-real", *METRICS, *PLUGINS)
    assert r.exit_code == 0, r.output
    plain = {p.name for p in (results / "runs").iterdir()}
    r = bench(*RUN, "--methods", "noisy-means,partial-means", "--results", str(results), *METRICS, *PLUGINS,
              "--sweep", "noisy-means.pixel_std=10,30")  # fmt: skip
    assert r.exit_code == 0, r.output
    ref.mkdir()
    (ref / "papers.toml").write_text(TOY_PAPERS)
    (ref / "published_results.csv").write_text(TOY_ROWS)
    with toy_reference(ref):
        paper_run = bench("paper", "toy-sweep", "--run", "--profile", TINY_PROFILE, "--device", "cpu", "--results",
                          str(results), "--out", str(base / "paper"), *PLUGINS)  # fmt: skip
        assert paper_run.exit_code == 0, paper_run.output
        rep = bench("report", "--results", str(results), "--out", str(out))
        assert rep.exit_code == 0, rep.output
    yield {"results": results, "out": out, "plain": plain, "run": r, "paper": paper_run, "ref": ref, "base": base}


def test_swept_tables_have_the_field_as_a_column_and_a_row_per_value(swept: dict[str, Any]) -> None:
    out = swept["out"]
    summary = pd.read_csv(out / "summary.csv", dtype=str, keep_default_na=False)
    assert list(summary.columns[:4]) == ["method", "pixel_std", "dataset", "ε target"]
    rows = summary[summary["ε target"] == "10"][["method", "pixel_std"]].values.tolist()
    # the reused unswept cell shows its config's value; the real-data row has none
    assert rows == [["noisy-means", "10"], ["noisy-means", "30"], ["noisy-means", "60"], ["partial-means†", "30"]]
    assert summary.loc[summary["method"] == "real data", "pixel_std"].tolist() == [NO_VALUE]
    frame = load_frame(Store(swept["results"]))
    for metric in ("fd_domain", "acc_logreg"):
        table = pd.read_csv(out / f"{metric}.csv", dtype=str, keep_default_na=False)
        assert list(table.columns[:2]) == ["method", "pixel_std"]
        for method, std, cell in table[["method", "pixel_std", "synthetic ε=10"]].values.tolist():
            if method == "real data":
                continue
            runs = frame[(frame["label"] == method) & (frame["metric"] == metric) & (frame["eps"] == "10")]
            values = [v for vs in runs[runs["sweep:pixel_std"] == std]["values"] for v in vs]
            assert len(values) == 1 and cell == f"{values[0]:.2f} (n=1)", (method, std)
        md = (out / f"{metric}.md").read_text()
        assert md.startswith("| method | pixel_std | synthetic ε=") and "| noisy-means | 10 |" in md
    # the paper's λ = 60 cell was scored with the table's metric only
    assert "| noisy-means | 60 |" in (out / "acc_logreg.md").read_text()
    # the summary's cells differ between the values (they are separate rows, not pooled)
    fd = summary.set_index(["method", "pixel_std"])["fd_domain [bench-domain-cnn]"]
    assert fd["noisy-means", "10"] != fd["noisy-means", "60"]
    for name in ("privacy", "cost"):
        other = pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)
        assert list(other.columns[:2]) == ["method", "pixel_std"]
        mine = other[(other["method"] == "noisy-means") & (other["ε target"] == "10")]
        assert mine["pixel_std"].tolist() == ["10", "30", "60"]


def test_swept_latex_bolds_the_best_row_of_the_swept_values(swept: dict[str, Any]) -> None:
    frame = load_frame(Store(swept["results"]))
    label = next(m for m in frame["metric_label"].dropna() if m.startswith("fd_domain"))
    table, numbers = metric_table(frame, label)
    assert table.index.names == ["method", "pixel_std"]
    col = "synthetic ε=10"
    generated = numbers[col].drop("real data", level=0)
    best = {row for row, c in best_cells(numbers, "fd_domain") if c == col}
    assert best == set(generated[generated == generated.min()].index) and len(best) < len(generated)
    tex = (swept["out"] / "fd_domain.tex").read_text()
    bold = {tuple(line.split(" & ")[:2]) for line in tex.splitlines() if r"\textbf" in line}
    assert bold == {(tex_escape(method), std) for method, std in best}


def test_swept_page_shows_the_column_and_each_rows_runs(swept: dict[str, Any]) -> None:
    tree = parse((swept["out"] / "index.html").read_text(encoding="utf-8"))
    tables = {t.get("data-csv"): t for t in tree.iter("table") if t.get("data-csv")}
    head, rows = cell_texts(tables["summary.csv"])
    assert head[:3] == ["method", "pixel_std", "dataset"]
    csv = pd.read_csv(swept["out"] / "summary.csv", dtype=str, keep_default_na=False)
    assert sorted(rows) == sorted(csv.values.tolist())
    # each summary row folds exactly the runs of its swept value
    bodies = tables["summary.csv"].findall("tbody")
    for body in bodies:
        method, std = ("".join(td.find("span").itertext()) for td in body.find("tr").findall("td")[:2])
        keys = {a.text for a in body.iter("a") if a.get("class") == "key"}
        assert len(keys) == 1, (method, std, keys)
        if method != "real data":
            config = json.loads((swept["results"] / "runs" / keys.pop() / "config.json").read_text())
            assert f"{config['config']['pixel_std']:g}" == std
    head, _ = cell_texts(tables["fd_domain.csv"])
    assert head[:2] == ["method", "pixel_std"]


def test_swept_plots_draw_one_line_per_method_and_value(swept: dict[str, Any]) -> None:
    frame = load_frame(Store(swept["results"]))
    mine = frame[(frame["metric"] == "acc_logreg") & (frame["label"] != "real data")]
    assert [label for label, _ in plots.lines(mine)] == [
        "noisy-means (pixel_std=10)", "noisy-means (pixel_std=30)", "noisy-means (pixel_std=60)",
        "partial-means† (pixel_std=30)",
    ]  # fmt: skip
    for _, rows in plots.lines(mine):
        assert rows["sweep:pixel_std"].nunique() == 1 and rows["label"].nunique() == 1
    assert (swept["out"] / "plots" / "metric_vs_eps_acc_logreg.png").is_file()


def test_the_sweep_is_in_config_json_and_the_index_and_survives_a_rebuild(swept: dict[str, Any], tmp_path) -> None:
    results = tmp_path / "results"
    shutil.copytree(swept["results"], results)
    runs = {r["key"]: r for r in Store(results).rows()[0]}
    recorded = {}
    for key, row in runs.items():
        config = json.loads((results / "runs" / key / "config.json").read_text())
        if config.get("sweep"):
            assert json.loads(row["sweep"]) == config["sweep"] == {"pixel_std": config["config"]["pixel_std"]}
            recorded[key] = config["sweep"]["pixel_std"]
        else:  # the unswept grid's cell (reused by the sweep), the plain paper table's, the real-data row
            assert row["sweep"] is None
    assert sorted(recorded.values()) == [10.0, 60.0] and not set(recorded) & swept["plain"]
    # an index of before sweeps (no `sweep` column) opens, gains the column, and is rebuilt with the sweeps
    db = sqlite3.connect(results / "bench.sqlite")
    db.execute("ALTER TABLE runs DROP COLUMN sweep")
    db.commit()
    db.close()
    store = Store(results)
    assert {r["sweep"] for r in store.rows()[0]} == {None}
    store.rebuild()
    assert {r["key"]: r["sweep"] for r in store.rows()[0]} == {k: r["sweep"] for k, r in runs.items()}


def test_a_report_without_swept_runs_has_no_sweep_column(swept: dict[str, Any]) -> None:
    lines: list[str] = []
    summary = build_report(Store(swept["results"]), out=None, keys=swept["plain"], echo=lines.append)
    assert list(summary.columns[:3]) == ["method", "dataset", "ε target"] and "pixel_std" not in summary.columns
    assert swept["run"].stdout.startswith("| method | pixel_std | dataset |")


# ---------------------------------------------------------------------------------------------------
# Paper ablation tables
# ---------------------------------------------------------------------------------------------------


def test_the_dpsad_lambda_ablation_plans_one_cell_per_lambda() -> None:
    papers = paper.load_papers()
    plan = paper_plan.plan_paper(
        papers["dpsad-eccv24"], papers, paper.load_published(papers), profile="smoke", seeds=[0]
    )
    cells = [c for c in plan.cells if c.table.name == "lambda-ablation"]
    published = {c.sweep["lambda_adv"]: c.row.value for c in cells if c.row.value is not None}
    assert published == {0: 14.63, 0.2: 13.41, 0.5: 12.38, 1: 11.68, 2: 12.11, 4: 13.55}
    theirs = [c for c in cells if c.row.value is not None]
    assert {c.row.protocol for c in theirs} == {"other:unstated"} and {c.row.source_kind for c in theirs} == {
        "secondary"
    }
    assert all(c.status.startswith(paper.PROTOCOL_DIFFERS) and not c.keys for c in theirs)
    ours = [c for c in cells if c.row.value is None]
    specs = {s.key: s for s in plan.specs}
    assert [c.sweep["lambda_adv"] for c in ours] == [0.0, 0.2, 0.5, 1.0, 2.0, 4.0]
    for c in ours:
        (key,) = c.keys
        assert c.status is None and specs[key].method == "dpsad" and specs[key].dataset == "celeba64-gender"
        assert specs[key].epsilon == 10 and specs[key].config_json["lambda_adv"] == c.sweep["lambda_adv"]
    assert len({c.keys for c in ours}) == 6
    # each λ's published row sits beside our cell of the same λ
    order = [(c.sweep["lambda_adv"], c.row.value is None) for c in cells]
    assert order == [(v, mine) for v in (0, 0.2, 0.5, 1, 2, 4) for mine in (False, True)]


def test_bench_paper_lists_and_dry_runs_the_ablation() -> None:
    listed = bench("paper", "--list")
    assert listed.exit_code == 0, listed.output
    assert "lambda-ablation" in listed.stdout and "lambda_adv ∈ {0, 0.2, 0.5, 1, 2, 4}; 6 published" in listed.stdout
    r = bench("paper", "dpsad-eccv24", "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    specs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    celeba = {s["config"]["lambda_adv"] for s in specs if s["method"] == "dpsad" and s["dataset"] == "celeba64-gender"
              and s["epsilon"] == 10}  # fmt: skip
    assert celeba == {0.0, 0.2, 0.5, 1.0, 2.0, 4.0}
    assert "lambda-ablation: dpsad lambda_adv=4 celeba64-gender ε=10 fid_inception: protocol differs" in r.stdout


def test_the_toy_ablation_places_published_values_by_swept_value(swept: dict[str, Any]) -> None:
    with toy_reference(swept["ref"]):
        papers = paper.load_papers()
        plan = paper_plan.plan_paper(papers["toy-sweep"], papers, paper.load_published(papers), profile=TINY_PROFILE,
                                seeds=[0], plugins=(GOOD,))  # fmt: skip
    table = paper.compare(plan, Store(swept["results"]))
    frame = load_frame(Store(swept["results"]))
    ablation = table[table["table"] == "pixel-ablation"]
    assert ablation["sweep:pixel_std"].tolist() == ["10", "60"]  # by value, not in the CSV's order
    assert ablation["published"].tolist() == [11.0, 22.0]
    for row in ablation.itertuples():
        mine = frame[(frame["method"] == "noisy-means") & (frame["metric"] == "acc_logreg") & (frame["eps"] == "10")]
        (value,) = [v for vs in mine[mine["sweep:pixel_std"] == row[ablation.columns.get_loc("sweep:pixel_std") + 1]]
                    ["values"] for v in vs]  # fmt: skip
        assert row.status == paper.OK and row.n == 1 and row.ours_mean == pytest.approx(value)
        assert row.diff == pytest.approx(value - row.published)
    assert table[table["table"] == "plain"]["sweep:pixel_std"].tolist() == [""]
    text = swept["paper"].stdout
    assert "| dataset | ε | method | pixel_std | setting | metric |" in text
    assert re.search(r"\| synthetic \| 10 \| noisy-means \| 60 \| — \| acc_logreg → acc_logreg \| dpdm \| 22 \|", text)
    # the plain table keeps its columns
    assert "| dataset | ε | method | setting | metric |" in text
    # `bench report` compares the recorded paper again: its tables and the page show the swept column
    md = (swept["out"] / "paper-toy-sweep.md").read_text()
    assert "| dataset | ε | method | pixel_std | setting |" in md
    tree = parse((swept["out"] / "index.html").read_text(encoding="utf-8"))
    pages = [t for t in tree.iter("table") if t.get("data-csv") == "paper-toy-sweep.csv"]
    head, rows = cell_texts(pages[0])
    assert head[:4] == ["dataset", "ε", "method", "pixel_std"] and [r[3] for r in rows] == ["10", "60"]


def test_bench_paper_sweep_multiplies_cells_and_a_clash_with_the_table_is_said(swept: dict[str, Any]) -> None:
    with toy_reference(swept["ref"]):
        papers = paper.load_papers()
        rows = paper.load_published(papers)
        plan = paper_plan.plan_paper(papers["toy-sweep"], papers, rows, profile=TINY_PROFILE, seeds=[0],
                                     plugins=(GOOD,), sweeps=["noisy-means.pixel_std=5,6"])  # fmt: skip
        plain = [c for c in plan.cells if c.table.name == "plain"]
        assert [c.sweep for c in plain] == [{"pixel_std": 5.0}, {"pixel_std": 6.0}] and len(
            {c.keys for c in plain}
        ) == 2
        clash = [c for c in plan.cells if c.table.name == "pixel-ablation"]
        assert {c.status for c in clash} == {paper.SWEEP_CONFLICT.format(field="pixel_std")}
        assert not any(c.keys for c in clash)
        r = bench("paper", "toy-sweep", "--dry-run", "--profile", TINY_PROFILE, "--device", "cpu", "--plugin", GOOD,
                  "--sweep", "noisy-means.pixel_std=abc")  # fmt: skip
        assert_one_line_error(r, "noisy-means.pixel_std: expected a number, got 'abc'")


def test_sweep_tables_bad_input_is_one_line() -> None:
    papers = paper.parse_papers(TOY_PAPERS)
    row = "toy-sweep,noisy-means,pixel_std=10,synthetic,10,1e-5,acc_logreg,dpdm,primary,1,s\n"
    cases = {
        HEADER + row.replace("pixel_std=10", "pixel_std=20"): "pixel_std=20 is not a value table toy-sweep/",
        HEADER + row.replace("pixel_std=10", "lr=10"): "no table of toy-sweep in papers.toml has this method",
        HEADER + row.replace("pixel_std=10,synthetic,10", "pixel_std=10,synthetic,1"): "and sweeps pixel_std",
        HEADER + row.replace("pixel_std=10", ""): "without a sweep",
        HEADER + row * 2: "duplicate",
    }
    for text, message in cases.items():
        with pytest.raises(BenchError, match=re.escape(message)) as e:
            paper.parse_published(text, papers)
        assert "\n" not in str(e.value)
    toml = {
        TOY_PAPERS.replace("values = [10, 60]", "values = []"): "sweep values must be a non-empty list",
        TOY_PAPERS.replace("values = [10, 60]", "values = [10, 10]"): "sweep values must differ",
        TOY_PAPERS.replace('field = "pixel_std", ', ""): "sweep must be { field = NAME",
        TOY_PAPERS.replace('field = "pixel_std"', 'field = "a b"'): "sweep field must be a config field name",
    }
    for text, message in toml.items():
        with pytest.raises(BenchError, match=re.escape(message)) as e:
            paper.parse_papers(text)
        assert "\n" not in str(e.value)
