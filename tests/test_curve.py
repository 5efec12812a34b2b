"""Quality against compute (`--set eval.curve=N`, bench.grid.curve): snapshots along each fit, scored after the privacy
check, each from its own snapshot; curve.json, the index and its rebuild; a resumed fit's points and seconds; the
report's figures, curves.csv and page section; the settings' checks and the run keys of plans without a curve."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import bench.metrics as bench_metrics
from bench import grid
from bench.grid import curve, runner
from bench.grid.store import Store, load_torch
from bench.privacy import BudgetExceeded
from bench.report import build_report
from tests.conftest import TESTS, TINY_PROFILE, bench

STAMP = str(TESTS / "plugins" / "step_stamp.py")
GOOD = str(TESTS / "plugins" / "good_plugin.py")
CPU = torch.device("cpu")
CURVE = ["eval.curve=4", "eval.curve_n=20", "eval.curve_metrics=['fd_domain']"]


def stamp_spec(*sets: str) -> grid.RunSpec:
    (spec,) = grid.plan(methods=["step-stamp"], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None,
                          accountant="rdp", profile=TINY_PROFILE, sets=[*CURVE, *sets], plugins=(STAMP,))  # fmt: skip
    return spec


def stamp_runner(results: Path) -> grid.Runner:
    return grid.Runner(Store(results), device=CPU, plugins=(STAMP,), metrics=("fd_domain",), checkpoint_every_s=0)


@pytest.fixture(scope="module")
def stamped(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """One step-stamp run (24 steps, a curve of 4 points on 20 samples), every evaluate() call seen: the number of
    images and the steps stamped on them."""
    results = tmp_path_factory.mktemp("curve")
    seen: list[tuple[int, list[int]]] = []
    evaluate = bench_metrics.evaluate

    def spy(images: torch.Tensor, labels: Any, **kw: Any) -> Any:
        seen.append((len(images), sorted(set(images[:, 0, 0, 0].tolist()))))
        return evaluate(images, labels, **kw)

    spec = stamp_spec("step_s=0.005")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_metrics, "evaluate", spy)
        assert stamp_runner(results).run(spec) == "done"
    return {"results": results, "spec": spec, "run_dir": results / "runs" / spec.key, "seen": seen}


def test_points_are_evenly_spaced_and_end_with_the_fit() -> None:
    assert curve.points(24, 4) == [6, 12, 18, 24]
    assert curve.points(117, 8) == [15, 29, 44, 59, 73, 88, 102, 117]
    assert curve.points(3, 8) == [1, 2, 3]  # a fit shorter than N: each unit once, none at 0


def test_each_point_is_scored_from_the_snapshot_of_its_own_step(stamped: dict[str, Any]) -> None:
    """The issue's test: every sample of a point carries the step of the model that drew it."""
    points = curve.read_points(stamped["run_dir"])
    assert [p["units"] for p in points] == [6, 12, 18, 24] and {p["total"] for p in points} == {24}
    curve_calls = [steps for n, steps in stamped["seen"] if n == 20]
    assert curve_calls == [[6], [12], [18], [24]]
    assert [steps for n, steps in stamped["seen"] if n == 40] == [[24]]  # the run's own samples: the final model


def test_points_land_in_curve_json_and_the_index_and_survive_a_rebuild(stamped: dict[str, Any]) -> None:
    run_dir, store = stamped["run_dir"], Store(stamped["results"])
    doc = json.loads((run_dir / "curve.json").read_text())
    assert doc["points_requested"] == 4 and doc["n_samples"] == 20 and doc["metrics"] == ["fd_domain"]
    for p in doc["points"]:
        assert p["n_samples"] == 20 and p["offset_s"] == 0.0 and p["progress"] == "step-stamp steps"
        assert p["metrics"]["fd_domain"]["n_gen"] == 20  # the smaller sample, recorded as such
    assert not (run_dir / "curve").exists()  # each snapshot is deleted once its point is scored
    rows = [(r["units"], r["metric"], r["value"], r["n_samples"], r["seconds"]) for r in store.curve_rows()]
    assert rows == [(p["units"], "fd_domain", p["metrics"]["fd_domain"]["value"], 20, p["seconds"])
                    for p in doc["points"]]  # fmt: skip
    assert store.rebuild() == 1
    assert [(r["units"], r["metric"], r["value"], r["n_samples"], r["seconds"]) for r in store.curve_rows()] == rows


