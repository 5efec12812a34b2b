"""Stages several runs share, trained once per results folder: DP-SAD's non-private teacher is the first.

A method asks for one through `bench.contract.shared_stage(progress, name, ident, build)`; the harness's Progress
(bench.grid.RunProgress) answers through `SharedStages.get`. A stage is keyed by its name, the method's `ident`
(everything that determines it: its config, its seed, its code version), the dataset and the dataset's fingerprint,
and lives in

    results/shared/<name>-<dataset>-<hash>/   final.pt     {"kind": "shared", "state", "fit_s", "finished_at", ...}
                                              checkpoint.pt  while it trains (resumed by the next caller)
                                              meta.json      what it is, who trained it, how long it took
                                              log.txt        one line per attempt: trained, resumed or reused
                                              lock           fcntl.flock while a process trains or reads it

Every caller takes the stage's lock (blocking), so two cells, two `bench run` processes or two Ray workers that need
the same stage wait for one another instead of training it twice. `--force` recomputes a stage once per grid: a
stage finished before the grid started (`force_since`, the driver's start time, also given to Ray workers) is
trained again; one finished after it is reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import data
from bench.contract import Progress
from bench.errors import BenchError
from bench.grid.store import load_torch, read_json, save_torch, write_json

ProgressFactory = Callable[[Path], Progress]  # the checkpoint path of a stage -> the Progress its build runs under


def stage_key(name: str, ident: dict[str, Any], dataset: str, data_version: str = "") -> str:
    """The folder name of a shared stage: <name>-<dataset>-<12 hex digits of its identity>."""
    blob = json.dumps({"name": name, "ident": ident, "dataset": dataset, "data_version": data_version},
                      sort_keys=True, default=str)  # fmt: skip
    return f"{data.file_stem(name)}-{data.file_stem(dataset)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass
class SharedStages:
    """The shared stages of one cell: where they live, how they are trained, and what this cell used (`used`: name ->
    {"key", "fit_s", "trained_here"}, for the run's cost)."""

    root: Path  # results/shared
    dataset: str
    data_version: str
    progress: ProgressFactory
    force_since: float | None = None  # --force: stages finished before this time (the grid's start) are retrained
    used: dict[str, dict[str, Any]] = field(default_factory=dict)
    spent_s: float = 0.0  # seconds this cell spent in `get` (training, waiting for another process, loading)

    def folder(self, name: str, ident: dict[str, Any]) -> Path:
        return self.root / stage_key(name, ident, self.dataset, self.data_version)

    def get(self, name: str, ident: dict[str, Any], build: Callable[[Progress], dict[str, Any]]) -> dict[str, Any]:
        """The stage's state: the stored one, or trained now by `build` (resuming an interrupted training)."""
        t0 = time.perf_counter()
        folder = self.folder(name, ident)
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / "lock"):
            record = self._finished(folder)
            trained_here = record is None
            if record is None:
                record = self._train(folder, name, ident, build)
            else:
                _log(folder, "reused")
        self.used[name] = {"key": folder.name, "fit_s": record["fit_s"], "trained_here": trained_here}
        self.spent_s += time.perf_counter() - t0
        return record["state"]  # type: ignore[no-any-return]

    def _finished(self, folder: Path) -> dict[str, Any] | None:
        final = folder / "final.pt"
        if not final.is_file():
            return None
        record = load_torch(final)
        if not isinstance(record, dict) or record.get("kind") != "shared":
            raise BenchError(f"{final} is not a shared stage; delete {folder} or rerun with --force")
        if self.force_since is not None and record["finished_at"] < self.force_since:
            _log(folder, "forced: finished before this grid started, trained again")
            final.unlink()
            (folder / "checkpoint.pt").unlink(missing_ok=True)
            return None
        return record

    def _train(
        self, folder: Path, name: str, ident: dict[str, Any], build: Callable[[Progress], dict[str, Any]]
    ) -> dict[str, Any]:
        checkpoint = folder / "checkpoint.pt"
        _log(folder, "resumed from its checkpoint" if checkpoint.is_file() else "trained")
        meta_path = folder / "meta.json"
        before = float(read_json(meta_path).get("fit_s", 0.0)) if meta_path.is_file() else 0.0
        meta = {"name": name, "ident": ident, "dataset": self.dataset, "data_version": self.data_version,
                "host": socket.gethostname(), "pid": os.getpid(), "status": "training", "fit_s": before}  # fmt: skip
        write_json(meta_path, meta)
        t0 = time.perf_counter()
        try:
            state = build(self.progress(checkpoint))
        finally:  # an interrupted attempt's seconds count too: the stage's cost is all the time it took
            meta["fit_s"] = round(before + time.perf_counter() - t0, 3)
            write_json(meta_path, meta)
        record = {"kind": "shared", "name": name, "ident": ident, "state": state, "fit_s": meta["fit_s"],
                  "finished_at": time.time()}  # fmt: skip
        save_torch(folder / "final.pt", record)
        checkpoint.unlink(missing_ok=True)
        write_json(meta_path, meta | {"status": "done"})
        return record


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, waiting for it (released when the block ends or the process dies)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(folder: Path, what: str) -> None:
    with open(folder / "log.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} pid {os.getpid()}: {what}\n")
