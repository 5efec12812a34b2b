"""The Ray executor (bench.grid.executors.ray) on a local Ray instance of 2 CPUs (2 workers), and concurrent local
`bench run` processes on one results folder."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray  # in the dev extra, as in the ray extra: a missing install fails here, not skipped
import torch

from bench import grid as harness
from bench.errors import BenchError
from bench.grid.executors import make_executor
from bench.grid.executors.ray import RayExecutor, WorkerSettings, probe_node
from bench.grid.store import Store
from tests.conftest import TESTS, TINY_PROFILE, bench

DIE_ONCE = str(TESTS / "plugins" / "die_once.py")
EXPLODE = str(TESTS / "plugins" / "explode.py")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (the executor joins it and leaves it running): 2 CPUs, so 2 cells
    at once with --cpus-per-run 1."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def index_rows(root: Path) -> dict[str, tuple]:
    with sqlite3.connect(root / "bench.sqlite") as db:
        runs = {
            r[0]: r[1:]
            for r in db.execute(
                "SELECT key, method, dataset, target_epsilon, delta, accountant, seed, profile, status, guarantee,"
                " epsilon, error FROM runs"
            )
        }
        metrics = {(k, m): v for k, m, v in db.execute("SELECT key, metric, value FROM metrics")}
    return {"runs": runs, "metrics": metrics}  # type: ignore[dict-item]


def four_cells() -> list[harness.RunSpec]:
    return harness.plan(methods=["dpmerf"], epsilons=[1.0, 10.0], datasets=["synthetic"], seeds=[0, 1], delta=None,
                       accountant="rdp", profile=TINY_PROFILE, sets=[])  # fmt: skip


def make_runner(root: Path, **kw: object) -> harness.Runner:
    return harness.Runner(Store(root), device=torch.device("cpu"), metrics=("fd_domain",), **kw)  # type: ignore[arg-type]


def test_a_grid_on_ray_equals_the_local_grid(tmp_path: Path, local_ray: None, one_thread: None) -> None:
    """4 cells and the real-data row on 2 Ray workers (1 thread each) and on the local executor (1 thread): the
    same keys and run folders, identical privacy cards, the same index, metrics equal to float tolerance."""
    specs = four_cells()
    lines: list[str] = []
    with RayExecutor(cpus_per_run=1, device="cpu") as ex:
        on_ray = harness.run_grid(make_runner(tmp_path / "ray"), specs, executor=ex, echo=lines.append)
    local = harness.run_grid(make_runner(tmp_path / "local"), specs)
    assert [o for _, o in on_ray.outcomes] == ["done"] * 4 == [o for _, o in local.outcomes]
    assert on_ray.real_keys == local.real_keys and len(on_ray.real_keys) == 1
    keys = sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir())
    assert (
        keys
        == sorted(p.name for p in (tmp_path / "local" / "runs").iterdir())
        == sorted({s.key for s in specs} | on_ray.real_keys)
    )
    for spec in specs:
        ray_dir, local_dir = (tmp_path / where / "runs" / spec.key for where in ("ray", "local"))
        card = json.loads((ray_dir / "privacy.json").read_text())
        assert card == json.loads((local_dir / "privacy.json").read_text())
        with np.load(ray_dir / "samples.npz") as a, np.load(local_dir / "samples.npz") as b:
            assert np.array_equal(a["images"], b["images"])
    ray_index, local_index = index_rows(tmp_path / "ray"), index_rows(tmp_path / "local")
    assert ray_index["runs"] == local_index["runs"]
    assert ray_index["metrics"].keys() == local_index["metrics"].keys()
    for k, v in ray_index["metrics"].items():
        assert v == pytest.approx(local_index["metrics"][k], rel=1e-6)
    assert sum(line.startswith("4 run(s) done") for line in lines) == 1


def test_a_killed_worker_fails_its_cell_and_the_rerun_resumes_it(tmp_path: Path, local_ray: None) -> None:
    """A worker killed mid-fit (SIGKILL after a checkpoint past half of the steps): its cell is recorded as
    failed with Ray's reason, the other cell still runs (and fails on its own error), exit status says so. The
    rerun resumes the killed cell from its checkpoint: its card charges the steps once, and its samples are
    those of an uninterrupted run."""
    marker = tmp_path / "die"
    profile = tmp_path / "profile.toml"
    tiny = tomllib.loads(Path(TINY_PROFILE).read_text())
    dpdm = {k: v for k, v in tiny["dpdm"].items() if not isinstance(v, dict)}
    profile.write_text(
        Path(TINY_PROFILE).read_text()
        + "\n[die-once]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in dpdm.items())
        + f"die_marker = {json.dumps(str(marker))}\n"
    )
    plugins = (DIE_ONCE, EXPLODE)
    specs = harness.plan(methods=["die-once", "explode"], epsilons=[10.0], datasets=["synthetic"], seeds=[0],
                        delta=None, accountant="rdp", profile=str(profile), sets=[], plugins=plugins)  # fmt: skip
    dying = specs[0]

    def grid(root: Path) -> harness.GridOutcome:
        r = make_runner(root, plugins=plugins, checkpoint_every_s=0.0)
        with RayExecutor(cpus_per_run=1, device="cpu") as ex:
            return harness.run_grid(r, specs, real=False, executor=ex)

    marker.touch()
    first = grid(tmp_path / "results")
    assert [o for _, o in first.outcomes] == ["failed", "failed"]
    assert first.errors[dying.key].startswith("worker lost: WorkerCrashedError: ")
    assert "loss is non-finite" in first.errors[specs[1].key]
    assert not marker.exists()
    run_dir = tmp_path / "results" / "runs" / dying.key
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["kind"] == "fit"
    assert index_rows(tmp_path / "results")["runs"][dying.key][7:] == ("failed", None, None, first.errors[dying.key])
    assert "FAILED: worker lost" in (run_dir / "log.txt").read_text()

    again = grid(tmp_path / "results")  # the rerun: the killed cell resumes, the exploding one fails again
    assert [o for _, o in again.outcomes] == ["done", "failed"]
    clean = grid(tmp_path / "clean")  # the same cell never interrupted (no marker now)
    assert clean.outcomes[0][1] == "done"
    card = json.loads((run_dir / "privacy.json").read_text())
    assert card == json.loads((tmp_path / "clean" / "runs" / dying.key / "privacy.json").read_text())
    (stage,) = card["stages"]
    steps = round(dpdm["epochs"] / (dpdm["batch_size"] / 2000))  # round(epochs / q) on 2,000 records
    assert stage["steps"] == steps
    assert Path(f"{marker}.resumed").read_text() == f"{steps // 2}\n"  # the rerun resumed at the kill's checkpoint
    with np.load(run_dir / "samples.npz") as a, np.load(tmp_path / "clean" / "runs" / dying.key / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    log = (run_dir / "log.txt").read_text()
    assert log.count(f"start {dying.key}") == 2


def test_every_node_must_see_the_results_folder_plugins_and_data(tmp_path: Path, local_ray: None) -> None:
    """The check before any task: a node that lacks a plugin file or --data-root is named in a one-line error;
    a node that sees another folder at the results path (the probe file's content differs) too."""
    r = make_runner(tmp_path, plugins=(str(tmp_path / "gone.py"),), data_root=str(tmp_path / "no-data"))
    ex = RayExecutor(cpus_per_run=1, device="cpu")
    with pytest.raises(BenchError) as e:
        ex.check(WorkerSettings.of(r, "cpu", 1), gpus=0.0)
    text = str(e.value)
    assert f"does not see the plugin file {tmp_path / 'gone.py'}" in text and "does not see --data-root" in text
    assert text.startswith("node ") and "\n" not in text
    assert "lock" not in text  # every (here: the one) node was refused the driver's probe lock
    assert not list(tmp_path.glob(".probe-*")) and not list(tmp_path.glob("locks/.probe-*"))  # both removed
    (tmp_path / ".probe-x").write_text("another machine's token")
    seen = probe_node(str(tmp_path), ".probe-x", "the driver's token", (), None)
    assert seen["problems"] == [f"does not see the results folder {tmp_path} (the driver's probe file: "
                                "\"another machine's token\")"]  # fmt: skip
    with pytest.raises(BenchError, match="--cpus-per-run 3: the Ray cluster's largest node has 2 CPUs"):
        ex.check(WorkerSettings.of(make_runner(tmp_path), "cpu", 3), gpus=0.0)


def test_the_probe_checks_that_locks_exclude_across_nodes(tmp_path: Path) -> None:
    """probe_node must be refused the exclusive flock the driver holds on locks/<probe>.lock; a node that gets it
    (a file system whose locks are per node: simulated by nobody holding it) is told so, and the lock is left free."""
    (tmp_path / ".probe-t").write_text("token")
    lock = tmp_path / "locks" / ".probe-t.lock"
    lock.parent.mkdir()
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert probe_node(str(tmp_path), ".probe-t", "token", (), None)["problems"] == []
    (problem,) = probe_node(str(tmp_path), ".probe-t", "token", (), None)["problems"]
    assert problem.startswith("takes a lock the driver holds") and "does not exclude across nodes" in problem
    with open(lock, "a+") as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the probe released what it took


def test_bench_run_on_ray_from_the_command_line(tmp_path: Path, local_ray: None) -> None:
    """`bench run --executor ray` (joins the running Ray instance), then a rerun: every cell already finished."""
    args = ["run", "--methods", "dpmerf", "--eps", "10", "--dataset", "synthetic", "--profile", TINY_PROFILE,
            "--metrics", "fd_domain", "--results", str(tmp_path), "--executor", "ray", "--device", "cpu"]  # fmt: skip
    r = bench(*args)
    assert r.exit_code == 0, r.output
    assert "| dpmerf | synthetic | 10 |" in r.stdout
    r = bench(*args)
    assert r.exit_code == 0 and "0 run(s) done, 1 already finished, 0 failed" in r.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--executor", "slurm"], "--executor must be one of local, ray, got 'slurm'"),
        (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --executor ray"),
        (["--gpus-per-run", "1"], "--gpus-per-run needs --executor ray"),
        (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be an integer ≥ 1, got 0"),
        (["--executor", "ray", "--gpus-per-run", "1.5"], "--gpus-per-run must be a fraction in [0, 1] or a whole"),
        (["--executor", "ray", "--device", "cuda:1"], "with --executor ray, --device is auto, cpu or cuda"),
        (["--executor", "ray", "--device", "cpu", "--gpus-per-run", "1"], "--device cpu with --gpus-per-run > 0"),
    ],
)
def test_executor_options_are_checked_before_anything_runs(tmp_path: Path, options: list[str], message: str) -> None:
    r = bench("run", "--methods", "dpmerf", "--dataset", "synthetic", "--results", str(tmp_path), *options)
    assert r.exit_code == 2 and f"error: {message}" in r.output
    assert not (tmp_path / "runs").exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(BenchError, match=r"needs Ray, which is not installed: pip install 'bench-dp-gen\[ray\]'"):
        make_executor("ray")
    assert isinstance(make_executor("local"), harness.LocalExecutor)


def test_two_bench_run_processes_compute_each_cell_once(tmp_path: Path) -> None:
    """ "One process per GPU": two `bench run` of the same 4-cell grid on one results folder at once. Every cell is
    computed exactly once (one "start" in its log), both exit 0 with the whole table (the second waits for the
    cells the first is running), and the index is intact."""
    bench_exe = Path(sys.executable).parent / "bench"
    args = [str(bench_exe), "run", "--methods", "dpmerf", "--eps", "1,10", "--seeds", "0,1", "--dataset",
            "synthetic", "--profile", TINY_PROFILE, "--metrics", "fd_domain", "--results", str(tmp_path),
            "--device", "cpu"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in "ab"]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    specs = four_cells()
    for spec in specs:
        log = (tmp_path / "runs" / spec.key / "log.txt").read_text()
        assert log.count(f"start {spec.key}") == 1, (spec.key, outputs)
    for out in outputs:
        assert sum(f"| dpmerf | synthetic | {eps} |" in out for eps in (1, 10)) == 2, out
    with sqlite3.connect(tmp_path / "bench.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        statuses = dict(db.execute("SELECT key, status FROM runs").fetchall())
    assert len(statuses) == 5 and set(statuses.values()) == {"done"}


def test_bench_paper_takes_the_same_executor_options(tmp_path: Path) -> None:
    r = bench("paper", "dpsad-eccv24", "--run", "--results", str(tmp_path), "--executor", "ray", "--gpus-per-run",
              "2.5")  # fmt: skip
    assert (
        r.exit_code == 2 and "error: --gpus-per-run must be a fraction in [0, 1] or a whole number, got 2.5" in r.output
    )
    assert not (tmp_path / "runs").exists()
