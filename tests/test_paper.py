"""Published numbers as data and `bench paper`: the shipped tables, a toy table reproduced by tiny real
runs on the synthetic dataset (with a reused run, a partial-guarantee plugin and an over-budget one), and
bad input as one-line errors."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import data, grid
from bench.contract import ImageDataset
from bench.data import SyntheticDataset
from bench.errors import BenchError
from bench.grid import paper_plan, registry
from bench.grid.store import Store
from bench.metrics.protocols import PROTOCOLS
from bench.report import paper
from bench.report.frame import PARTIAL_MARK, SHORTENED_MARK, TEST_SELECTED_MARK, load_frame
from bench.report.tables import tex_escape
from tests.conftest import TESTS, TINY_PROFILE, bench
from tests.test_cli import assert_one_line_error

TOY_PAPERS = """
[papers.toy-paper]
title = "A toy paper"
venue = "tests"

[[papers.toy-paper.tables]]
name = "acc"
caption = "accuracy, DataLens protocol"
methods = ["dpdm", "partial-means", "overspend", "no-such-method"]
datasets = ["synthetic", "no-such-data", "absent-data"]
eps = [1, 10]
delta = 1e-5
metrics = { acc_cnn = "acc_cnn_datalens", acc_logreg = "acc_logreg", acc_mean3 = "" }

[[papers.toy-paper.tables]]
name = "fid"
caption = "fidelity"
methods = ["no-such-method"]
extra_methods = ["dpdm"]
datasets = ["synthetic"]
eps = [10]
metrics = { fd = "fd_domain" }
"""
HEADER = "paper,method,setting,dataset,epsilon,delta,metric,protocol,source_kind,value,source\n"
TOY_ROWS = (
    HEADER
    + """toy-paper,dpdm,,synthetic,1,1e-5,acc_cnn,datalens,primary,40.0,"toy table (a)"
toy-paper,dpdm,,synthetic,10,1e-5,acc_cnn,datalens,secondary,55.5,"toy table (a), from a summary"
toy-paper,dpdm,,synthetic,10,1e-5,acc_cnn,dpdm,primary,61.0,"toy table (a), its DPDM-protocol rows"
toy-paper,dpdm,,synthetic,1,1e-5,acc_cnn,other:keras-cnn,primary,44.0,"toy table (a), another script"
toy-paper,dpdm,acc,synthetic,10,1e-5,acc_logreg,dpdm,primary,66.0,"toy table (a), accuracy-tuned row"
toy-paper,partial-means,,synthetic,10,1e-5,acc_cnn,datalens,primary,70.0,"toy table (a)"
toy-paper,overspend,,synthetic,10,1e-5,acc_cnn,datalens,primary,12.0,"toy table (a)"
toy-paper,no-such-method,,synthetic,10,1e-5,acc_cnn,datalens,primary,60.0,"toy table (a)"
toy-paper,dpdm,,no-such-data,10,1e-5,acc_cnn,datalens,primary,50.0,"toy table (a)"
toy-paper,dpdm,,absent-data,10,1e-5,acc_cnn,datalens,primary,52.0,"toy table (a)"
toy-paper,dpdm,,synthetic,10,1e-5,acc_mean3,other:max3,primary,45.0,"toy table (a)"
toy-paper,no-such-method,,synthetic,10,,fd,other:toy-fd,primary,3.5,"toy table (b)"
"""
)
PARTIAL_PLUGIN = '''
from tests.plugins.good_plugin import NoisyMeans


class PartialMeans(NoisyMeans):
    """noisy-means declared partial: stands in for a method whose guarantee does not cover the pipeline."""

    name = "partial-means"
    guarantee = "partial"
'''


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference folder holding the toy paper, and a plugin method with a partial guarantee."""
    ref = tmp_path_factory.mktemp("reference")
    (ref / "papers.toml").write_text(TOY_PAPERS)
    (ref / "published_results.csv").write_text(TOY_ROWS)
    (ref / "partial_plugin.py").write_text(PARTIAL_PLUGIN)
    return ref


class AbsentData(SyntheticDataset):
    """A dataset bench knows whose files are missing on this machine."""

    def load(self, split: str, root: Path | None = None, download: bool = False) -> ImageDataset:
        raise BenchError("absent-data: files not found in /nowhere")


