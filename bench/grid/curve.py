"""Quality against compute: a fit's model scored at checkpoints along its training (`--set eval.curve=N`).

While a method fits, the harness's Progress (bench.grid.RunProgress) counts the method's units of progress
(dpdm, dpgan, dpsad: DP-SGD steps, dpsad's teacher steps first; ddpm: plain steps; pategan: iterations;
dpmerf, dphp: generator steps after the noisy release) and, at N points evenly spaced over them
(round(total · k / N), k = 1..N, the last one the end of the fit), a CurveRecorder saves the method's
state_dict (on the CPU) with the units, the total and the fit's elapsed seconds, not counting the
time the snapshots themselves take, as RUN/curve/<units>.pt. Its state (elapsed seconds, points taken)
travels in each training checkpoint, so a resumed fit keeps the seconds continuous and takes no point twice.

Only after the run has passed the privacy check are the points scored (`score_snapshots`): each from a fresh
instance of the method loaded with its own snapshot, on `curve_n` samples (balanced labels, a fixed seed)
with `curve_metrics`. RUN/curve.json gets one record per point as it is scored, and the point's snapshot is
then deleted; an interrupted scoring resumes with the points curve.json does not have. A run that fails the
privacy check has its snapshots deleted unscored (`discard`).

curve.json: {"unit", "points_requested", "n_samples", "metrics", "points": [{"units", "total", "seconds",
"offset_s", "n_samples", "progress" (the method's progress description), "sample_s", "score_s", "metrics":
{metric: bench.metrics.evaluate's record, with its own sample count}}]}. `seconds` is this run's own fit
time; `offset_s` (CurveRecorder.offset_s) is the fit time of the shared stages its points build on (dpsad's
teacher, set by RunProgress.shared), the single place a time spent before the fit enters: the report's time
axis is seconds + offset_s. Time inside the fit that should not count (the snapshots' own; a shared stage trained
inside it) is left out with CurveRecorder.excluded().
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench import config as cfgmod
from bench.errors import BenchError
from bench.grid.store import load_torch, read_json, save_torch, write_json
from bench.metrics.protocols import ON_REQUEST_PROTOCOLS

FOLDER = "curve"  # RUN/curve/<units>.pt: the snapshots not yet scored
FILE = "curve.json"
DEFAULT_N = 500  # samples per point, at most n_gen: see README ("Quality against compute") for its cost
DEFAULT_METRICS = ("fd_domain", "acc_logreg")  # cheap: the cached domain CNN's features, a linear classifier
SETTINGS = ("curve", "curve_n", "curve_metrics")  # bench.metrics.EvalSettings' fields of the curve
UNIT = "training steps (DP steps; kernel methods: generator steps after the release)"


def eval_json(settings: Any, n_gen: int) -> dict[str, Any]:
    """The evaluation settings as a plan stores (and the run key hashes) them: without any curve field when
    `settings.curve` is 0, so that a plan without a curve keeps the keys it had before curves existed; with a
    curve, its sample count and metrics resolved (defaults: min(n_gen, DEFAULT_N), DEFAULT_METRICS)."""
    out = cfgmod.to_jsonable(settings)
    out["protocols"] = {  # an on-request protocol at its reference settings is left out: adding one keeps the keys
        name: table
        for name, table in out.get("protocols", {}).items()
        if not (name in ON_REQUEST_PROTOCOLS and all(v is None for v in table.values()))
    }
    if not settings.curve:
        if given := [f"eval.{k}" for k in SETTINGS[1:] if out[k] is not None]:
            verb = "needs" if len(given) == 1 else "need"
            raise BenchError(f"{' and '.join(given)} {verb} eval.curve > 0 (the number of points along each fit)")
        return without_curve(out)
    out["curve_n"] = settings.curve_n or min(n_gen, DEFAULT_N)
    out["curve_metrics"] = list(settings.curve_metrics or DEFAULT_METRICS)
    return out


def without_curve(settings: dict[str, Any]) -> dict[str, Any]:
    """A plan's evaluation settings without the curve's: what a real-data row depends on."""
    return {k: v for k, v in settings.items() if k not in SETTINGS}


def points(total: int, n: int) -> list[int]:
    """The units at which a fit of `total` units is snapshotted: round(total · k / n) (halves up), k = 1..n, each
    once; none at 0 units (an untrained model), so a fit shorter than n units has fewer points."""
    return sorted({(2 * total * k + n) // (2 * n) for k in range(1, n + 1)} - {0})


def _on_cpu(obj: Any) -> Any:
    """A state with every tensor on the CPU. No copy of the CPU ones: the snapshot is written to disk at once, before
    the model trains on in place, and scored later from the file by a fresh instance on the run's device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


