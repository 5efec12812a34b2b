"""Running a grid end to end: results on disk, skipping, forcing, resuming, refusing over-budget runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import grid as harness
from bench.grid.store import Store
from bench.privacy import Stage, epsilon
from tests.conftest import TESTS, TINY_PROFILE, bench

RUN = ["run", "--dataset", "synthetic", "--profile", TINY_PROFILE, "--device", "cpu"]


def run_dirs(results: Path) -> list[Path]:
    """The method runs (the real-data rows left out)."""
    return sorted(p for p in (results / "runs").iterdir() if p.is_dir() and not p.name.startswith("real-"))


def real_dirs(results: Path) -> list[Path]:
    return sorted((results / "runs").glob("real-*"))


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dpdm at ε = 1 and 10 plus the non-private ddpm, on the tiny profile."""
    results = tmp_path_factory.mktemp("grid")
    r = bench(*RUN, "--methods", "dpdm,ddpm", "--eps", "1,10", "--results", str(results))
    assert r.exit_code == 0, r.output
    return results


def test_every_run_writes_its_files(grid: Path) -> None:
    dirs = run_dirs(grid)
    assert len(dirs) == 3  # dpdm × 2 ε, ddpm once (ε = ∞)
    for d in dirs:
        for name in (
            "config.json",
            "privacy.json",
            "metrics.json",
            "samples.npz",
            "samples.png",
            "checkpoint.pt",
            "log.txt",
        ):
            assert (d / name).is_file(), f"{d.name}: {name} missing"
        samples = np.load(d / "samples.npz")
        assert samples["images"].dtype == np.uint8 and samples["images"].shape == (40, 1, 16, 16)
        assert np.bincount(samples["labels"]).tolist() == [4] * 10
        metrics = json.loads((d / "metrics.json").read_text())
        assert {"fd_domain", "acc_cnn"} <= set(metrics["metrics"])
        assert metrics["cost"]["fit_s"] > 0


def test_real_data_row_is_computed_once_per_dataset(grid: Path) -> None:
    (d,) = real_dirs(grid)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["kind"], cfg["method"], cfg["dataset"]) == ("real", "real", "synthetic")
    met = json.loads((d / "metrics.json").read_text())["metrics"]
    # fidelity of n_gen real test images against the training set: far closer than any tiny model
    fd = met["fd_domain"]
    assert fd["reference_images"] == "40 real test images" and fd["n_gen"] == 40
    model_fd = [json.loads((r / "metrics.json").read_text())["metrics"]["fd_domain"]["value"] for r in run_dirs(grid)]
    assert fd["value"] < min(model_fd)
    # the classifiers trained on the whole real training set, under the same protocol
    acc = met["acc_cnn"]
    assert acc["reference_data"] == "the real train split (2000 images)" and acc["n_train"] + acc["n_eval"] == 2000
    assert acc["protocol"] == "dpdm" and acc["shortened"]["n_train"] == [60000, acc["n_train"]]
    assert acc["per_seed"] == [acc["value"]] and acc["classifier_seeds"] == [0]
    r = bench("score", str(d))
    assert r.exit_code == 2 and "real-data reference row" in r.stderr


def test_real_data_row_can_train_on_as_many_real_images_as_samples(tmp_path: Path) -> None:
    """eval.real_train = "n_gen": the real row's classifiers see a seeded subset of n_gen real training images
    (the synthetic rows' training-set size), and the record says so."""
    r = bench(*RUN, "--methods", "ddpm", "--eps", "1", "--metrics", "acc_logreg", "--set", "eval.real_train=n_gen",
              "--results", str(tmp_path))  # fmt: skip
    assert r.exit_code == 0, r.output
    (d,) = real_dirs(tmp_path)
    acc = json.loads((d / "metrics.json").read_text())["metrics"]["acc_logreg"]
    assert acc["n_train"] + acc["n_eval"] == 40
    assert acc["reference_data"].startswith("40 real train images")
    r = bench(*RUN, "--methods", "ddpm", "--eps", "1", "--set", "eval.real_train=all", "--results", str(tmp_path))
    assert r.exit_code == 2 and "real_train must be 'split' or 'n_gen'" in r.stderr


