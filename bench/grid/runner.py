"""Execute one cell of a grid: fit -> verify ε -> sample -> score -> store (the Runner), and a dataset's real-data row.

A finished key is skipped unless forced; an interrupted one resumes from its checkpoint (model, optimizer, RNG and
accountant state together). The executors (bench.grid.executors) call `Runner.run` for each job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import resource
import secrets
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import config as cfgmod
from bench import data
from bench.contract import ImageDataset, NullProgress
from bench.errors import BenchError, one_line
from bench.grid import curve, registry
from bench.grid.planning import REAL, EvalPlan, Job, RealRow, RunSpec, index_fields, real_key, spec_from_json
from bench.grid.shared import SharedStages
from bench.grid.store import Store, load_torch, read_json, save_torch, write_json
from bench.privacy import BudgetExceeded, PrivacyLedger, epsilon, privacy_card, verify


def take_lock(f: Any, *, wait: bool = False) -> bool:
    """An exclusive fcntl.flock on the open file `f` (a cell's lock, the Ray probe's): True when taken, False when
    another process holds it (with `wait`: blocks until it is free)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def fit_generator(seed: int) -> torch.Generator:
    """The contract's generator of a fit: on the CPU, seeded by the run's seed (a resumed fit restores its state
    from the checkpoint)."""
    return torch.Generator().manual_seed(seed)