def test_an_index_from_before_curves_opens_and_rebuilds_them(stamped: dict[str, Any], tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "runs").mkdir(parents=True)
    with sqlite3.connect(old / "bench.sqlite") as db:  # the schema as it was: no curve table
        db.executescript("CREATE TABLE runs (key TEXT PRIMARY KEY, method TEXT, dataset TEXT, target_epsilon REAL, "
                         "delta REAL, accountant TEXT, seed INTEGER, profile TEXT, status TEXT, guarantee TEXT, "
                         "epsilon REAL, error TEXT, cost TEXT, run_dir TEXT, updated TEXT);"
                         "CREATE TABLE metrics (key TEXT, metric TEXT, value REAL, info TEXT, "
                         "PRIMARY KEY (key, metric));"
                         "PRAGMA user_version = 1;")  # fmt: skip
    store = Store(old)
    assert store.curve_rows() == []
    (old / "runs" / stamped["spec"].key).symlink_to(stamped["run_dir"])
    store.rebuild()
    assert [r["units"] for r in store.curve_rows()] == [6, 12, 18, 24]


def test_a_resumed_fit_keeps_its_points_and_its_seconds(tmp_path: Path, one_thread: None) -> None:
    """Ctrl-C right after the point at step 12 was saved but before step 12's checkpoint: the rerun resumes at step
    11, takes step 12 (and its point) again, and ends with each point once, its seconds counting the interrupted
    session's too but not the pause between the sessions."""
    marker = tmp_path / "interrupt"
    marker.touch()
    spec = stamp_spec("step_s=0.03", "interrupt_at=12", f"interrupt_marker='{marker}'")
    run_dir = tmp_path / "runs" / spec.key
    with pytest.raises(KeyboardInterrupt):
        stamp_runner(tmp_path).run(spec)
    assert sorted(p.name for p in (run_dir / "curve").iterdir()) == ["12.pt", "6.pt"]
    ckpt = load_torch(run_dir / "checkpoint.pt")
    assert ckpt["state"]["model"]["step"] == 11 and ckpt["curve"]["taken"] == [6]
    assert ckpt["curve"]["elapsed_s"] >= 11 * 0.03
    time.sleep(2.0)  # not training time: no point's seconds may count it
    assert stamp_runner(tmp_path).run(spec) == "done"
    points = curve.read_points(run_dir)
    assert [p["units"] for p in points] == [6, 12, 18, 24]
    seconds = [p["seconds"] for p in points]
    assert seconds == sorted(seconds) and len(set(seconds)) == 4
    assert 24 * 0.03 <= seconds[-1] < 24 * 0.03 + 1.5


def test_an_over_budget_run_never_scores_its_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def over(ledger: Any, budget: Any) -> float:
        raise BudgetExceeded("ε = 99 exceeds the target ε = 10")

    monkeypatch.setattr(runner, "verify", over)
    spec = stamp_spec()
    assert stamp_runner(tmp_path).run(spec) == "failed"
    run_dir = tmp_path / "runs" / spec.key
    assert (run_dir / "privacy.json").is_file() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "curve").exists() and not (run_dir / "curve.json").exists()
    assert Store(tmp_path).curve_rows() == []