def test_privacy_cards_are_recomputable(grid: Path) -> None:
    cards = {}
    for d in run_dirs(grid):
        cfg = json.loads((d / "config.json").read_text())
        card = json.loads((d / "privacy.json").read_text())
        cards[(cfg["method"], cfg["epsilon"])] = card
        for key in (
            "target_epsilon",
            "delta",
            "accountant",
            "epsilon",
            "guarantee",
            "non_private",
            "claimed_epsilon",
            "stages",
        ):
            assert key in card
    for target in (1.0, 10.0):
        card = cards[("dpdm", target)]
        assert card["guarantee"] == "end-to-end" and card["non_private"] == []
        stages = [Stage.from_dict(s) for s in card["stages"]]
        recomputed = epsilon(stages, card["delta"], card["accountant"])
        assert recomputed == pytest.approx(card["epsilon"], rel=1e-9)
        assert 0.9 * target < recomputed <= target * (1 + 1e-6)  # calibrated close to, never above, the target
    ddpm = cards[("ddpm", None)]
    assert ddpm["guarantee"] == "none" and ddpm["epsilon"] is None and ddpm["non_private"]


def test_config_json_is_written_with_the_resolved_config(grid: Path) -> None:
    cfg = json.loads((run_dirs(grid)[0] / "config.json").read_text())
    assert cfg["config"]["base_channels"] == 8 and cfg["profile"] == TINY_PROFILE


def test_finished_runs_are_skipped_and_forced_runs_redone(grid: Path) -> None:
    before = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(grid)}
    r = bench(*RUN, "--methods", "dpdm,ddpm", "--eps", "1,10", "--results", str(grid))
    assert r.exit_code == 0 and "0 run(s) done, 3 already finished" in r.stderr
    assert "real-data row of synthetic: already finished" in r.stderr
    assert before == {d.name: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(grid)}
    r = bench(*RUN, "--methods", "ddpm", "--eps", "1", "--results", str(grid), "--force")
    assert r.exit_code == 0 and "1 run(s) done" in r.stderr
    after = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(grid)}
    assert sum(before[k] != after[k] for k in before) == 1


