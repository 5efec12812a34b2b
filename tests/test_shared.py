"""Shared stages (bench.grid.shared): DP-SAD's non-private teacher is trained once per (dataset, config, seed, code) and
reused by every cell, every process and every Ray worker; resume and --force work as for runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from bench.methods.dpsad_teacher import DPSADTeacher

from bench.contract import NullProgress, Progress
from bench.grid.shared import SharedStages, stage_key
from bench.grid.store import read_json
from tests.conftest import TINY_PROFILE, bench

RUN = ("--dataset", "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--set", 'eval.metrics=["acc_logreg"]')


def teacher_logs(results: Path) -> dict[str, list[str]]:
    """Each shared teacher's log lines (what each attempt did), by folder name."""
    return {f.name: [line.split(": ", 1)[1] for line in (f / "log.txt").read_text().splitlines()]
            for f in sorted((results / "shared").iterdir())}  # fmt: skip


def index_rows(results: Path) -> list[dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(results / "bench.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM runs")]


def test_every_cell_of_a_grid_reuses_one_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ε and two λ: four dpsad cells and the teacher row, one teacher fit (a spy on its training)."""
    fits: list[int] = []
    real = DPSADTeacher.train_teacher

    def spy(self: DPSADTeacher, train: Any, seed: int, progress: Progress) -> dict[str, Any]:
        fits.append(seed)
        return real(self, train, seed, progress)

    monkeypatch.setattr(DPSADTeacher, "train_teacher", spy)
    results = tmp_path / "res"
    r = bench(
        "run", "--methods", "dpsad", "--eps", "5,10", "--sweep", "lambda_adv=0,1", *RUN, "--results", str(results)
    )
    assert r.exit_code == 0, r.output
    assert len(fits) == 1, "one teacher for every ε and every λ"
    (folder, lines), *rest = teacher_logs(results).items()
    assert not rest and lines == ["trained", "reused", "reused", "reused", "reused"]
    rows = {(row["method"], row["target_epsilon"], row["sweep"]): row for row in index_rows(results)}
    teacher_row = rows["dpsad-teacher", None, None]
    assert teacher_row["status"] == "done" and teacher_row["guarantee"] == "none"
    cells = [row for (m, _, _), row in rows.items() if m == "dpsad"]
    assert len(cells) == 4 and {row["guarantee"] for row in cells} == {"partial"}
    for row in cells:  # its time in every cell's cost, marked shared; the cell's own fit_s leaves it out
        cost = json.loads(row["cost"])
        assert cost["shared"]["dpsad-teacher"]["key"] == folder
        assert cost["shared"]["dpsad-teacher"]["fit_s"] == read_json(results / "shared" / folder / "meta.json")["fit_s"]
    assert sum(json.loads(row["cost"])["shared"]["dpsad-teacher"]["trained_here"] for row in rows.values()
               if row["method"] in ("dpsad", "dpsad-teacher")) == 1  # fmt: skip
    # a second seed is a second teacher; a rerun trains nothing
    r = bench("run", "--methods", "dpsad", "--eps", "5", "--seeds", "1", *RUN, "--results", str(results))
    assert r.exit_code == 0, r.output
    assert len(fits) == 2 and fits[1] != fits[0] and len(teacher_logs(results)) == 2


def test_force_retrains_the_teacher_once_per_grid(tmp_path: Path) -> None:
    results = tmp_path / "res"
    for extra in ((), ("--force",)):
        r = bench("run", "--methods", "dpsad", "--eps", "5,10", *RUN, "--results", str(results), *extra)
        assert r.exit_code == 0, r.output
    (lines,) = teacher_logs(results).values()
    forced = lines[3:]  # the first grid: trained (the teacher row), reused twice
    assert lines[:3] == ["trained", "reused", "reused"]
    assert forced == ["forced: finished before this grid started, trained again", "trained", "reused", "reused"]


def test_two_processes_needing_one_teacher_train_it_once(tmp_path: Path) -> None:
    """Two `bench run` processes on one results folder, started together, each with its own ε: one trains the
    teacher, the other waits on its lock and reuses it."""
    results = tmp_path / "res"
    env = os.environ | {"BENCH_CHECKPOINT_EVERY": "0"}
    args = [sys.executable, "-m", "bench.cli", "run", "--methods", "dpsad", *RUN, "--results", str(results)]
    procs = [subprocess.Popen([*args, "--eps", eps], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for eps in ("5", "10")]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()
    (lines,) = teacher_logs(results).values()
    assert lines.count("trained") == 1 and lines.count("reused") >= 2, lines  # the row once per process, 2 cells


class _Interrupt(Exception):
    pass


def test_an_interrupted_shared_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """A stage interrupted mid-training resumes from its checkpoint in the next caller, and its cost counts both."""

    class Progressed(NullProgress):
        def __init__(self, path: Path) -> None:
            self.path = path

        def resume(self) -> dict | None:
            return torch.load(self.path) if self.path.is_file() else None

        def checkpoint(self, state_fn: Any) -> None:
            torch.save(state_fn(), self.path)

    def build(progress: Progress) -> dict[str, Any]:  # counts to 4, checkpointing each step; stops once at 2
        state = progress.resume() or {"count": 0, "resumed_at": None}
        if state["count"]:
            state["resumed_at"] = state["count"]
        while state["count"] < 4:
            state["count"] += 1
            progress.checkpoint(lambda: dict(state))
            if state["count"] == 2 and state["resumed_at"] is None:
                time.sleep(0.05)
                raise _Interrupt
        return state

    stages = SharedStages(tmp_path / "shared", "synthetic", "", Progressed)
    with pytest.raises(_Interrupt):
        stages.get("counter", {"v": 1}, build)
    assert stages.get("counter", {"v": 1}, build) == {"count": 4, "resumed_at": 2}
    folder = tmp_path / "shared" / stage_key("counter", {"v": 1}, "synthetic")
    assert [line.split(": ", 1)[1] for line in (folder / "log.txt").read_text().splitlines()] == [
        "trained",
        "resumed from its checkpoint",
    ]
    assert read_json(folder / "meta.json")["fit_s"] >= 0.05, "the interrupted attempt's seconds count"
    assert not (folder / "checkpoint.pt").exists()
    assert stages.get("counter", {"v": 1}, build) == {"count": 4, "resumed_at": 2}  # stored: not built again
    assert stage_key("counter", {"v": 2}, "synthetic") != folder.name != stage_key("counter", {"v": 1}, "fmnist")
