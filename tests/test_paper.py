"""Published numbers as data and `bench paper`: the shipped tables, a toy table reproduced by tiny real
runs on the synthetic dataset (with a reused run, a partial-guarantee plugin and an over-budget one), and
bad input as one-line errors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bench import data, paper, registry, runner
from bench.contract import ImageDataset
from bench.data import SyntheticDataset
from bench.errors import BenchError
from bench.report import FOOTNOTES, PARTIAL_MARK, TEST_SELECTED_MARK, load_frame
from bench.store import Store
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
protocol = "datalens"
test_selected = true
metrics = { acc_cnn = "acc_cnn_datalens", acc_mean3 = "" }

[[papers.toy-paper.tables]]
name = "fid"
caption = "fidelity"
methods = ["no-such-method"]
extra_methods = ["dpdm"]
datasets = ["synthetic"]
eps = [10]
protocol = ""
metrics = { fd = "fd_domain" }
"""
TOY_ROWS = """paper,method,dataset,epsilon,delta,metric,protocol,value,source
toy-paper,dpdm,synthetic,1,1e-5,acc_cnn,datalens,40.0,"toy table (a)"
toy-paper,dpdm,synthetic,10,1e-5,acc_cnn,datalens,55.5,"toy table (a)"
toy-paper,partial-means,synthetic,10,1e-5,acc_cnn,datalens,70.0,"toy table (a)"
toy-paper,overspend,synthetic,10,1e-5,acc_cnn,datalens,12.0,"toy table (a)"
toy-paper,no-such-method,synthetic,10,1e-5,acc_cnn,datalens,60.0,"toy table (a)"
toy-paper,dpdm,no-such-data,10,1e-5,acc_cnn,datalens,50.0,"toy table (a)"
toy-paper,dpdm,absent-data,10,1e-5,acc_cnn,datalens,52.0,"toy table (a)"
toy-paper,dpdm,synthetic,10,1e-5,acc_mean3,datalens,45.0,"toy table (a)"
toy-paper,no-such-method,synthetic,10,,fd,,3.5,"toy table (b)"
"""
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
    (spec,) = runner.plan(
        methods=["dpdm"], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None, accountant="rdp",
        profile=TINY_PROFILE, sets=[],
    )  # fmt: skip
    assert runner.Runner(Store(results), device=torch.device("cpu"), metrics=("acc_cnn",)).run(spec) == "done"
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
    assert accuracy.metrics == {"acc_cnn": "acc_cnn_datalens"} and accuracy.test_selected
    (table1,) = papers["dpdm-tmlr23"].tables
    assert table1.metrics["acc_cnn"] == "acc_cnn" and table1.delta == 1e-5


def test_shipped_copy_matches_the_shared_reference() -> None:
    shared = Path(__file__).parents[2] / "shared" / "reference" / "published_results.csv"
    if not shared.is_file():
        pytest.skip("no shared reference folder next to the checkout")
    assert paper.REFERENCE_DIR.joinpath("published_results.csv").read_text() == shared.read_text()


def test_list_shows_every_paper_and_table() -> None:
    r = bench("paper", "--list")
    assert r.exit_code == 0, r.output
    for word in ("dpsad-eccv24", "dpdm-tmlr23", "dpimagebench-ccs25", "accuracy", "celeba64", "table1"):
        assert word in r.stdout