@contextmanager
def toy_reference(ref: Path) -> Iterator[None]:
    """bench/reference replaced by the toy paper, and a known but absent dataset, while the block runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paper, "REFERENCE_DIR", ref)
        mp.setitem(data.DATASETS, "absent-data", AbsentData())
        yield


@pytest.fixture
def toy(toy_dir: Path) -> Iterator[Path]:
    with toy_reference(toy_dir):
        yield toy_dir


def _args(toy: Path, results: Path, *extra: str) -> list[str]:
    plugins = ["--plugin", str(toy / "partial_plugin.py"), "--plugin", str(TESTS / "plugins" / "overspend.py")]
    base = ["paper", "toy-paper", "--profile", TINY_PROFILE, "--device", "cpu", "--results", str(results)]
    return [*base, *plugins, *extra]


@pytest.fixture(scope="module")
def reproduced(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict:
    """A dpdm ε=10 run scored with acc_cnn only, then `bench paper toy-paper --run` over seeds 0 and 1."""
    results = tmp_path_factory.mktemp("paper-results")
    (spec,) = grid.plan(
        methods=["dpdm"], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None, accountant="rdp",
        profile=TINY_PROFILE, sets=[],
    )  # fmt: skip
    assert grid.Runner(Store(results), device=torch.device("cpu"), metrics=("acc_cnn",)).run(spec) == "done"
    (reused,) = (results / "runs").iterdir()
    with toy_reference(toy_dir):
        out = bench(*_args(toy_dir, results, "--run", "--seeds", "0,1", "--out", str(results / "tables")))
    return {"results": results, "reused": reused.name, "out": out}


def test_shipped_tables_load_and_cover_every_published_row() -> None:
    papers = paper.load_papers()
    rows = paper.load_published(papers)
    assert {"dpsad-eccv24", "dpdm-tmlr23"} <= set(papers)
    csv_lines = paper.REFERENCE_DIR.joinpath("published_results.csv").read_text().strip().splitlines()
    assert len(rows) == len(csv_lines) - 1
    for row in rows:
        table = paper.table_of(papers, row)
        assert row.method in table.methods and row.dataset in table.datasets and row.epsilon in table.eps
    accuracy = next(t for t in papers["dpsad-eccv24"].tables if t.name == "accuracy")
    assert accuracy.metrics == {"acc_cnn": "acc_cnn_datalens"}
    (table1,) = papers["dpdm-tmlr23"].tables
    assert table1.metrics["acc_cnn"] == "acc_cnn" and table1.delta == 1e-5


def test_published_csv_schema() -> None:
    """Every row names its protocol (ours or other:<name>), its kind of source and the source itself."""
    text = paper.REFERENCE_DIR.joinpath("published_results.csv").read_text()
    raw = list(csv.DictReader(text.splitlines()))
    assert tuple(raw[0]) == paper.COLUMNS
    ours = set(PROTOCOLS)  # every protocol we implement
    for r in raw:
        assert r["protocol"] in ours or re.fullmatch(r"other:[a-z0-9-]+", r["protocol"]), r
        assert r["source_kind"] in ("primary", "secondary"), r
        if r["source_kind"] == "primary":  # a primary source is a file at a commit of a repository, or a paper
            assert re.search(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}:\S+", r["source"]), r
    rows = paper.load_published(paper.load_papers())
    by = {(r.paper, r.method, r.setting, r.dataset, r.epsilon, r.metric): r for r in rows}
    # DPDM Table 1 from its primary source: both tuned settings, DPDM's own protocol
    t1 = [r for r in rows if r.paper == "dpdm-tmlr23" and r.method == "dpdm"]
    assert len(t1) == 2 * 2 * 3 * 4 and {r.setting for r in t1} == {"fid", "acc"}
    assert {r.protocol for r in t1} == {"dpdm"} and {r.source_kind for r in t1} == {"primary"}
    assert by["dpdm-tmlr23", "dpdm", "fid", "fmnist", 10, "fid_inception"].value == 18.6
    assert by["dpdm-tmlr23", "dpdm", "acc", "fmnist", 10, "acc_cnn"].value == 86.2
    assert by["dpdm-tmlr23", "dpdm", "fid", "mnist", 0.2, "fid_inception"].value == 61.9
    assert by["dpdm-tmlr23", "dpdm", "acc", "mnist", 0.2, "acc_cnn"].value == 86.3
    # DP-SAD: every cell secondary; its DP-DM rows are DPDM's own protocol, its own cells DataLens's
    sad = [r for r in rows if r.paper == "dpsad-eccv24"]
    assert {r.source_kind for r in sad} == {"secondary"}
    assert {r.protocol for r in sad if r.method == "dpdm"} == {"dpdm"}
    assert {r.protocol for r in sad if r.method == "dpsad" and r.metric == "acc_cnn"} == {"datalens"}
    # DPImageBench's accuracy is the best of its three classifiers: its own protocol, which we implement
    assert {r.protocol for r in rows if r.metric == "acc_max3"} == {"dpimagebench"}
    # DP-Sinkhorn's Table 1: its own classifiers and FID against the test set, not DPDM's script
    sink = [r for r in rows if r.paper == "dpsinkhorn-neurips21" and r.method in ("dpmerf", "dpsinkhorn")]
    assert len(sink) == 16 and {r.protocol for r in sink} == {"other:dp-sinkhorn"}
    assert by["dpsinkhorn-neurips21", "dpmerf", "", "fmnist", 10, "acc_logreg"].value == 75.5
    # G-PATE's and DataLens's own numbers, quoted (secondary): G-PATE's classifier runs another learning rate
    assert by["gpate-neurips21", "gpate", "", "mnist", 10, "acc_cnn"].protocol == "other:gpate-cnn"
    assert by["datalens-ccs21", "datalens", "", "mnist", 10, "acc_cnn"].protocol == "datalens"
    assert {r.source_kind for r in rows if r.paper in ("gpate-neurips21", "datalens-ccs21")} == {"secondary"}


def test_list_shows_every_paper_and_table() -> None:
    r = bench("paper", "--list")
    assert r.exit_code == 0, r.output
    for word in (
        "dpsad-eccv24",
        "dpdm-tmlr23",
        "dpsinkhorn-neurips21",
        "dpimagebench-ccs25",
        "gpate-neurips21",
        "datalens-ccs21",
        "accuracy",
        "table1",
    ):
        assert word in r.stdout


def test_dry_run_plans_only_what_we_can_produce() -> None:
    r = bench("paper", "dpsad-eccv24", "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    registered = set(registry.methods())
    specs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert specs and {s["method"] for s in specs} <= registered
    # CelebA-Gender's shape and size are known without its files (it is planned; --run says whether it loads);
    # CelebA-Hair's record count, and so its δ, needs the attribute file
    assert {s["dataset"] for s in specs} <= {"mnist", "fmnist", "celeba64-gender"}
    assert all(s["profile"] == "smoke" for s in specs)
    assert "dpsad celeba64-hair ε=1 acc_cnn: dataset not available: celeba64-hair (its record count is read" in r.stdout
    if "gswgan" not in registered:
        assert "gswgan mnist ε=1 acc_cnn: method not implemented" in r.stdout


def test_shipped_cells_say_why_they_cannot_be_produced() -> None:
    papers = paper.load_papers()
    plan = paper_plan.plan_paper(
        papers["dpdm-tmlr23"], papers, paper.load_published(papers), profile="smoke", seeds=[0]
    )
    registered = set(registry.methods())
    for cell in plan.cells:
        if cell.row.method not in registered:
            assert cell.status == paper.NOT_IMPLEMENTED and not cell.keys
        elif cell.row.protocol.startswith("other:"):  # e.g. DP-MERF's cells, copied from DP-Sinkhorn's table
            assert cell.status.startswith(f"{paper.PROTOCOL_DIFFERS} (theirs {cell.row.protocol}, ours ")
            assert not cell.keys  # nothing is run for a cell ours cannot be set beside
        else:
            assert cell.status is None and len(cell.keys) == 1
    # DataLens' accuracy cells are under its own protocol (test-selected CNN): scored as acc_cnn_datalens
    datalens = {"acc_cnn_datalens"} if "datalens" in registered else set()
    assert set(plan.metrics) == {"fid_inception", "acc_logreg", "acc_mlp", "acc_cnn"} | datalens


def test_run_reproduces_the_toy_table(reproduced: dict) -> None:
    out = reproduced["out"]
    assert out.exit_code == 1, out.output  # the over-budget cell fails, as `bench run` does
    assert re.search(r"error: run \S+ failed: over budget: ε = [\d.]+ exceeds the target", out.stderr)
    assert f"scoring {reproduced['reused']} (reused run): fd_domain, acc_logreg, acc_cnn_datalens" in out.stderr
    assert "warning: absent-data: dataset not available, its cells are skipped" in out.stderr
    assert "| absent-data | 10 | dpdm |" in out.stdout
    assert "| dataset not available: absent-data: files not found in /nowhere |" in out.stdout
    assert "## acc: accuracy, DataLens protocol (δ = 1e-05)" in out.stdout
    assert (reproduced["results"] / "tables" / "paper-toy-paper.md").read_text().strip() == out.stdout.strip()
    # the LaTeX file: one booktabs table per paper table with its cells, sources and the footnotes of its marks
    tex = (reproduced["results"] / "tables" / "paper-toy-paper.tex").read_text()
    assert tex.count(r"\begin{tabular}") == out.stdout.count("\n## ") and r"\toprule" in tex
    assert r"dataset not available: absent-data" in tex and r"$\varepsilon$" in tex
    marked = [line for line in out.stdout.splitlines() if line[:1] in paper.PAPER_FOOTNOTES]
    assert marked and all(rf"\par{{\footnotesize {tex_escape(line)}}}" in tex for line in marked)


def test_cells_hold_our_values_the_published_ones_and_their_difference(toy: Path, reproduced: dict) -> None:
    results = reproduced["results"]
    papers = paper.load_papers()
    plugins = (str(toy / "partial_plugin.py"), str(TESTS / "plugins" / "overspend.py"))
    plan = paper_plan.plan_paper(
        papers["toy-paper"], papers, paper.load_published(papers), profile=TINY_PROFILE, seeds=[0, 1], plugins=plugins
    )
    table = paper.compare(plan, Store(results))
    frame = load_frame(Store(results))
    status = {(r.table, r.method, r.epsilon, r.dataset, r.metric, r.protocol): r.status for r in table.itertuples()}
    assert status["acc", "no-such-method", 10, "synthetic", "acc_cnn", "datalens"] == paper.NOT_IMPLEMENTED
    assert status["acc", "dpdm", 10, "no-such-data", "acc_cnn", "datalens"] == paper.NO_DATASET
    assert status["acc", "dpdm", 10, "absent-data", "acc_cnn", "datalens"] == paper.NOT_RUN  # loaded only with --run
    assert status["acc", "dpdm", 10, "synthetic", "acc_mean3", "other:max3"] == paper.NO_METRIC
    assert status["acc", "overspend", 10, "synthetic", "acc_cnn", "datalens"].startswith(
        f"{paper.FAILED} (over budget: ε ="
    )
    assert status["fid", "no-such-method", 10, "synthetic", "fd", "other:toy-fd"] == paper.NOT_IMPLEMENTED
    # another protocol's cell gets no value of ours beside it, and says which protocols differ
    differs = table[table["protocol"] == "other:keras-cnn"].iloc[0]
    assert differs["status"] == "protocol differs (theirs other:keras-cnn, ours datalens)"
    assert differs["n"] == 0 and math.isnan(differs["ours_mean"]) and math.isnan(differs["diff"])
    ok = table[table["status"] == paper.OK]
    # dpdm ε = 1 and 10 (DataLens), dpdm ε = 10 (DPDM's CNN, DPDM's LogReg), partial-means, dpdm beside the fid table
    assert len(ok) == 6
    for cell in ok.itertuples():
        ours = cell.ours_metric.rstrip(TEST_SELECTED_MARK)
        assert paper.metric_protocol(ours) in (cell.protocol, None)  # the same protocol as the published cell's
        method = cell.method.rstrip(PARTIAL_MARK)
        mine = frame[
            (frame["method"] == method) & (frame["target_epsilon"] == cell.epsilon) & (frame["metric"] == ours)
        ]
        assert len(mine) == 2 == cell.n  # seeds 0 and 1
        assert cell.ours_mean == pytest.approx(mine["value"].mean())
        assert cell.ours_std == pytest.approx(mine["value"].std(ddof=1))
        if cell.table == "acc":
            assert cell.diff == pytest.approx(cell.ours_mean - cell.published)
            assert SHORTENED_MARK in cell.marks and "epochs" in cell.shortened  # the tiny profile's 2 epochs
            assert (TEST_SELECTED_MARK in cell.ours_metric) == (cell.protocol == "datalens")
        else:  # our extra method beside the table: no published value, no difference
            assert math.isnan(cell.published) and math.isnan(cell.diff)
    partial = table[table["method"] == "partial-means" + PARTIAL_MARK]
    assert len(partial) == 1 and partial["status"].iloc[0] == paper.OK
    text = reproduced["out"].stdout
    for mark in (PARTIAL_MARK, TEST_SELECTED_MARK, SHORTENED_MARK, paper.SECONDARY_MARK, paper.SETTING_MARK):
        assert f"{mark} {paper.PAPER_FOOTNOTES[mark]}" in text, mark
    dpdm10 = ok[(ok["method"] == "dpdm") & (ok["epsilon"] == 10) & (ok["protocol"] == "datalens")].iloc[0]
    assert dpdm10.marks == paper.SECONDARY_MARK + SHORTENED_MARK + TEST_SELECTED_MARK
    line = (
        f"| synthetic | 10 | dpdm | — | acc_cnn → acc_cnn_datalens{TEST_SELECTED_MARK} | datalens | "
        f"55.5{paper.SECONDARY_MARK} | {dpdm10.ours_mean:.2f}{SHORTENED_MARK} ± {dpdm10.ours_std:.2f} (n=2) | "
        f"{dpdm10['diff']:+.2f} | shortened: epochs 600→2; n_train 100000→40 |"
    )
    assert line in text
    # the same cell under DPDM's protocol is set beside our DPDM-protocol metric
    assert "| synthetic | 10 | dpdm | — | acc_cnn → acc_cnn | dpdm | 61 |" in text
    # a row published with a tuned setting our runs do not use carries ¶
    tuned = ok[ok["setting"] == "acc"].iloc[0]
    assert tuned.metric == "acc_logreg" and paper.SETTING_MARK in tuned.marks
    assert f"{tuned.ours_mean:.2f}{SHORTENED_MARK}{paper.SETTING_MARK} ±" in text
    # the CSV written by --out carries the marks, protocols and source kinds too
    written = pd.read_csv(results / "tables" / "paper-toy-paper.csv", keep_default_na=False)
    assert {"protocol", "ours_protocol", "source_kind", "marks", "shortened"} <= set(written.columns)
    assert paper.SECONDARY_MARK in set("".join(written["marks"]))


def test_the_report_compares_from_the_recorded_plan_without_planning(toy: Path, reproduced: dict) -> None:
    """`bench paper` records its plan (cells, run keys, settings) in results/papers/ID.json; the report rebuilds
    the plan from it (bench.report.paper never plans: no runner) and gets the comparison planning would give."""
    results = reproduced["results"]
    (record,) = [r for r in paper.recorded_runs(Store(results)) if r["paper"] == "toy-paper"]
    recorded = paper.recorded_plan(record)
    papers = paper.load_papers()
    planned = paper_plan.plan_paper(
        papers["toy-paper"], papers, paper.load_published(papers), profile=record["profile"], seeds=record["seeds"],
        accountant=record["accountant"], sets=record["sets"], plugins=tuple(record["plugins"]),
        data_root=record["data_root"], sweeps=record["sweeps"],
    )  # fmt: skip
    assert recorded.specs == () and planned.specs and recorded.cells == planned.cells
    assert recorded.settings == planned.settings and recorded.metrics == planned.metrics
    pd.testing.assert_frame_equal(paper.compare(recorded, Store(results)), paper.compare(planned, Store(results)))
    with pytest.raises(BenchError, match="holds no plan .* run `bench paper toy-paper` again"):
        paper.recorded_plan({k: v for k, v in record.items() if k != "plan"})


def test_without_run_the_table_comes_from_finished_runs(toy: Path, reproduced: dict) -> None:
    results = reproduced["results"]
    before = sorted(p.name for p in (results / "runs").iterdir())
    r = bench(*_args(toy, results, "--seeds", "0,1"))
    assert r.exit_code == 0, r.output  # the over-budget run is a cell of the table, not a new failure
    same = [line for line in reproduced["out"].stdout.splitlines() if "absent-data" not in line]
    assert [line for line in r.stdout.splitlines() if "absent-data" not in line] == same
    assert "| absent-data | 10 | dpdm |" in r.stdout  # data are only loaded to run: "not run" here
    assert sorted(p.name for p in (results / "runs").iterdir()) == before
    other_seed = bench(*_args(toy, results, "--seeds", "7"))
    assert other_seed.exit_code == 0, other_seed.output
    assert f"| {paper.NOT_RUN} |" in other_seed.stdout and "(n=" not in other_seed.stdout


def test_published_csv_bad_input_is_one_line() -> None:
    papers = paper.parse_papers(TOY_PAPERS)
    row = "toy-paper,dpdm,,synthetic,10,,acc_cnn,datalens,primary,1,s\n"
    cases = {
        "paper,method,dataset,eps,delta,metric,protocol,value,source\n": "columns must be",
        HEADER + row.replace(",10,", ",x,"): "line 2",
        HEADER + row.replace(",10,", ",-1,"): "epsilon must be",
        HEADER + row.replace(",10,,", ",10,2,"): "delta must be",
        HEADER + row.replace(",1,s", ",1,"): "source is empty",
        HEADER + row.replace("primary", "tertiary"): "source_kind must be one of primary, secondary",
        HEADER + row.replace("datalens", "keras"): "protocol 'keras' is neither one of ours",
        HEADER + row.replace("datalens", "other:"): "protocol 'other:' is neither",
        HEADER + row.replace("toy-paper", "nope"): "paper 'nope' is not in papers.toml",
        HEADER + row.replace(",10,", ",3,"): "no table of toy-paper",
        HEADER + row.replace(",10,,", ",10,1e-6,"): "has δ = 1e-05",
        HEADER + row * 2: "duplicate",
        HEADER + row.replace(",1,s", ",1"): "expected 11 fields",
    }
    for text, message in cases.items():
        with pytest.raises(BenchError, match=re.escape(message)) as e:
            paper.parse_published(text, papers)
        assert "\n" not in str(e.value)


def test_papers_toml_bad_input_is_one_line() -> None:
    cases = {
        "[papers.x]\ntitle = 1\n": "describes no table",
        "[other]\n": "only [papers.ID]",
        TOY_PAPERS.replace("eps = [10]", 'eps = [10]\ncolour = "red"'): "unknown key 'colour'",
        TOY_PAPERS.replace('fd = "fd_domain"', 'fd = "fid_magic"'): "'fid_magic', not one of ours",
        TOY_PAPERS.replace("eps = [10]", "eps = [0]"): "finite number > 0",
        TOY_PAPERS.replace("delta = 1e-5", "delta = 2"): "delta must be in (0, 1)",
        TOY_PAPERS.replace('name = "fid"', 'name = "acc"'): "share a name",
        "[papers.x\n": "invalid TOML",
    }
    for text, message in cases.items():
        with pytest.raises(BenchError, match=re.escape(message)) as e:
            paper.parse_papers(text)
        assert "\n" not in str(e.value)


def test_unknown_paper_lists_the_known_ones(tmp_path: Path) -> None:
    r = bench("paper", "no-such-paper", "--results", str(tmp_path))
    assert_one_line_error(r, "unknown paper 'no-such-paper'; known: dpsad-eccv24, dpdm-tmlr23")
    assert_one_line_error(bench("paper"), "give a paper id or --list")


def test_a_paper_is_named_by_its_id_without_the_venue() -> None:
    known = paper.load_papers()
    assert paper.get_paper(known, "dpimagebench").id == "dpimagebench-ccs25"
    assert paper.get_paper(known, "dpsad-eccv24").id == "dpsad-eccv24"
    two = {"dpx-a21": known["dpdm-tmlr23"], "dpx-b22": known["dpdm-tmlr23"]}
    with pytest.raises(BenchError, match=re.escape("ambiguous paper 'dpx'; it names: dpx-a21, dpx-b22")):
        paper.get_paper(two, "dpx")
    with pytest.raises(BenchError, match="unknown paper 'dpimage'"):  # a prefix must end where the venue begins
        paper.get_paper(known, "dpimage")


def test_empty_or_missing_results_folder_is_one_line(tmp_path: Path) -> None:
    if not any(c.status is None for c in _dpdm_plan().cells):
        pytest.skip("no method of the DPDM table is registered")
    assert_one_line_error(bench("paper", "dpdm-tmlr23", "--results", str(tmp_path)), f"no runs in {tmp_path}")
    missing = tmp_path / "absent"
    assert_one_line_error(bench("paper", "dpdm-tmlr23", "--results", str(missing)), "does not exist")
    assert not missing.exists()


def _dpdm_plan() -> paper.PaperPlan:
    papers = paper.load_papers()
    return paper_plan.plan_paper(
        papers["dpdm-tmlr23"], papers, paper.load_published(papers), profile="smoke", seeds=[0]
    )