def os_fit_generator() -> torch.Generator:
    """`--noise-source os`: the contract's generator of a fit seeded with 63 bits of OS entropy (secrets), a
    seed never written; everything the fit draws (DP noise, Poisson batches, initial weights) derives from it.
    A resumed fit restores the generator's state from its checkpoint, as a seeded one does, so its DP steps and
    ledger are those of an uninterrupted fit. torch's CPU generator is a Mersenne Twister, not a cryptographically
    secure one (opacus' secure_mode draws from torchcsprng, which is not built for this torch)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def checkpoint_interval() -> float:
    """Seconds between training checkpoints: BENCH_CHECKPOINT_EVERY (a number ≥ 0; 0 = every step), else 60."""
    return cfgmod.env_seconds("BENCH_CHECKPOINT_EVERY", 60.0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if match := re.fullmatch(r"cuda(?::(\d+))?", device):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise BenchError(f"--device must be auto, cpu or cuda[:N], got {device!r}")


class RunProgress:
    """The Progress given to Method.fit: drives a progress bar and saves crash-safe checkpoints; with a `recorder`
    (`eval.curve`), it also snapshots the model along the fit (bench.grid.curve.CurveRecorder), the recorder's state
    (elapsed seconds, points taken) kept in each checkpoint so that a resumed fit continues it."""

    def __init__(
        self,
        path: Path,
        every_s: float,
        on_start: Callable[[int, str], None],
        on_advance: Callable[[int], None],
        recorder: curve.CurveRecorder | None = None,
    ):
        self.path, self.every_s = path, every_s
        self._on_start, self._on_advance = on_start, on_advance
        self._last = time.monotonic()
        self._t0 = time.perf_counter()  # this attempt's start
        self.saved = 0
        self.recorder = recorder
        self.stages: SharedStages | None = None  # the cell's shared stages (bench.grid.shared), when it may use them
        # earlier attempts of an interrupted fit (from its checkpoint): their fit seconds up to their last checkpoint
        # (the time after it is lost with the process) and their number; the run's cost adds them to this attempt's
        self.before_s, self.attempts = 0.0, 1

    def fit_seconds(self) -> float:
        """Seconds of this fit so far, every attempt counted, without the shared stages this attempt trained."""
        shared = self.stages.spent_s if self.stages is not None else 0.0
        return self.before_s + time.perf_counter() - self._t0 - shared

    def shared(self, name: str, ident: dict[str, Any], build: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """The contract's optional member (bench.contract.shared_stage): the stage from the results folder's
        shared stages, trained there once; without them, built here."""
        if self.stages is None:
            return build(NullProgress())
        if self.recorder is None:
            return self.stages.get(name, ident, build)
        with self.recorder.excluded():  # the stage's time is its own (reused by other runs), not this fit's ...
            state = self.stages.get(name, ident, build)
        # ... and every point of the curve builds on it (set, not added: a resumed fit asks for its stages again)
        self.recorder.offset_s = sum(used["fit_s"] for used in self.stages.used.values())
        return state

    def start(self, total: int, description: str = "") -> None:
        self._on_start(total, description)
        if self.recorder is not None:
            self.recorder.start(total, description)

    def advance(self, n: int = 1) -> None:
        self._on_advance(n)
        if self.recorder is not None:
            self.recorder.advance(n)

    def resume(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        ckpt = load_torch(self.path)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != "fit" or "state" not in ckpt:
            raise BenchError(
                f"checkpoint {self.path} is corrupt (not a training checkpoint); delete it or rerun with --force"
            )
        if self.recorder is not None:
            self.recorder.restore(ckpt.get("curve"))
        earlier = ckpt.get("attempts") or {}
        self.before_s = float(earlier.get("fit_s", 0.0))
        self.attempts = int(earlier.get("attempts", 1)) + 1
        return ckpt["state"]

    def checkpoint(self, state_fn: Callable[[], dict[str, Any]]) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            extra = {"curve": self.recorder.state()} if self.recorder is not None else {}
            attempts = {"fit_s": self.fit_seconds(), "attempts": self.attempts}
            save_torch(self.path, {"kind": "fit", "state": state_fn(), "attempts": attempts, **extra})
            self._last = now
            self.saved += 1


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long) % num_classes


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def _timed(costs: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    costs[f"{stage}_s"] = round(time.perf_counter() - t0, 3)


class Runner:
    """Executes RunSpecs one after another in this process (the `local` executor)."""

    def __init__(
        self,
        store: Store,
        *,
        device: torch.device,
        data_root: str | None = None,
        download: bool = False,
        plugins: tuple[str, ...] = (),
        force: bool = False,
        checkpoint_every_s: float | None = None,
        metrics: tuple[str, ...] | None = None,
        inception_weights: str | None = None,
        debug: bool = False,
        datasets: dict[tuple[str, str], ImageDataset] | None = None,
        force_since: float | None = None,
    ) -> None:
        """`datasets`: a cache of loaded splits to share with other runners of the same data root (a Ray worker
        keeps one across its tasks). `force_since`: with `force`, the grid's start time (default: now)."""
        self.store, self.device, self.data_root, self.download = store, device, data_root, download
        self.plugins, self.force, self.metrics = plugins, force, metrics
        # --force retrains a shared stage (bench.grid.shared) finished before this time, once per grid (Ray workers get
        # the driver's time)
        self.force_since: float | None = (force_since or time.time()) if force else None
        self.inception_weights = inception_weights
        self.debug = debug  # print a failed cell's traceback on stderr too (it is always in its log.txt)
        self.errors: dict[str, str] = {}  # key -> the one-line error of each cell that failed in this process
        self.checkpoint_every_s = checkpoint_every_s if checkpoint_every_s is not None else checkpoint_interval()
        self._data: dict[tuple[str, str], ImageDataset] = {} if datasets is None else datasets

    def dataset(self, name: str, split: str) -> ImageDataset:
        if (name, split) not in self._data:
            self._data[name, split] = data.load(name, split, root=self.data_root, download=self.download)  # type: ignore[arg-type]
        return self._data[name, split]

    def _run_dir(self, key: str) -> Path | None:
        """The folder of run `key`, ready to (re)compute it; None when it is finished and not forced."""
        if self.store.finished(key):
            if not self.force:
                return None
            self.store.clear(key)
        run_dir = self.store.run_dir(key)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def log(self, run_dir: Path, message: str) -> None:
        with open(run_dir / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def run(self, job: Job, *, ui: Any = None, wait: bool = False) -> str:
        """Run one cell (or a real-data row: `run_real`); returns "skipped", "done", "failed" or "busy". A cell
        fails when its ε exceeds the budget or anything in it raises: its index row says "failed" with a one-line
        `error` (also in `self.errors`), its log.txt has the traceback, and the caller goes on with the next cell.
        A cell that another process is running (a second `bench run` on the same results folder, a Ray worker) is
        "busy" and left alone, or with `wait` waited for, then skipped when that process finished it, or resumed
        when it did not. `ui` (bench.ui.GridUI) shows the fit's progress bar."""
        if isinstance(job, RealRow):
            return self.run_real(job.dataset, job.eval, profile=job.profile, data_version=job.data_version, wait=wait)
        key = job.key
        with self.cell_lock(key, wait=wait) as mine:
            if not mine:
                return "busy"
            if (run_dir := self._run_dir(key)) is None:
                if (status := self.store.status(key)) != "done":  # its worker was lost after finishing the folder
                    self.store.reindex(key)  # (a Ray worker cannot read the index: the driver sets it, quietly)
                    if status is not None:
                        self.log(self.store.run_dir(key), f"index said {status!r}: set from the finished folder")
                return "skipped"
            return self._guarded(key, run_dir, lambda: self._run(job, run_dir, ui))

    def lock_path(self, key: str) -> Path:
        return self.store.root / "locks" / f"{key}.lock"

    @contextmanager
    def cell_lock(self, key: str, *, wait: bool = False) -> Iterator[bool]:
        """An exclusive lock on cell `key` for this process (results/locks/<key>.lock, fcntl.flock, released when
        the cell ends or the process dies): True when taken, False when another process holds it (with `wait`:
        blocks until it is free). Taken before the run folder is touched, so a second process never resumes,
        clears (--force) or writes a cell in progress. The holder writes its host and pid into the file
        (`lock_holder`)."""
        path = self.lock_path(key)
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+") as f:
            if not take_lock(f, wait=wait):
                yield False
                return
            try:
                f.truncate(0)
                f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
                f.flush()
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def lock_holder(self, key: str) -> str:
        """Who holds (or last held) cell `key`'s lock: "host pid N", or "" when unknown."""
        try:
            return self.lock_path(key).read_text().strip()
        except OSError:
            return ""

    def record_failure(self, job: Job, error: str) -> None:
        """Record job `job` as failed with `error` from outside it (its worker was lost): index and log.txt."""
        run_dir = self.store.run_dir(job.key)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log(run_dir, f"FAILED: {error}")
        self.store.record_run(job.key, **index_fields(job), status="failed", error=error)

    def _guarded(
        self, key: str, run_dir: Path, body: Callable[[], str],
        record: Callable[[str, str | None, str], None] | None = None,
    ) -> str:  # fmt: skip
        """`body()`, with any exception but an interrupt recorded as the cell's failure (see `run`); `record(key,
        error, status)` writes the index row (default: the runs table's)."""
        record = record or (lambda k, error, status: self.store.record_run(k, status=status, error=error))
        try:
            return body()
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                record(key, None, "interrupted")
                self.log(run_dir, "interrupted: rerun the same command to resume from the last checkpoint")
            raise
        except Exception as e:  # noqa: BLE001 - a cell's failure must not end the grid
            error = one_line(e)
            self.errors[key] = error
            self.log(run_dir, f"FAILED: {error}\n{traceback.format_exc()}")
            record(key, error, "failed")
            if self.debug:
                traceback.print_exc()
            return "failed"

    def _run(self, spec: RunSpec, run_dir: Path, ui: Any) -> str:
        from bench.metrics import EvalSettings, check_resources

        key = spec.key
        cls = registry.get(spec.method, self.plugins)
        code = registry.code_record(cls)
        write_json(run_dir / "config.json", spec.to_json() | {"device": str(self.device), "code": code})
        self.store.record_run(key, **index_fields(spec), status="running", error=None)
        self.log(run_dir, f"start {key} on {self.device}")
        for note in spec.notes:
            self.log(run_dir, f"warning: {note}")
        train = self.dataset(spec.dataset, "train")
        method = cls(spec.config, spec=train.spec, device=self.device)
        costs: dict[str, Any] = {}
        ckpt_path = run_dir / "checkpoint.pt"
        final = load_torch(ckpt_path) if ckpt_path.is_file() else None
        if final is not None and final.get("kind") == "final":
            method.load_state_dict(final["method_state"])
            ledger = PrivacyLedger.from_dict(final["ledger"])
            costs = final["costs"]
            self.log(run_dir, "fit already finished: loaded the final checkpoint")
        else:
            check_resources(spec.dataset, train.spec, settings=EvalSettings(**spec.eval.settings), device=self.device,
                            metrics=self.metrics or spec.eval.metrics)  # fmt: skip
            budget = spec.budget
            if spec.noise_source == "os":
                generator = os_fit_generator()
                self.log(run_dir, "noise source: OS entropy (the fit's seed is not written; not bit-reproducible)")
            else:
                generator = fit_generator(spec.seed)
            recorder = curve.recorder(spec.eval.settings, run_dir, method.state_dict)
            progress = RunProgress(ckpt_path, self.checkpoint_every_s, *bar_callbacks(ui, spec), recorder)
            progress.stages = self.shared_stages(spec, ui)
            with _timed(costs, "fit"):
                ledger = method.fit(train, budget=budget, generator=generator, progress=progress)
            if progress.stages.used:  # fit_s is this run's own: the shared stages' time is theirs (costs["shared"])
                costs["fit_s"] = round(costs["fit_s"] - progress.stages.spent_s, 3)
                costs["shared"] = progress.stages.used
            # a resumed fit: every attempt's seconds (each up to its last checkpoint), and how many attempts
            costs["fit_s"] = round(costs["fit_s"] + progress.before_s, 3)
            costs["fit_attempts"] = progress.attempts
            if recorder is not None:  # inside fit_s: the time the snapshots took (the curve's seconds leave it out)
                costs["curve_snapshots_s"] = round(recorder.saving_s, 3)
            save_torch(
                ckpt_path,
                {
                    "kind": "final",
                    "method_state": method.state_dict(),
                    "ledger": ledger.to_dict(),
                    "costs": costs,
                },
            )
            attempts = f" over {progress.attempts} attempts" if progress.attempts > 1 else ""
            self.log(run_dir, f"fit finished in {costs['fit_s']} s{attempts}")
        status = self._privacy(spec, cls, ledger, run_dir)
        if status == "failed":
            curve.discard(run_dir)  # an over-budget run publishes nothing: its curve is never scored
            return "failed"
        if spec.eval.settings.get("curve"):
            with _timed(costs, "curve"):
                self._score_curve(spec, cls, spec.config, train, run_dir)
        self._sample_and_score(spec, method, train, run_dir, costs)
        return "done"

    def shared_stages(self, spec: RunSpec, ui: Any) -> SharedStages:
        """The shared stages (bench.grid.shared) a cell's fit may use: results/shared, keyed by its dataset; trained
        under the cell's progress bar; with --force, those finished before this grid started are trained again."""

        def progress(path: Path) -> RunProgress:
            return RunProgress(path, self.checkpoint_every_s, *bar_callbacks(ui, spec))

        return SharedStages(self.store.root / "shared", spec.dataset, spec.data_version, progress, self.force_since)

    def _score_curve(self, spec: RunSpec, cls: Any, config: Any, train: ImageDataset, run_dir: Path) -> None:
        """Score the fit's curve snapshots (bench.grid.curve), each from a fresh instance of the method loaded with its
        own snapshot, on `curve_n` samples (balanced labels, the main samples' seed) with `curve_metrics`; index
        the points."""
        from bench.metrics import EvalSettings, check_samples, evaluate

        settings = EvalSettings(**spec.eval.settings)
        n, wanted = int(settings.curve_n or 0), tuple(settings.curve_metrics or ())
        test = self.dataset(spec.dataset, "test")

        def score(state: dict[str, Any]) -> dict[str, Any]:
            method = cls(config, spec=train.spec, device=self.device)
            method.load_state_dict(state)
            labels = balanced_labels(n, train.num_classes) if method.conditional else None
            t0 = time.perf_counter()
            images = method.sample(n, labels=labels, generator=torch.Generator().manual_seed(spec.seed + 1_000_003))
            sample_s, images = time.perf_counter() - t0, images.cpu()
            check_samples(images, labels, spec=train.spec, conditional=labels is not None)
            metrics = evaluate(images, labels, dataset=spec.dataset, train=train, test=test, seed=spec.seed,
                               settings=settings, device=self.device, metrics=wanted,
                               inception_weights=self.inception_weights, epsilon=spec.epsilon)  # fmt: skip
            return {"sample_s": round(sample_s, 3), "score_s": round(time.perf_counter() - t0 - sample_s, 3),
                    "metrics": metrics}  # fmt: skip

        points = curve.score_snapshots(run_dir, requested=settings.curve, n_samples=n, metrics=wanted, score=score,
                                       log=lambda line: self.log(run_dir, line))  # fmt: skip
        self.store.record_curve(spec.key, points)

    def run_real(
        self, dataset: str, eval_plan: EvalPlan, *, profile: str, data_version: str = "", wait: bool = False
    ) -> str:
        """The dataset's real-data row: the same metrics with real data in place of samples.

        Fidelity: `n_gen` real test images (a fixed seeded subset) against the training set, the floor a
        generator can reach at that sample count. Accuracy: the same classifiers trained on the whole real
        training set, or with `eval.real_train = "n_gen"` on a seeded subset of `n_gen` real training images
        (cached per dataset, training images and classifier seed: downstream.real_reference). Returns
        "skipped", "done", "failed" or "busy" (as `run`).
        """
        key = real_key(dataset, eval_plan, data_version)
        with self.cell_lock(key, wait=wait) as mine:
            if not mine:
                return "busy"
            if (run_dir := self._run_dir(key)) is None:
                return "skipped"
            return self._guarded(key, run_dir, lambda: self._run_real(key, run_dir, dataset, eval_plan, profile))

    def _run_real(self, key: str, run_dir: Path, dataset: str, eval_plan: EvalPlan, profile: str) -> str:
        from bench.metrics import EvalSettings, accuracy_metrics, evaluate, select_metrics
        from bench.metrics.downstream import classifier_seeds, over_seeds, real_reference

        write_json(
            run_dir / "config.json",
            {"kind": REAL, "method": REAL, "dataset": dataset, "epsilon": None, "delta": None, "accountant": None,
             "seed": 0, "profile": profile, "eval": dataclasses.asdict(eval_plan), "key": key},
        )  # fmt: skip
        row = RealRow(dataset=dataset, eval=eval_plan, profile=profile)
        self.store.record_run(
            key, **index_fields(row), status="running", guarantee="none", epsilon=math.inf, error=None
        )
        train, test = self.dataset(dataset, "train"), self.dataset(dataset, "test")
        settings = EvalSettings(**eval_plan.settings)
        wanted = select_metrics(self.metrics or eval_plan.metrics)
        accuracy = accuracy_metrics(wanted)
        costs: dict[str, Any] = {}
        with _timed(costs, "score"):
            n = min(eval_plan.n_gen, len(test))
            index = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n].sort().values
            fidelity = [m for m in wanted if m not in accuracy]
            metrics = (
                evaluate(test.images[index], test.labels[index], dataset=dataset, train=train, test=test, seed=0,
                         settings=settings, device=self.device, metrics=fidelity,
                         inception_weights=self.inception_weights)
                if fidelity
                else {}
            )  # fmt: skip
            metrics = {name: rec | {"reference_images": f"{n} real test images"} for name, rec in metrics.items()}
            if accuracy:
                real_train, described = train, f"the real train split ({len(train)} images)"
                if settings.real_train == "n_gen" and eval_plan.n_gen < len(train):
                    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: eval_plan.n_gen]
                    real_train = train.subset(pick.sort().values)
                    described = f"{eval_plan.n_gen} real train images (a seeded subset; eval.real_train = n_gen)"
                metrics |= {
                    name: record | {"reference_data": described}
                    for name, record in over_seeds(
                        [
                            real_reference(real_train, test, dataset=dataset, seed=s, metrics=accuracy,
                                           settings=settings.protocols, device=self.device)
                            for s in classifier_seeds(0, settings.classifier_seeds)
                        ]
                    ).items()
                }  # fmt: skip
        metrics = {m: metrics[m] for m in wanted if m in metrics}
        cost = costs | {"peak_rss_mib": round(_peak_rss_mib(), 1), "device": str(self.device)}
        write_json(run_dir / "metrics.json", {"key": key, "metrics": metrics, "cost": cost})
        self.store.record_metrics(key, metrics)
        self.store.record_run(key, status="done", cost=json.dumps(cost))
        self.log(run_dir, "real-data row: " + ", ".join(f"{k}={v.get('value')}" for k, v in metrics.items()))
        return "done"

    def _privacy(self, spec: RunSpec, cls: Any, ledger: PrivacyLedger, run_dir: Path) -> str:
        """Recompute ε from the ledger, write the card, refuse an over-budget run (privacy.verify)."""
        error, budget = None, spec.budget  # unlimited for a non-private method (planned at ε = ∞)
        if cls.guarantee == "none":
            eps, guarantee = math.inf, "none"
        else:
            guarantee = "partial" if ledger.non_private or cls.guarantee == "partial" else "end-to-end"
            try:
                eps = verify(ledger, budget)
            except BudgetExceeded as e:
                eps, error = epsilon(ledger, spec.delta, spec.accountant), str(e)
        card = privacy_card(ledger, budget, epsilon=eps, guarantee=guarantee, noise_source=spec.noise_source)
        card["status"] = "over budget" if error else "ok"
        write_json(run_dir / "privacy.json", card)
        if error:
            error = self.errors[spec.key] = f"over budget: {error}"
        self.store.record_run(
            spec.key, guarantee=guarantee, epsilon=eps, status="failed" if error else "sampling", error=error
        )
        if error:
            self.log(run_dir, f"FAILED: {error}")
            return "failed"
        self.log(run_dir, f"privacy: ε = {eps:.6g} ({spec.accountant}, δ = {spec.delta:g}), guarantee {guarantee}")
        return "ok"

    def _sample_and_score(
        self, spec: RunSpec, method: Any, train: ImageDataset, run_dir: Path, costs: dict[str, Any]
    ) -> None:
        from bench.metrics.sample_grid import save_sample_grid

        n = spec.eval.n_gen
        labels = balanced_labels(n, train.num_classes) if method.conditional else None
        generator = torch.Generator().manual_seed(spec.seed + 1_000_003)
        with _timed(costs, "sample"):
            images = method.sample(n, labels=labels, generator=generator).cpu()
        if images.dtype != torch.uint8 or tuple(images.shape) != (n, *train.images.shape[1:]):
            raise RuntimeError(f"{spec.method}.sample returned {images.dtype} {tuple(images.shape)}")
        np.savez_compressed(
            run_dir / "samples.npz",
            images=images.numpy(),
            labels=(labels if labels is not None else torch.full((n,), -1)).numpy(),
        )
        save_sample_grid(images, labels, run_dir / "samples.png", class_names=data.class_names(spec.dataset))
        released = getattr(method, "released_model", None)  # optional member of the contract
        costs["released_parameters"] = sum(p.numel() for p in released().parameters()) if released else None
        costs["precision"] = getattr(method, "precision", "fp32")  # what the training forward/backward ran in
        self._score(spec, images, labels, run_dir, costs, previous={})

    def _score(
        self,
        spec: RunSpec,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        run_dir: Path,
        costs: dict[str, Any],
        previous: dict[str, Any],
        wanted: tuple[str, ...] | None = None,
    ) -> None:
        """Score samples (`wanted`, else the runner's selection, else the plan's), merge with earlier records of
        other metrics, write metrics.json last."""
        from bench.metrics import EvalSettings, evaluate

        train, test = self.dataset(spec.dataset, "train"), self.dataset(spec.dataset, "test")
        settings = EvalSettings(**spec.eval.settings)
        with _timed(costs, "score"):
            metrics = evaluate(
                images,
                labels,
                dataset=spec.dataset,
                train=train,
                test=test,
                seed=spec.seed,
                settings=settings,
                device=self.device,
                metrics=wanted or self.metrics or spec.eval.metrics,
                inception_weights=self.inception_weights,
                epsilon=spec.epsilon,  # dpimagebench's Laplace selection noise has scale 1/ε
            )
        metrics = previous | metrics
        cost = costs | {"peak_rss_mib": round(_peak_rss_mib(), 1), "device": str(self.device)}
        if self.device.type == "cuda":
            cost["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        write_json(run_dir / "metrics.json", {"key": spec.key, "metrics": metrics, "cost": cost})
        self.store.record_metrics(spec.key, metrics)
        self.store.record_run(spec.key, status="done", cost=json.dumps(cost))
        self.log(run_dir, "scored: " + ", ".join(f"{k}={v.get('value')}" for k, v in metrics.items()))

    def score(self, run_dir: Path, metrics: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Re-score a finished run's saved samples.npz (no retraining); returns the new metrics. `metrics`:
        these instead of the runner's own selection."""
        from bench.metrics import check_samples

        cfg_path, samples_path = run_dir / "config.json", run_dir / "samples.npz"
        if cfg_path.is_file() and read_json(cfg_path).get("kind") == REAL:
            raise BenchError(f"{run_dir} is a real-data reference row, not samples; `bench run --force` recomputes it")
        if not cfg_path.is_file() or not samples_path.is_file():
            raise BenchError(f"{run_dir} is not a run folder with samples (config.json and samples.npz)")
        spec = spec_from_json(read_json(cfg_path), check=False)  # scoring needs the recorded settings, not the method
        try:
            with np.load(samples_path) as z:
                images, labels = torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
        except (OSError, ValueError, KeyError) as e:
            raise BenchError(f"{samples_path} is unreadable or lacks images/labels: {e}") from None
        conditional = bool(labels.numel()) and int(labels.min()) >= 0
        spec_data = self.dataset(spec.dataset, "train").spec
        check_samples(images, labels if conditional else None, spec=spec_data, conditional=conditional)
        labels = labels.long()
        old = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
        costs = dict(old.get("cost", {}))
        self._score(spec, images, labels if conditional else None, run_dir, costs, previous=old.get("metrics", {}),
                    wanted=metrics)  # fmt: skip
        return read_json(run_dir / "metrics.json")["metrics"]


def bar_callbacks(ui: Any, spec: Any) -> tuple[Callable[[int, str], None], Callable[[int], None]]:
    if ui is None:
        return (lambda total, desc: None), (lambda n: None)
    return ui.run_callbacks(spec)  # type: ignore[no-any-return]
