"""Plan a grid of runs and execute them: fit -> verify ε -> sample -> score -> store.

A RunSpec has a stable key: a hash of everything that changes its result (method, resolved config,
dataset, ε, δ, accountant, seed, evaluation settings). A finished key is skipped unless forced; an
interrupted one resumes from its checkpoint (model, optimizer, RNG and accountant state together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bench import config as cfgmod
from bench import curve, data, registry
from bench.config import parse_epsilons, parse_list, parse_seeds  # noqa: F401 - their old home
from bench.contract import ImageDataset, NullProgress
from bench.errors import BenchError, one_line
from bench.privacy import Budget, BudgetExceeded, PrivacyLedger, default_delta, epsilon, privacy_card, verify
from bench.shared import SharedStages
from bench.store import Store, load_torch, read_json, save_torch, write_json

# Bump when a change of the harness changes results, so old keys are not reused. 3: keys hold the method's version
# (and a plugin's source hash), and Poisson masks are drawn in float64.
RESULT_VERSION = 3


@dataclass(frozen=True, kw_only=True)
class EvalPlan:
    """How a run is scored (the harness's, identical for every method)."""

    n_gen: int = 1000  # labelled samples generated, balanced over classes
    settings: dict[str, Any] = field(default_factory=dict)  # bench.metrics.EvalSettings overrides
    metrics: tuple[str, ...] | None = None  # default metric set (None: all); not part of the run key


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    method: str
    dataset: str
    epsilon: float  # math.inf for a non-private method
    delta: float
    accountant: str
    seed: int
    profile: str
    config: dict[str, Any]  # the method's resolved Config, as JSON
    eval: EvalPlan
    method_version: str = ""  # bench.registry.method_version: the method's declared version (+ a plugin's hash)
    data_version: str = ""  # bench.data.version: a user folder's fingerprint ("" for the published datasets)
    notes: tuple[str, ...] = ()
    # field -> value of each `--sweep` axis this cell lies on, for the tables' columns; not part of the key (the
    # values are in `config` already, so a run without sweeps keeps its key, and a swept cell equal to an
    # unswept one is the same run)
    sweep: dict[str, Any] = field(default_factory=dict)
    # where the fit's randomness (DP noise, batch sampling, initial weights) comes from: "seed" (the run's seed,
    # bit-reproducible) or "os" (`--noise-source os`: 63 bits of OS entropy a fit, never written); part of the key
    # only when "os", so that a seeded run keeps its key
    noise_source: str = "seed"

    @property
    def budget(self) -> Budget:
        """The cell's typed budget: the grid's (ε, δ, accountant) that `plan` checked, or unlimited (ε = ∞) for a
        non-private row. The fit is calibrated to it and the card verified against it (one construction rule)."""
        if math.isfinite(self.epsilon):
            return Budget(epsilon=self.epsilon, delta=self.delta, accountant=self.accountant)
        return Budget.unlimited(self.delta)

    @property
    def key(self) -> str:
        ident = {
            "v": RESULT_VERSION,
            "method": self.method,
            "method_version": self.method_version,
            "dataset": self.dataset,
            "epsilon": None if math.isinf(self.epsilon) else self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "seed": self.seed,
            "config": self.config,
            "eval": {k: v for k, v in dataclasses.asdict(self.eval).items() if k != "metrics"},
        }
        if self.data_version:
            ident["data_version"] = self.data_version
        if self.noise_source != "seed":
            ident["noise_source"] = self.noise_source
        blob = json.dumps(ident, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{data.file_stem(self.method)}-{data.file_stem(self.dataset)}-{digest}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"key": self.key}


REAL = "real"  # the method name of the real-data reference rows


def real_key(dataset: str, eval_plan: EvalPlan, data_version: str = "") -> str:
    """The key of a dataset's real-data row under an evaluation plan (the metric set and the curve settings, which
    do not change it, are not part of it)."""
    ident = {
        "v": RESULT_VERSION,
        "kind": REAL,
        "dataset": dataset,
        "eval": {k: v for k, v in dataclasses.asdict(eval_plan).items() if k != "metrics"}
        | {"settings": curve.without_curve(eval_plan.settings)},
    }
    if data_version:
        ident["data_version"] = data_version
    blob = json.dumps(ident, sort_keys=True, default=str)
    return f"{REAL}-{data.file_stem(dataset)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, kw_only=True)
class RealRow:
    """A dataset's real-data row as a job of the grid (Runner.run_real), with the fields a progress line shows."""

    dataset: str
    eval: EvalPlan
    profile: str
    data_version: str = ""
    method: str = REAL
    epsilon: float = math.inf
    seed: int = 0

    @property
    def key(self) -> str:
        return real_key(self.dataset, self.eval, self.data_version)


Job = RunSpec | RealRow  # what an executor runs: a cell of the grid or a real-data row


def spec_from_json(d: dict[str, Any]) -> RunSpec:
    """The RunSpec a config.json was written from."""
    eps = d["epsilon"]
    return RunSpec(
        method=d["method"],
        dataset=d["dataset"],
        epsilon=math.inf if eps is None else float(eps),
        delta=d["delta"],
        accountant=d["accountant"],
        seed=d["seed"],
        profile=d["profile"],
        config=d["config"],
        eval=EvalPlan(**d["eval"]),
        method_version=d.get("method_version", ""),
        data_version=d.get("data_version", ""),
        notes=tuple(d.get("notes", ())),
        sweep=dict(d.get("sweep") or {}),
        noise_source=d.get("noise_source", "seed"),
    )


def check_profile_sections(prof: dict[str, Any], profile: str, known: dict[str, Any]) -> None:
    """A profile's tables are [eval] and one per registered method: a section with another name (a typo) would be
    ignored and the method trained with its defaults, so it is refused in one line."""
    unknown = [k for k, v in prof.items() if isinstance(v, dict) and k != "eval" and k not in known]
    if unknown:
        raise BenchError(
            f"profile {profile}: section [{unknown[0]}] names no method (known: {', '.join(sorted(known))}; "
            "a plugin's section needs its --plugin)"
        )


def plan(
    *,
    methods: list[str],
    epsilons: list[float],
    datasets: list[str],
    seeds: list[int],
    delta: float | None,
    accountant: str,
    profile: str,
    sets: list[str],
    plugins: tuple[str, ...] = (),
    data_root: str | None = None,
    sweeps: list[str] | tuple[str, ...] = (),
    noise_source: str = "seed",
) -> list[RunSpec]:
    """Expand and validate the whole grid before anything runs: a bad value fails here, not mid-grid. `sweeps`
    (`--sweep [METHOD.]field=v1,v2,...`) add grid axes: each method runs at every combination of the values
    swept for it, each value checked as a `--set` value. `noise_source` ("seed" | "os") applies to the private
    methods' fits (a non-private row has no DP noise and stays seeded)."""
    if noise_source not in NOISE_SOURCES:
        raise BenchError(f"--noise-source must be one of {', '.join(NOISE_SOURCES)}, got {noise_source!r}")
    prof = cfgmod.load_profile(profile)
    method_sets, eval_sets = cfgmod.parse_sets(sets)
    # --set eval.dpdm.epochs=5 changes one field of the profile's [eval.dpdm]
    eval_table = cfgmod.merged(prof.get("eval", {}), eval_sets)
    from bench.metrics import EvalSettings, select_metrics

    n_gen = eval_table.pop("n_gen", EvalPlan().n_gen)
    if isinstance(n_gen, bool) or not isinstance(n_gen, int) or n_gen < 1:
        raise BenchError(f"eval.n_gen must be a positive integer, got {n_gen!r}")
    profile_metrics = eval_table.pop("metrics", None)
    if profile_metrics is not None:
        if not isinstance(profile_metrics, list):
            raise BenchError(f"eval.metrics must be a list of metric names, got {profile_metrics!r}")
        profile_metrics = select_metrics(profile_metrics)
    # [eval.dpdm] and the like: the settings of one downstream protocol
    eval_table["protocols"] = {k: eval_table.pop(k) for k in list(eval_table) if isinstance(eval_table[k], dict)}
    settings = cfgmod.build_dataclass(EvalSettings, eval_table, "eval")
    plan_eval = EvalPlan(n_gen=n_gen, settings=curve.eval_json(settings, n_gen), metrics=profile_metrics)
    classes = {name: registry.get(name, plugins) for name in methods}
    check_profile_sections(prof, profile, registry.methods(plugins))
    sets_of = cfgmod.method_sets(method_sets, classes)
    sweeps_of = _method_sweeps(sweeps, classes, sets_of)
    specs = []
    for ds in datasets:
        spec = data.spec(ds, root=data_root)
        data_version = data.version(ds, root=data_root)
        for name, cls in classes.items():
            private = cls.guarantee != "none"
            for eps in epsilons if private else [math.inf]:
                if private:
                    budget = Budget.for_records(eps, spec.num_train, delta=delta, accountant=accountant)
                else:  # a non-private reference: one ε = ∞ cell; δ only for the record
                    budget_delta = delta if delta is not None else default_delta(spec.num_train)
                    budget = None
                for config, sweep, notes in _swept_configs(cls.Config, name, sweeps_of[name], sets_of[name],
                                                           profile=prof, dataset=ds, epsilon=eps):  # fmt: skip
                    for seed in seeds:
                        specs.append(
                            RunSpec(
                                method=name,
                                dataset=ds,
                                epsilon=eps,
                                delta=budget.delta if budget else budget_delta,
                                accountant=accountant,
                                seed=seed,
                                profile=profile,
                                config=config,
                                eval=plan_eval,
                                method_version=registry.method_version(cls),
                                data_version=data_version,
                                notes=tuple(notes),
                                sweep=sweep,
                                noise_source=noise_source if private else "seed",
                            )
                        )
    return with_reference_rows(specs, plugins)


def with_reference_rows(specs: list[RunSpec], plugins: tuple[str, ...] = ()) -> list[RunSpec]:
    """The grid with the reference rows its methods ask for (a method class's optional `reference_rows(config,
    sweep)` -> {method: (config, sweep)}: dpsad's non-private teacher, `dpsad-teacher`), each once, non-private
    (ε = ∞), first: it trains the stage the cells then share under its own name. A row shows the cell's swept
    values of the fields that determine it (two swept teachers are two rows)."""
    rows: dict[str, RunSpec] = {}
    for spec in specs:
        hook = getattr(registry.get(spec.method, plugins), "reference_rows", None)
        for name, (config, sweep) in (hook(spec.config, spec.sweep) if hook is not None else {}).items():
            cls = registry.get(name, plugins)
            row = dataclasses.replace(spec, method=name, epsilon=math.inf, config=config, notes=(), sweep=sweep,
                                      method_version=registry.method_version(cls))  # fmt: skip
            rows.setdefault(row.key, row)
    return [*rows.values(), *specs]


def _method_sweeps(
    sweeps: list[str] | tuple[str, ...], classes: dict[str, Any], sets_of: dict[str, dict[str, Any]]
) -> dict[str, dict[str, list[Any]]]:
    """Each method's swept fields and their values (`--sweep`, with `--set`'s scoping rules); a field that `--set`
    also gives that method is an error."""
    parsed = cfgmod.parse_sweeps(list(sweeps))
    order = [key.rpartition(".")[2] for key in parsed]  # the axes in the order given (method_sets puts bare first)
    sweeps_of = cfgmod.method_sets(parsed, classes, option="--sweep")
    for name, fields in sweeps_of.items():
        if both := [f for f in fields if f in sets_of[name]]:
            raise BenchError(f"--sweep {both[0]}: {name}.{both[0]} is also given by --set; give it once")
    return {name: dict(sorted(fields.items(), key=lambda f: order.index(f[0]))) for name, fields in sweeps_of.items()}


def _swept_configs(
    config_cls: type, name: str, swept: dict[str, list[Any]], sets: dict[str, Any], **where: Any
) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[str]]]:
    """(resolved config as JSON, its swept values, notes) at each combination of the swept values (the cartesian
    product; one config without sweeps). Two values that resolve to the same config are an error: they would be
    one run."""
    seen: set[str] = set()
    for values in itertools.product(*swept.values()):
        combo = dict(zip(swept, values, strict=True))
        config, notes = cfgmod.resolve(config_cls, method=name, sets=sets | combo, **where)
        resolved = cfgmod.to_jsonable(config)
        sweep = {f: resolved[f] for f in combo}
        ident = json.dumps(sweep, sort_keys=True, default=str)
        if ident in seen:
            shown = ", ".join(f"{f}={cfgmod.value_text(v)}" for f, v in sweep.items())
            raise BenchError(f"--sweep: {name} at {shown} is given twice (two values of a sweep are equal)")
        seen.add(ident)
        yield resolved, sweep, notes