def test_dry_run_plans_only_what_we_can_produce() -> None:
    r = bench("paper", "dpsad-eccv24", "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    registered = set(registry.methods())
    specs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert specs and {s["method"] for s in specs} <= registered
    assert {s["dataset"] for s in specs} <= {"mnist", "fmnist"}
    assert all(s["profile"] == "smoke" for s in specs)
    assert "celeba64 ε=10 fid_inception: dataset not available" in r.stdout
    if "gswgan" not in registered:
        assert "gswgan mnist ε=1 acc_cnn: method not implemented" in r.stdout


def test_shipped_cells_say_why_they_cannot_be_produced() -> None:
    papers = paper.load_papers()
    plan = paper.plan_paper(papers["dpdm-tmlr23"], papers, paper.load_published(papers), profile="smoke", seeds=[0])
    registered = set(registry.methods())
    for cell in plan.cells:
        if cell.row.method not in registered:
            assert cell.status == paper.NOT_IMPLEMENTED and not cell.keys
        else:
            assert cell.status is None and len(cell.keys) == 1
    assert set(plan.metrics) == {"fid_inception", "acc_logreg", "acc_mlp", "acc_cnn"}


def test_run_reproduces_the_toy_table(reproduced: dict) -> None:
    out = reproduced["out"]
    assert out.exit_code == 1, out.output  # the over-budget cell fails, as `bench run` does
    assert "exceeded its privacy budget" in out.stderr
    assert f"scoring {reproduced['reused']} (reused run): fd_domain, acc_cnn_datalens" in out.stderr
    assert "warning: absent-data: dataset not available, its cells are skipped" in out.stderr
    assert "| absent-data | 10 | dpdm |" in out.stdout
    assert "| dataset not available: absent-data: files not found in /nowhere |" in out.stdout
    assert "## acc: accuracy, DataLens protocol (δ = 1e-05)" in out.stdout
    assert (reproduced["results"] / "tables" / "paper-toy-paper.md").read_text().strip() == out.stdout.strip()


def test_cells_hold_our_values_the_published_ones_and_their_difference(toy: Path, reproduced: dict) -> None:
    results = reproduced["results"]
    papers = paper.load_papers()
    plugins = (str(toy / "partial_plugin.py"), str(TESTS / "plugins" / "overspend.py"))
    plan = paper.plan_paper(
        papers["toy-paper"], papers, paper.load_published(papers), profile=TINY_PROFILE, seeds=[0, 1], plugins=plugins
    )
    table = paper.compare(plan, Store(results))
    frame = load_frame(Store(results))
    status = {(r.table, r.method, r.epsilon, r.dataset, r.metric): r.status for r in table.itertuples()}
    assert status["acc", "no-such-method", 10, "synthetic", "acc_cnn"] == paper.NOT_IMPLEMENTED
    assert status["acc", "dpdm", 10, "no-such-data", "acc_cnn"] == paper.NO_DATASET
    assert status["acc", "dpdm", 10, "absent-data", "acc_cnn"] == paper.NOT_RUN  # loaded only with --run
    assert status["acc", "dpdm", 10, "synthetic", "acc_mean3"] == paper.NO_METRIC
    assert status["acc", "overspend", 10, "synthetic", "acc_cnn"] == paper.FAILED
    assert status["fid", "no-such-method", 10, "synthetic", "fd"] == paper.NOT_IMPLEMENTED
    ok = table[table["status"] == paper.OK]
    assert len(ok) == 4  # dpdm ε = 1 and 10, partial-means, and dpdm beside the fid table
    for cell in ok.itertuples():
        ours = "acc_cnn_datalens" if cell.table == "acc" else "fd_domain"
        method = cell.method.rstrip(PARTIAL_MARK)
        mine = frame[
            (frame["method"] == method) & (frame["target_epsilon"] == cell.epsilon) & (frame["metric"] == ours)
        ]
        assert len(mine) == 2 == cell.n  # seeds 0 and 1
        assert cell.ours_mean == pytest.approx(mine["value"].mean())
        assert cell.ours_std == pytest.approx(mine["value"].std(ddof=1))
        if cell.table == "acc":
            assert cell.diff == pytest.approx(cell.ours_mean - cell.published)
            assert cell.ours_metric == "acc_cnn_datalens" + TEST_SELECTED_MARK
        else:  # our extra method beside the table: no published value, no difference
            assert math.isnan(cell.published) and math.isnan(cell.diff)
    partial = table[table["method"] == "partial-means" + PARTIAL_MARK]
    assert len(partial) == 1 and partial["status"].iloc[0] == paper.OK
    text = reproduced["out"].stdout
    assert f"{PARTIAL_MARK} {FOOTNOTES[PARTIAL_MARK]}" in text
    assert f"{TEST_SELECTED_MARK} {FOOTNOTES[TEST_SELECTED_MARK]}" in text
    dpdm10 = ok[(ok["method"] == "dpdm") & (ok["epsilon"] == 10) & (ok["table"] == "acc")].iloc[0]
    line = f"| synthetic | 10 | dpdm | acc_cnn → acc_cnn_datalens{TEST_SELECTED_MARK} | 55.5 |"
    assert f"{line} {dpdm10.ours_mean:.2f} ± {dpdm10.ours_std:.2f} (n=2) | {dpdm10['diff']:+.2f} |" in text


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
    header = "paper,method,dataset,epsilon,delta,metric,protocol,value,source\n"
    cases = {
        "paper,method,dataset,eps,delta,metric,protocol,value,source\n": "columns must be",
        header + "toy-paper,dpdm,synthetic,x,,acc_cnn,datalens,1,s\n": "line 2",
        header + "toy-paper,dpdm,synthetic,-1,,acc_cnn,datalens,1,s\n": "epsilon must be",
        header + "toy-paper,dpdm,synthetic,10,2,acc_cnn,datalens,1,s\n": "delta must be",
        header + "toy-paper,dpdm,synthetic,10,,acc_cnn,datalens,1,\n": "source is empty",
        header + "nope,dpdm,synthetic,10,,acc_cnn,datalens,1,s\n": "paper 'nope' is not in papers.toml",
        header + "toy-paper,dpdm,synthetic,3,,acc_cnn,datalens,1,s\n": "no table of toy-paper",
        header + "toy-paper,dpdm,synthetic,10,1e-6,acc_cnn,datalens,1,s\n": "has δ = 1e-05",
        header + "toy-paper,dpdm,synthetic,10,,acc_cnn,datalens,1,s\n" * 2: "duplicate",
        header + "toy-paper,dpdm,synthetic,10,,acc_cnn,datalens,1\n": "expected 9 fields",
    }
    for text, message in cases.items():
        with pytest.raises(BenchError, match=re.escape(message)) as e:
            paper.parse_published(text, papers)
        assert "\n" not in str(e.value)


def test_papers_toml_bad_input_is_one_line() -> None:
    cases = {
        "[papers.x]\ntitle = 1\n": "describes no table",
        "[other]\n": "only [papers.ID]",
        TOY_PAPERS.replace('protocol = ""', 'protocol = ""\ncolour = "red"'): "unknown key 'colour'",
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


def test_empty_or_missing_results_folder_is_one_line(tmp_path: Path) -> None:
    if not any(c.status is None for c in _dpdm_plan().cells):
        pytest.skip("no method of the DPDM table is registered")
    assert_one_line_error(bench("paper", "dpdm-tmlr23", "--results", str(tmp_path)), f"no runs in {tmp_path}")
    missing = tmp_path / "absent"
    assert_one_line_error(bench("paper", "dpdm-tmlr23", "--results", str(missing)), "does not exist")
    assert not missing.exists()


def _dpdm_plan() -> paper.PaperPlan:
    papers = paper.load_papers()
    return paper.plan_paper(papers["dpdm-tmlr23"], papers, paper.load_published(papers), profile="smoke", seeds=[0])