def test_snapshot_time_is_left_out_of_the_seconds(tmp_path: Path) -> None:
    """A fake clock that a slow snapshot advances by 100 s: the next point's seconds leave those out; a method that
    advances several units at once gets its snapshot at the units it reached."""
    now = [0.0]

    def slow_state() -> dict[str, Any]:
        now[0] += 100.0
        return {"w": torch.ones(2)}

    rec = curve.CurveRecorder(tmp_path, 4, slow_state, clock=lambda: now[0])
    rec.start(8)
    for _ in range(4):
        now[0] += 1.0
        rec.advance()
    now[0] += 1.0
    rec.advance(3)  # crosses the point at 6 and reaches 7
    now[0] += 1.0
    rec.advance()
    saved = {int(p.stem): load_torch(p)["seconds"] for p in tmp_path.glob("*.pt")}
    assert saved == {2: 2.0, 4: 4.0, 7: 5.0, 8: 6.0}
    assert rec.saving_s == 400.0


def test_an_interrupted_scoring_resumes_without_scoring_a_point_twice(tmp_path: Path) -> None:
    rec = curve.CurveRecorder(tmp_path / curve.FOLDER, 3, lambda: {"w": torch.zeros(1)})
    rec.start(3)
    for _ in range(3):
        rec.advance()
    scored: list[float] = []

    def score(state: dict[str, Any]) -> dict[str, Any]:
        if len(scored) == 1 and not resumed:
            raise KeyboardInterrupt
        scored.append(float(state["w"][0]))
        return {"sample_s": 0.0, "score_s": 0.0, "metrics": {"fd_domain": {"value": 1.0, "n_gen": 5}}}

    resumed = False
    with pytest.raises(KeyboardInterrupt):
        curve.score_snapshots(tmp_path, requested=3, n_samples=5, metrics=("fd_domain",), score=score, log=print)
    assert [p["units"] for p in curve.read_points(tmp_path)] == [1] and len(scored) == 1
    first = load_torch(tmp_path / curve.FOLDER / "2.pt")
    first["units"] = 1  # as if the process died after point 1 was written but before its snapshot was deleted
    torch.save(first, tmp_path / curve.FOLDER / "1.pt")
    resumed = True
    points = curve.score_snapshots(tmp_path, requested=3, n_samples=5, metrics=("fd_domain",), score=score, log=print)
    assert [p["units"] for p in points] == [1, 2, 3] and len(scored) == 3
    assert not (tmp_path / curve.FOLDER).exists()


def test_dpdm_and_dpmerf_record_their_curves(tmp_path: Path, one_thread: None) -> None:
    """A DP-SGD method (units: DP steps) and a kernel method (units: generator steps after the release), with the
    default sample count (min(n_gen, 500) = 40 on the tiny profile) and metrics."""
    r = bench("run", "--dataset", "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--methods",
              "dpdm,dpmerf", "--eps", "10", "--results", str(tmp_path), "--metrics", "fd_domain", "--no-real",
              "--set", "eval.curve=3")  # fmt: skip
    assert r.exit_code == 0, r.output
    for run_dir in sorted((tmp_path / "runs").iterdir()):
        config = json.loads((run_dir / "config.json").read_text())
        points, method = curve.read_points(run_dir), config["method"]
        total = points[-1]["total"]
        if method == "dpdm":
            assert total == json.loads((run_dir / "privacy.json").read_text())["stages"][0]["steps"]
        else:
            assert total == 2000 // 20 and points[0]["progress"].startswith("dpmerf generator")
        assert [p["units"] for p in points] == curve.points(total, 3)
        for p in points:
            assert set(p["metrics"]) == {"fd_domain", "acc_logreg"}
            assert {m["n_gen"] for m in p["metrics"].values()} == {40}
        seconds = [p["seconds"] for p in points]
        fit_s = json.loads((run_dir / "metrics.json").read_text())["cost"]["fit_s"]
        assert seconds == sorted(seconds) and seconds[-1] <= fit_s