def _index_fields(job: Job) -> dict[str, Any]:
    """The index columns that describe a job (the rest are its outcome)."""
    fields = {"method": job.method, "dataset": job.dataset, "target_epsilon": job.epsilon, "seed": job.seed,
              "profile": job.profile}  # fmt: skip
    if isinstance(job, RunSpec):
        fields |= {"delta": job.delta, "accountant": job.accountant}
        if job.sweep:  # JSON {field: value}; NULL for a cell of no sweep
            fields["sweep"] = json.dumps(job.sweep, default=str)
    return fields


NOISE_SOURCES = ("seed", "os")


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
    (`eval.curve`), it also snapshots the model along the fit (bench.curve.CurveRecorder), the recorder's state
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
        self.stages: SharedStages | None = None  # the cell's shared stages (bench.shared), when it may use them
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
        # --force retrains a shared stage (bench.shared) finished before this time, once per grid (Ray workers get
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
        self.store.record_run(job.key, **_index_fields(job), status="failed", error=error)

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
        key = spec.key
        cls = registry.get(spec.method, self.plugins)
        code = registry.code_record(cls)
        write_json(run_dir / "config.json", spec.to_json() | {"device": str(self.device), "code": code})
        self.store.record_run(key, **_index_fields(spec), status="running", error=None)
        self.log(run_dir, f"start {key} on {self.device}")
        for note in spec.notes:
            self.log(run_dir, f"warning: {note}")
        train = self.dataset(spec.dataset, "train")
        config = cfgmod.build_dataclass(cls.Config, spec.config, spec.method)
        method = cls(config, spec=train.spec, device=self.device)
        costs: dict[str, Any] = {}
        ckpt_path = run_dir / "checkpoint.pt"
        final = load_torch(ckpt_path) if ckpt_path.is_file() else None
        if final is not None and final.get("kind") == "final":
            method.load_state_dict(final["method_state"])
            ledger = PrivacyLedger.from_dict(final["ledger"])
            costs = final["costs"]
            self.log(run_dir, "fit already finished: loaded the final checkpoint")
        else:
            budget = spec.budget
            if spec.noise_source == "os":
                generator = os_fit_generator()
                self.log(run_dir, "noise source: OS entropy (the fit's seed is not written; not bit-reproducible)")
            else:
                generator = fit_generator(spec.seed)
            recorder = curve.recorder(spec.eval.settings, run_dir, method.state_dict)
            progress = RunProgress(ckpt_path, self.checkpoint_every_s, *_bar_callbacks(ui, spec), recorder)
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
                self._score_curve(spec, cls, config, train, run_dir)
        self._sample_and_score(spec, method, train, run_dir, costs)
        return "done"

    def shared_stages(self, spec: RunSpec, ui: Any) -> SharedStages:
        """The shared stages (bench.shared) a cell's fit may use: results/shared, keyed by its dataset; trained
        under the cell's progress bar; with --force, those finished before this grid started are trained again."""

        def progress(path: Path) -> RunProgress:
            return RunProgress(path, self.checkpoint_every_s, *_bar_callbacks(ui, spec))

        return SharedStages(self.store.root / "shared", spec.dataset, spec.data_version, progress, self.force_since)

    def _score_curve(self, spec: RunSpec, cls: Any, config: Any, train: ImageDataset, run_dir: Path) -> None:
        """Score the fit's curve snapshots (bench.curve), each from a fresh instance of the method loaded with its
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
                               inception_weights=self.inception_weights)  # fmt: skip
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
            key, **_index_fields(row), status="running", guarantee="none", epsilon=math.inf, error=None
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
        error = None
        if cls.guarantee == "none":
            budget, eps, guarantee = Budget.unlimited(spec.delta), math.inf, "none"
        else:
            budget = spec.budget
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
        spec = spec_from_json(read_json(cfg_path))
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


# ---------------------------------------------------------------------------------------------------
# A grid: check the data, execute the cells, then the real-data rows
# ---------------------------------------------------------------------------------------------------


def _bar_callbacks(ui: Any, spec: Any) -> tuple[Callable[[int, str], None], Callable[[int], None]]:
    if ui is None:
        return (lambda total, desc: None), (lambda n: None)
    return ui.run_callbacks(spec)  # type: ignore[no-any-return]


class Executor(Protocol):
    """Runs a grid's jobs (cells or real-data rows) and returns each one's outcome ("done", "skipped", "failed"),
    in order; the one-line error of each failed job lands in `runner.errors`. `ui` (bench.ui.GridUI) shows the
    progress, `echo` gets the one-line messages. Implementations: LocalExecutor, bench.cluster.RayExecutor."""

    def run(self, runner: Runner, jobs: list[Job], ui: Any, echo: Callable[[str], None]) -> list[str]: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


def wait_for_busy(
    runner: Runner,
    jobs: list[Job],
    one_pass: Callable[[list[Job], bool], list[str]],
    echo: Callable[[str], None],
) -> list[str]:
    """Both executors' two passes: every job without waiting (a cell another process holds is "busy"), then the
    busy ones again, waiting for their locks: each ends skipped (the other process finished it) or resumed here
    (it did not), so every process of a shared results folder ends with the whole grid."""
    outcomes = one_pass(jobs, False)
    busy = [i for i, o in enumerate(outcomes) if o == "busy"]
    if busy:
        holders = sorted({h for i in busy if (h := runner.lock_holder(jobs[i].key))})
        echo(
            f"waiting for {len(busy)} cell(s) that another process is running ({'; '.join(holders) or 'unknown'}); "
            "each is skipped if it finishes there, resumed here if not; Ctrl-C stops waiting"
        )
        for i, outcome in zip(busy, one_pass([jobs[i] for i in busy], True), strict=True):
            outcomes[i] = outcome
    return outcomes


class LocalExecutor:
    """Runs the jobs one after another in this process: `ui` shows each fit's bar and advances the grid's bar
    after each job."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, runner: Runner, jobs: list[Job], ui: Any, echo: Callable[[str], None]) -> list[str]:
        def one_pass(batch: list[Job], wait: bool) -> list[str]:
            outcomes = []
            for job in batch:
                outcomes.append(runner.run(job, ui=ui, wait=wait))
                if outcomes[-1] != "busy":
                    ui.grid_advance(job, outcomes[-1], runner.errors.get(job.key))
            return outcomes

        return wait_for_busy(runner, jobs, one_pass, echo)