def test_report_has_checked_eps_column_and_writes_tables(grid: Path, tmp_path: Path) -> None:
    r = bench("report", "--results", str(grid), "--out", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    assert "ε recomputed" in r.stdout and "ε target" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| dpdm")]
    assert len(lines) == 2 and all("end-to-end" in ln for ln in lines)
    (ddpm,) = [ln.split(" | ") for ln in r.stdout.splitlines() if ln.startswith("| ddpm")]
    assert ddpm[2:4] == ["∞", "∞"] and ddpm[6] == "none"  # ε target, ε recomputed, guarantee
    assert (tmp_path / "rep" / "summary.md").is_file() and (tmp_path / "rep" / "summary.csv").is_file()
    assert (tmp_path / "rep" / "acc_cnn.csv").is_file()
    (real,) = [ln.split(" | ") for ln in r.stdout.splitlines() if ln.startswith("| real data")]
    assert real[2:7] == ["∞", "—", "—", "—", "—"]  # ε target, ε recomputed, δ, accountant, guarantee
    assert "acc_cnn_datalens‡° [datalens]" in r.stdout and "‡ test-selected" in r.stdout
    assert "° shortened protocol" in r.stdout  # the tiny profile's 2 epochs and 40 samples
    assert "test-selected" in (tmp_path / "rep" / "acc_cnn_datalens.md").read_text()


def test_index_can_be_rebuilt_from_run_dirs(grid: Path) -> None:
    store = Store(grid)
    runs_before, metrics_before = store.rows()
    assert store.rebuild() == 4  # three runs and the real-data row
    runs_after, metrics_after = store.rows()
    strip = lambda rows: sorted((r["key"], r["status"], r["epsilon"]) for r in rows)  # noqa: E731
    assert strip(runs_before) == strip(runs_after)
    assert len(metrics_before) == len(metrics_after)


def test_over_budget_run_fails_and_stays_out_of_the_table(tmp_path: Path) -> None:
    plugin = str(TESTS / "plugins" / "overspend.py")
    r = bench(*RUN, "--methods", "overspend", "--eps", "1", "--results", str(tmp_path), "--plugin", plugin)
    assert r.exit_code == 1
    said = r"error: run overspend-synthetic-\w+ failed: over budget: ε = [\d.]+ exceeds the target ε = 1 "
    assert re.search(said, r.stderr)
    (d,) = run_dirs(tmp_path)
    card = json.loads((d / "privacy.json").read_text())
    assert card["status"] == "over budget" and card["epsilon"] > 1
    assert not (d / "metrics.json").exists()
    r = bench("report", "--results", str(tmp_path))
    assert r.exit_code == 2 and "no finished runs" in r.stderr


def test_corrupt_checkpoint_fails_its_cell_in_one_line(tmp_path: Path) -> None:
    args = [*RUN, "--methods", "dpdm", "--eps", "10", "--results", str(tmp_path)]
    plan = bench(*args, "--dry-run")
    key = json.loads(plan.stdout.splitlines()[0])["key"]
    run_dir = tmp_path / "runs" / key
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage" * 50)
    r = bench(*args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: run {key} failed: checkpoint {run_dir / 'checkpoint.pt'} is corrupt" in r.stderr
    assert not (run_dir / "metrics.json").exists()
    (row,) = Store(tmp_path).rows()[0]
    assert row["status"] == "failed" and "is corrupt" in row["error"]
    assert "Traceback" in (run_dir / "log.txt").read_text()  # the traceback is kept in the run's log


def _dp_steps(results: Path) -> int:
    (d,) = run_dirs(results)
    return json.loads((d / "privacy.json").read_text())["stages"][0]["steps"]


def test_sigkill_mid_training_resumes_with_the_same_dp_steps(tmp_path: Path) -> None:
    """Kill -9 during fit, run again: the run finishes with exactly the steps of an uninterrupted run."""
    args = [
        sys.executable,
        "-m",
        "bench.cli",
        *RUN,
        "--methods",
        "dpdm",
        "--eps",
        "10",
        "--set",
        "epochs=2.0",
        "--set",
        "noise_multiplicity=1",
    ]
    env = os.environ | {"BENCH_CHECKPOINT_EVERY": "0"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # generous limits, each ended by its event: a suite at nice 10 beside two training runs took > 300 s for one run
    limit_s = 900
    subprocess.run([*args, "--results", str(whole)], env=env, check=True, capture_output=True, timeout=limit_s)

    proc = subprocess.Popen(
        [*args, "--results", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + limit_s
    ckpt = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((killed / "runs").glob("*/checkpoint.pt")) if (killed / "runs").exists() else []
        if found and torch.load(found[0], weights_only=False)["kind"] == "fit":
            ckpt = found[0]
            break
        time.sleep(0.02)
    assert ckpt is not None and proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt.parent / "metrics.json").exists()
    steps_at_kill = torch.load(ckpt, weights_only=False)["state"]["dpsgd"]["steps"]

    # the rerun's fit generator gets ANOTHER seed: only a resume that restores the checkpoint's state (weights,
    # optimiser, DP-SGD step count and both generators) can end with the uninterrupted run's samples
    reseeded = (
        "import sys, bench.grid.runner as r; from bench.cli import main; "
        "seeded = r.fit_generator; r.fit_generator = lambda seed: seeded(seed + 99); "
        f"sys.argv = ['bench', *{[*args[3:], '--results', str(killed)]!r}]; main()"
    )
    subprocess.run([sys.executable, "-c", reseeded], env=env, check=True, capture_output=True, timeout=limit_s)
    assert 0 < steps_at_kill < _dp_steps(whole)
    assert _dp_steps(killed) == _dp_steps(whole)
    (run_dir,) = run_dirs(killed)
    assert "over 2 attempts" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["cost"]["fit_attempts"] == 2
    a = np.load(next((whole / "runs").glob("*/samples.npz")))["images"]
    b = np.load(next((killed / "runs").glob("*/samples.npz")))["images"]
    assert np.array_equal(a, b), "a resumed run must continue the same random stream"


def test_a_finished_folder_whose_index_says_failed_is_set_right_by_the_next_run(tmp_path: Path) -> None:
    """A worker lost after writing metrics.json but before its "done" reached the index leaves the index "failed"
    on a finished folder: the next run of the grid skips the cell (never recomputes it) and sets its index from
    the folder."""
    args = [*RUN, "--methods", "dpmerf", "--eps", "10", "--no-real", "--results", str(tmp_path)]
    assert bench(*args).exit_code == 0
    (run_dir,) = run_dirs(tmp_path)
    store = Store(tmp_path)
    key = run_dir.name
    metrics_before = store.rows()[1]
    store.record_run(key, status="failed", error="worker lost: WorkerCrashedError: killed")
    store.clear_index(key)  # the lost worker's metrics never reached the index either
    store.record_run(key, status="failed", error="worker lost: WorkerCrashedError: killed")
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    r = bench(*args)
    assert r.exit_code == 0, r.output
    assert (run_dir / "metrics.json").stat().st_mtime_ns == mtime  # skipped, not recomputed
    runs, metrics = Store(tmp_path).rows()
    (row,) = [x for x in runs if x["key"] == key]
    assert (row["status"], row["error"]) == ("done", None)
    assert sorted(m["metric"] for m in metrics) == sorted(m["metric"] for m in metrics_before)
    assert "index said 'failed': set from the finished folder" in (run_dir / "log.txt").read_text()


def test_a_resumed_fit_counts_the_seconds_of_every_attempt(tmp_path: Path) -> None:
    """cost.fit_s of a resumed fit is the sum of the attempts (each up to its last checkpoint), and their number is
    kept: a first attempt that ran 5 s, checkpointed, then died; the second resumes and adds its own time."""
    path = tmp_path / "checkpoint.pt"
    first = harness.RunProgress(path, 0.0, lambda total, d: None, lambda n: None)
    first._t0 -= 5.0  # it has been running for 5 s
    first.checkpoint(lambda: {"step": 3})
    second = harness.RunProgress(path, 0.0, lambda total, d: None, lambda n: None)
    assert second.resume() == {"step": 3}
    assert second.attempts == 2 and 5.0 <= second.before_s < 6.0
    assert 5.0 <= second.fit_seconds() < 6.0
    second._t0 -= 2.0
    second.checkpoint(lambda: {"step": 4})  # a third attempt would start from 7 s
    third = harness.RunProgress(path, 0.0, lambda total, d: None, lambda n: None)
    third.resume()
    assert third.attempts == 3 and 7.0 <= third.before_s < 8.0


def test_a_grid_runs_from_the_library_without_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """harness.run_grid is what `bench run` calls: a notebook gets the same cells, real-data rows and messages;
    a dataset whose data is missing is skipped (with its reason) only when asked to."""
    from bench import grid as harness
    from bench.errors import BenchError

    specs = harness.plan(methods=["ddpm"], epsilons=[1.0], datasets=["synthetic"], seeds=[0], delta=None,
                        accountant="rdp", profile=str(TINY_PROFILE), sets=["eval.n_gen=20"])  # fmt: skip
    r = harness.Runner(Store(tmp_path), device=torch.device("cpu"), metrics=("fd_domain",))
    lines: list[str] = []
    grid = harness.run_grid(r, specs, echo=lines.append)
    assert [o for _, o in grid.outcomes] == ["done"] and len(grid.real_keys) == 1 and not grid.failed
    assert lines[0].startswith("1 run(s) done, 0 already finished, 0 failed")
    assert lines[1] == "real-data row of synthetic: done"
    again = harness.run_grid(r, specs, echo=lines.append)
    assert [o for _, o in again.outcomes] == ["skipped"] and again.real_keys == grid.real_keys

    def no_data(name: str, split: str) -> None:
        raise BenchError(f"{name}: not found")

    monkeypatch.setattr(r, "dataset", no_data)
    with pytest.raises(BenchError, match="synthetic: not found"):
        harness.run_grid(r, specs)
    skipped = harness.run_grid(r, specs, skip_missing_data=True, echo=lines.append)
    assert skipped.outcomes == [] and skipped.missing_data == {"synthetic": "synthetic: not found"}
    assert lines[-1].startswith("0 run(s) done") and "dataset not available" in lines[-2]


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    """An exception in a method's fit (or sample) fails that cell only: one line on stderr naming the run and the
    error, status "failed" and the error in the index, the traceback in its log.txt, exit 1; the other cells
    run and are reported; a rerun retries the failed cell and keeps the finished ones."""
    plugins = ["--plugin", str(TESTS / "plugins" / "explode.py"), "--plugin", str(TESTS / "plugins" / "good_plugin.py")]
    args = [*RUN, "--methods", "explode,noisy-means", "--eps", "10", "--results", str(tmp_path), *plugins]
    r = bench(*args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert re.search(r"error: run explode-synthetic-\w+ failed: FloatingPointError: loss is non-finite at step 3; "
                     r"its log: \S+log.txt", r.stderr)  # fmt: skip
    assert "a second line" not in r.stderr
    assert "| noisy-means | synthetic | 10 |" in r.stdout  # the other cell ran and is in the table
    rows = {row["method"]: row for row in Store(tmp_path).rows()[0]}
    assert rows["explode"]["status"] == "failed"
    assert rows["explode"]["error"] == "FloatingPointError: loss is non-finite at step 3"
    assert rows["noisy-means"]["status"] == "done" and rows["real"]["status"] == "done"
    log = (Path(rows["explode"]["run_dir"]) / "log.txt").read_text()
    assert "FAILED: FloatingPointError" in log and "Traceback (most recent call last)" in log
    done = Path(rows["noisy-means"]["run_dir"]) / "metrics.json"
    stamp = done.stat().st_mtime_ns
    r = bench(*args, "--set", "explode.fail_in=sample")  # another config: another cell, failing in sample
    assert r.exit_code == 1 and "failed: IndexError: sampler broke" in r.stderr
    assert done.stat().st_mtime_ns == stamp  # the finished cell was not recomputed
    r = bench("--debug", *args)  # --debug: the traceback too; the failed cell is retried
    assert r.exit_code == 1 and "Traceback (most recent call last)" in r.output


def test_a_classifier_that_cannot_train_here_fails_its_cell_before_the_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose metrics need a classifier step that does not fit in memory (DPImageBench's ResNeXt-29 at batch
    256 on a 24 GiB CPU) fails before its fit, not hours later at scoring: here every step is refused (1 MiB free)."""
    from bench import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    plugin = ["--plugin", str(TESTS / "plugins" / "good_plugin.py")]
    args = [*RUN, "--methods", "noisy-means", "--eps", "10", "--results", str(tmp_path), *plugin]
    r = bench(*args, "--metrics", "acc_resnet_dpimagebench")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert re.search(r"failed: protocol dpimagebench, resnet: a training step at batch 256 needs about [\d.]+ GiB and "
                     r"cpu has 0\.0 GiB free \(a step may use 90% of it\); score on a GPU, or split each batch", r.stderr)  # fmt: skip
    (row,) = [row for row in Store(tmp_path).rows()[0] if row["method"] == "noisy-means"]
    run_dir = Path(row["run_dir"])
    assert row["status"] == "failed" and not (run_dir / "checkpoint.pt").exists()  # no fit, no samples
    assert not (run_dir / "samples.npz").exists()


def test_an_internal_error_is_one_line_without_debug() -> None:
    """A bug (here: a harness function made to raise ZeroDivisionError) is one line and exit status 3 from the
    entry point; BENCH_DEBUG=1 lets the traceback through."""
    import subprocess
    import sys

    script = (
        "import sys, bench.cli, bench.config\n"
        "bench.config.parse_seeds = lambda text: 1 / 0\n"
        "sys.argv = ['bench', 'run', '--methods', 'dpdm', '--dry-run']\n"
        "bench.cli.main()\n"
    )
    env = {**os.environ, "BENCH_DEBUG": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "error: internal error: ZeroDivisionError: division by zero (rerun with --debug for the traceback, "
        "and please report it)"
    )
    env["BENCH_DEBUG"] = "1"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr


def test_the_run_key_holds_the_method_version_and_a_plugins_source(tmp_path: Path, monkeypatch) -> None:
    from bench.baselines.dpdm import DPDM

    from bench.grid import registry

    def key(method: str, plugins: tuple[str, ...] = ()) -> str:
        registry._cache.clear()
        (spec,) = harness.plan(methods=[method], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None,
                              accountant="rdp", profile=TINY_PROFILE, sets=[], plugins=plugins)  # fmt: skip
        return spec.key

    before = key("dpdm")
    monkeypatch.setattr(DPDM, "version", DPDM.version + 1)
    assert key("dpdm") != before  # a new version of a built-in: new keys, nothing reused
    monkeypatch.undo()
    assert key("dpdm") == before
    plugin = tmp_path / "mine.py"
    plugin.write_text((TESTS / "plugins" / "good_plugin.py").read_text())
    first = key("noisy-means", (str(plugin),))
    assert key("noisy-means", (str(plugin),)) == first
    plugin.write_text(plugin.read_text() + "\n# an edit\n")
    assert key("noisy-means", (str(plugin),)) != first  # an edited plugin file: new keys


def test_reusing_a_cell_computed_by_older_code_says_so(tmp_path: Path) -> None:
    plugin = ["--plugin", str(TESTS / "plugins" / "good_plugin.py")]
    args = [*RUN, "--methods", "noisy-means", "--eps", "10", "--results", str(tmp_path), "--no-real", *plugin]
    assert bench(*args).exit_code == 0
    (d,) = run_dirs(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert set(cfg["code"]) == {"method_version", "method_source", "harness"}
    r = bench(*args)
    assert r.exit_code == 0 and "older code" not in r.stderr and "0 run(s) done, 1 already finished" in r.stderr
    cfg["code"]["harness"] = "0123456789ab"  # as if computed by an earlier harness
    (d / "config.json").write_text(json.dumps(cfg))
    stamp = (d / "metrics.json").stat().st_mtime_ns
    r = bench(*args)
    assert "note: 1 finished cell(s) reused, computed by older code of the same version (harness changed)" in r.stderr
    assert (d / "metrics.json").stat().st_mtime_ns == stamp
    r = bench(*args, "--force")
    assert r.exit_code == 0 and (d / "metrics.json").stat().st_mtime_ns != stamp


def test_a_cell_another_process_runs_is_waited_for(tmp_path: Path) -> None:
    """Two `bench run` on one results folder: a cell whose lock another process holds is "busy": its folder is
    not touched (not resumed, not cleared by --force, not written). A grid waits for it (saying who holds it),
    then runs it here when the other process let it go unfinished."""
    good = str(TESTS / "plugins" / "good_plugin.py")
    (spec,) = harness.plan(methods=["noisy-means"], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None,
                          accountant="rdp", profile=TINY_PROFILE, sets=[], plugins=(good,))  # fmt: skip

    def make(force: bool = False) -> harness.Runner:
        return harness.Runner(Store(tmp_path), device=torch.device("cpu"), plugins=(good,), metrics=("fd_domain",),
                             force=force)  # fmt: skip

    other, mine = make(), make()
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(other.cell_lock(spec.key))  # a separate open file: another process's lock
        assert held and f"pid {os.getpid()}" in mine.lock_holder(spec.key)
        assert mine.run(spec) == "busy" and make(force=True).run(spec) == "busy"
        assert not (tmp_path / "runs" / spec.key).exists()
        release = threading.Timer(1.0, stack.close)  # the other process ends without finishing the cell
        release.start()
        lines: list[str] = []
        t0 = time.monotonic()
        grid = harness.run_grid(mine, [spec], real=False, echo=lines.append)
        release.join()
    assert time.monotonic() - t0 >= 1.0 and grid.count("done") == 1
    assert lines[0].startswith("waiting for 1 cell(s) that another process is running (")
    assert f"pid {os.getpid()}" in lines[0]
    with other.cell_lock(spec.key) as held:  # released after the cell
        assert held


def test_noise_source_os_draws_unwritten_noise_and_a_resume_keeps_the_accounting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--noise-source os`: the same seed twice gives two different releases (the noise is not the seed's), the
    card and config.json say so, the key differs from the seeded run's; a fit interrupted mid-way resumes to the
    DP steps and ε of an uninterrupted seeded run."""
    monkeypatch.setenv("BENCH_CHECKPOINT_EVERY", "0")
    dpdm = [*RUN, "--methods", "dpdm", "--eps", "10", "--no-real", "--set", "noise_multiplicity=1"]
    assert bench(*dpdm, "--results", str(tmp_path / "seeded")).exit_code == 0
    released = []
    for name in ("os-a", "os-b"):
        assert bench(*dpdm, "--noise-source", "os", "--results", str(tmp_path / name)).exit_code == 0
        (run_dir,) = run_dirs(tmp_path / name)
        card = json.loads((run_dir / "privacy.json").read_text())
        assert card["noise_source"] == "os" and any("OS entropy" in a for a in card["assumptions"])
        assert json.loads((run_dir / "config.json").read_text())["noise_source"] == "os"
        assert "noise source: OS entropy" in (run_dir / "log.txt").read_text()
        released.append(torch.load(run_dir / "checkpoint.pt", weights_only=False)["method_state"])
    (seeded,) = run_dirs(tmp_path / "seeded")
    assert seeded.name != run_dir.name and json.loads((seeded / "privacy.json").read_text())["noise_source"] == "seed"
    (a, b), names = released, list(released[0]["net"])
    assert not any(torch.equal(a["net"][k], b["net"][k]) for k in names if a["net"][k].is_floating_point())

    calls = {"n": 0}
    save = harness.RunProgress.checkpoint

    def interrupted(self: harness.RunProgress, state_fn):  # noqa: ANN001, ANN202
        save(self, state_fn)
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("interrupted after the 3rd checkpoint")

    monkeypatch.setattr(harness.RunProgress, "checkpoint", interrupted)
    assert bench(*dpdm, "--noise-source", "os", "--results", str(tmp_path / "resumed")).exit_code == 1
    (run_dir,) = run_dirs(tmp_path / "resumed")
    steps_at_stop = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["dpsgd"]["steps"]
    monkeypatch.setattr(harness.RunProgress, "checkpoint", save)
    assert bench(*dpdm, "--noise-source", "os", "--results", str(tmp_path / "resumed")).exit_code == 0
    assert 0 < steps_at_stop < _dp_steps(tmp_path / "seeded") == _dp_steps(tmp_path / "resumed")
    assert json.loads((run_dir / "metrics.json").read_text())["cost"]["fit_attempts"] == 2
    eps = [json.loads((d / "privacy.json").read_text())["epsilon"] for d in (seeded, run_dir)]
    assert eps[0] == eps[1]


BUILDERS = {  # the method -> (class, the method that builds its networks)
    "dpdm": ("bench.baselines.dpdm", "DPDM", "_build"),
    "dpgan": ("bench.baselines.dpgan", "DPGAN", "_build"),
    "dpmerf": ("bench.baselines.dpmerf", "DPMERF", "_build"),
}


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_a_cell_builds_its_networks_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The constructor only checks the networks on the meta device; the fit builds them, once, under the run's
    seed (bench.nets.BuiltOnce). Building them in __init__ and again in fit (as before) counts two real builds."""
    import importlib

    module, name, attr = BUILDERS[method]
    cls = getattr(importlib.import_module(module), name)
    real, meta = [], []
    original = getattr(cls, attr)

    def counted(self: object, *args: object) -> object:
        (meta if self.device.type == "meta" else real).append(1)  # type: ignore[attr-defined]
        return original(self, *args)

    monkeypatch.setattr(cls, attr, counted)
    (spec,) = harness.plan(methods=[method], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None,
                           accountant="rdp", profile=TINY_PROFILE, sets=[])  # fmt: skip
    r = harness.Runner(Store(tmp_path), device=torch.device("cpu"), metrics=("fd_domain",))
    assert r.run(spec) == "done"
    assert (len(real), len(meta)) == (1, 1)