class CurveRecorder:
    """Snapshots of one fit at `n` points evenly spaced over its units of progress (see the module's doc).

    RunProgress forwards `start` and `advance` and keeps `state()` in its training checkpoints; `restore`
    takes it back when the fit resumes. `state_fn` is the method's state_dict."""

    def __init__(
        self, folder: Path, n: int, state_fn: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:  # fmt: skip
        self.folder, self.n, self.state_fn, self.clock = folder, n, state_fn, clock
        self.total = self.units = 0
        self.description = ""  # the method's progress description, recorded with each point
        self.pending: list[int] = []
        self.taken: list[int] = []  # units of the snapshots saved by this fit (and the fits it resumes)
        self._t0, self._before, self._saving = clock(), 0.0, 0.0
        # seconds spent before this fit that its points build on (a shared pre-trained stage): the one place such a
        # time enters the curve (each point's `offset_s`; the report's time axis is seconds + offset_s): the shared
        # stages' fit seconds (bench.grid.RunProgress.shared)
        self.offset_s = 0.0

    def elapsed(self) -> float:
        """Seconds of this fit so far (its interrupted sessions included), without the time `excluded` (the
        snapshots' own)."""
        return self._before + self.clock() - self._t0 - self._saving

    @property
    def saving_s(self) -> float:
        """Seconds this session left out of the fit's time (saving snapshots)."""
        return self._saving

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Leave the time spent inside out of the points' seconds."""
        t0 = self.clock()
        try:
            yield
        finally:
            self._saving += self.clock() - t0

    def state(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed(), "taken": list(self.taken), "offset_s": self.offset_s}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue an interrupted fit from its checkpoint's state: the seconds it had taken until that checkpoint
        (this session's own set-up before the resume counts too: it is spent again), the points saved."""
        if state:
            self._before = float(state["elapsed_s"])
            self.taken = [int(u) for u in state["taken"]]
            self.offset_s = float(state.get("offset_s", 0.0))

    def start(self, total: int, description: str = "") -> None:
        self.total, self.units, self.description = total, 0, description
        self.pending = [u for u in points(total, self.n) if u not in self.taken]

    def advance(self, n: int = 1) -> None:
        """`n` more units: one snapshot when this crosses a point not taken yet. A resumed fit's first advance (to
        the units it resumes at) crosses only points taken before its checkpoint; a method that advances by
        several units at once gets its snapshot at the units it reached."""
        self.units += n
        if self.pending and self.pending[0] <= self.units:
            self.pending = [u for u in self.pending if u > self.units]
            self._snapshot()

    def _snapshot(self) -> None:
        seconds = self.elapsed()
        with self.excluded():
            record = {"units": self.units, "total": self.total, "seconds": seconds, "offset_s": self.offset_s,
                      "progress": self.description, "state": _on_cpu(self.state_fn())}  # fmt: skip
            save_torch(self.folder / f"{self.units}.pt", record)
        if self.units not in self.taken:
            self.taken.append(self.units)


def recorder(settings: dict[str, Any], run_dir: Path, state_fn: Callable[[], dict[str, Any]]) -> CurveRecorder | None:
    """The recorder of a run whose plan's evaluation settings (`EvalPlan.settings`) ask for a curve, else None."""
    n = int(settings.get("curve") or 0)
    return CurveRecorder(run_dir / FOLDER, n, state_fn) if n else None


def snapshots(run_dir: Path) -> list[Path]:
    """The run's snapshots not scored yet, by units."""
    folder = run_dir / FOLDER
    return sorted(folder.glob("*.pt"), key=lambda p: int(p.stem)) if folder.is_dir() else []


def discard(run_dir: Path) -> None:
    """Delete a run's snapshots unscored (the run failed its privacy check: nothing of it is published)."""
    shutil.rmtree(run_dir / FOLDER, ignore_errors=True)


def read_points(run_dir: Path) -> list[dict[str, Any]]:
    """The scored points of a run's curve.json ([] when it has none)."""
    path = run_dir / FILE
    return list(read_json(path).get("points", [])) if path.is_file() else []


def score_snapshots(
    run_dir: Path, *, requested: int, n_samples: int, metrics: tuple[str, ...],
    score: Callable[[dict[str, Any]], dict[str, Any]], log: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Score each snapshot not in curve.json yet with `score(state)` (-> {"metrics", "sample_s", "score_s"}),
    append its point to curve.json and delete the snapshot; returns every point of the curve, by units."""
    done = {int(p["units"]): p for p in read_points(run_dir)}
    header = {"unit": UNIT, "points_requested": requested, "n_samples": n_samples, "metrics": list(metrics)}
    for path in snapshots(run_dir):
        snap = load_torch(path)
        units = int(snap["units"])
        if units not in done:
            point = {"units": units, "total": int(snap["total"]), "seconds": round(float(snap["seconds"]), 3),
                     "offset_s": float(snap.get("offset_s", 0.0)), "n_samples": n_samples,
                     "progress": str(snap.get("progress", ""))}  # fmt: skip
            done[units] = point | score(snap["state"])
            write_json(run_dir / FILE, header | {"points": [done[u] for u in sorted(done)]})
            log(f"curve: scored the point at {units} of {point['total']} units ({point['seconds']:.1f} s of fit)")
        path.unlink()
    if not done:
        write_json(run_dir / FILE, header | {"points": []})
        log("curve: no point (the method reported no progress through Progress.start/advance)")
    with contextlib.suppress(OSError):  # the emptied folder
        (run_dir / FOLDER).rmdir()
    return [done[u] for u in sorted(done)]