@dataclass
class GridOutcome:
    """What a grid did: each cell's outcome ("done", "skipped", "failed"), the real-data rows' keys, and the
    datasets left out because their data is missing (with the reason)."""

    outcomes: list[tuple[RunSpec, str]]
    real_keys: set[str] = field(default_factory=set)
    missing_data: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # key -> one-line error of each failed cell or real row

    def count(self, outcome: str) -> int:
        return sum(o == outcome for _, o in self.outcomes)

    @property
    def failed(self) -> list[RunSpec]:
        return [spec for spec, o in self.outcomes if o == "failed"]


def older_code(r: Runner, specs: list[RunSpec]) -> dict[str, str]:
    """Finished cells (key -> what differs) whose config.json records other code than this one: the method's
    source or the harness changed since, without a new method version or RESULT_VERSION (so the key is the
    same and the cell is reused)."""
    out = {}
    for spec in specs:
        path = r.store.run_dir(spec.key) / "config.json"
        recorded = read_json(path).get("code") if path.is_file() else None
        if not isinstance(recorded, dict):
            continue
        now = registry.code_record(registry.get(spec.method, r.plugins))
        changed = [
            what
            for field_, what in (("method_source", f"{spec.method}'s source changed"), ("harness", "harness changed"))
            if recorded.get(field_) != now[field_]
        ]
        if changed:
            out[spec.key] = ", ".join(changed)
    return out