def test_the_report_draws_the_curves_and_lists_their_points(stamped: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    build_report(Store(stamped["results"]), out=out, keys=None, echo=lambda line: None, formats=("csv", "html"),
                 plots=True)  # fmt: skip
    table = pd.read_csv(out / "curves.csv")
    assert list(table.columns) == ["method", "dataset", "ε", "seed", "units", "total", "seconds", "offset_s",
                                   "metric", "value", "n_samples", "key"]  # fmt: skip
    points = curve.read_points(stamped["run_dir"])
    assert table["units"].tolist() == [6, 12, 18, 24] and set(table["method"]) == {"step-stamp"}
    assert table["value"].tolist() == pytest.approx([p["metrics"]["fd_domain"]["value"] for p in points])
    figure = out / "plots" / "curve_fd_domain_synthetic_eps10"
    assert figure.with_suffix(".png").is_file() and figure.with_suffix(".pdf").is_file()
    page = (out / "index.html").read_text()
    section = page[page.index('<section id="sec-curves">') :].split("</section>")[0]
    assert 'src="plots/curve_fd_domain_synthetic_eps10.png"' in section and 'href="curves.csv"' in section
    assert '<a href="#sec-curves">' in page


def test_a_report_without_curves_has_no_curve_files_or_section(tmp_path: Path) -> None:
    r = bench("run", "--dataset", "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--methods",
              "noisy-means", "--eps", "10", "--results", str(tmp_path), "--metrics", "fd_domain", "--no-real",
              "--plugin", GOOD)  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "rep"
    build_report(Store(tmp_path), out=out, keys=None, echo=lambda line: None, formats=("csv", "html"), plots=True)
    assert not (out / "curves.csv").exists() and not list((out / "plots").glob("curve_*"))
    assert "sec-curves" not in (out / "index.html").read_text()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["eval.curve=-1"], "eval: curve must be an integer >= 0"),
        (["eval.curve=1.5"], "eval.curve: expected an integer, got 1.5"),
        (["eval.curve=true"], "eval.curve: expected an integer, got True"),
        (["eval.curve=2", "eval.curve_n=0"], "eval: curve_n must be >= 1"),
        (["eval.curve=2", "eval.curve_metrics=['nope']"], "eval: curve_metrics: unknown metric 'nope'"),
        (["eval.curve=2", "eval.curve_metrics=[]"], "eval: curve_metrics must name at least one metric"),
        (["eval.curve_n=10"], "eval.curve_n needs eval.curve > 0"),
    ],
)
def test_bad_curve_settings_fail_at_plan_time_in_one_line(sets: list[str], message: str) -> None:
    args = [x for s in sets for x in ("--set", s)]
    r = bench("run", "--dataset", "synthetic", "--profile", TINY_PROFILE, "--methods", "dpdm", "--eps", "10",
              "--dry-run", *args)  # fmt: skip
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_plan_without_a_curve_keeps_its_run_keys() -> None:
    """The keys of results folders written before curves existed (pinned), and no curve field in the settings."""

    def plan(*sets: str) -> grid.RunSpec:
        (spec,) = grid.plan(methods=["noisy-means"], epsilons=[10.0], datasets=["synthetic"], seeds=[0],
                              delta=None, accountant="rdp", profile=TINY_PROFILE, sets=list(sets),
                              plugins=(GOOD,))  # fmt: skip
        return spec

    spec = plan()
    assert spec.key == "noisy-means-synthetic-1d362115c0a2"
    assert grid.real_key("synthetic", spec.eval) == "real-synthetic-80c590289645"
    assert not set(curve.SETTINGS) & set(spec.eval.settings)
    assert plan("eval.curve=0").key == spec.key
    with_curve = plan("eval.curve=8")
    assert with_curve.key != spec.key  # a run asked for a curve is not the cell without one
    assert grid.real_key("synthetic", with_curve.eval) == grid.real_key("synthetic", spec.eval)  # the same row
    assert {k: with_curve.eval.settings[k] for k in curve.SETTINGS} == {
        "curve": 8, "curve_n": 40, "curve_metrics": ["fd_domain", "acc_logreg"]}  # fmt: skip