def run_grid(
    r: Runner,
    specs: list[RunSpec],
    *,
    real: bool = True,
    skip_missing_data: bool = False,
    executor: Executor | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> GridOutcome:
    """Execute a planned grid: the data of every dataset is loaded first (missing data fails before any training,
    or, with `skip_missing_data`, leaves that dataset's cells out), the cells run through `executor` (default:
    LocalExecutor) with the grid's progress bars, then each dataset's real-data row (`real`) unless every cell
    failed. `echo` gets the one-line messages the command prints."""
    from bench.ui import GridUI

    executor = executor or LocalExecutor()
    missing: dict[str, str] = {}
    for ds in dict.fromkeys(s.dataset for s in specs):
        try:
            r.dataset(ds, "train"), r.dataset(ds, "test")
        except BenchError as e:
            if not skip_missing_data:
                raise
            missing[ds] = str(e)
            echo(f"warning: {ds}: dataset not available, its cells are skipped: {e}")
    specs = [s for s in specs if s.dataset not in missing]
    with GridUI(len(specs)) as ui:
        outcomes = executor.run(r, list(specs), ui, echo)
    result = GridOutcome(list(zip(specs, outcomes, strict=True)), missing_data=missing)
    result.errors = {s.key: r.errors.get(s.key, "failed") for s in result.failed}
    if stale := older_code(r, [s for s, o in result.outcomes if o == "skipped"]):
        echo(
            f"note: {len(stale)} finished cell(s) reused, computed by older code of the same version "
            f"({'; '.join(sorted(set(stale.values())))}); `--force` recomputes them"
        )
    echo(
        f"{result.count('done')} run(s) done, {result.count('skipped')} already finished, "
        f"{result.count('failed')} failed; results in {r.store.root}"
    )
    if real and result.count("done") + result.count("skipped"):
        done = (s for s, o in result.outcomes if o != "failed")
        each = (RealRow(dataset=s.dataset, eval=s.eval, profile=s.profile, data_version=s.data_version) for s in done)
        rows: list[Job] = list({row.key: row for row in each}.values())
        with GridUI(len(rows), title="real-data rows", lines=False) as ui:
            row_outcomes = executor.run(r, rows, ui, echo)
        for row, outcome in zip(rows, row_outcomes, strict=True):
            said = {"skipped": "already finished", "failed": f"failed ({r.errors.get(row.key)})"}.get(outcome, outcome)
            echo(f"real-data row of {row.dataset}: {said}")
            if outcome == "failed":
                result.errors[row.key] = r.errors.get(row.key, "failed")
            else:
                result.real_keys.add(row.key)
    for key, error in result.errors.items():
        echo(f"error: run {key} failed: {error}; its log: {r.store.run_dir(key) / 'log.txt'}")
    return result
