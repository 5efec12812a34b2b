"""Measured speed of a method's fit and sampling on the current device, in the units its own progress counts.

A method's `fit` announces each stage with `progress.start(units)` and calls `progress.advance()` after each unit
(a DP step, a generator step, a PATE-GAN iteration). `TimingProgress` is a Progress that timestamps those calls
(after a CUDA synchronisation) and stops the fit once it has timed enough units, so a measurement at the paper's
settings takes seconds, not the paper's days. The data are random images of the dataset's shape and size: no
method's speed depends on pixel values, and no dataset has to be present. A method's optional
`work(num_records, budget)` gives the units of each stage of a whole fit; `bench paper --estimate` multiplies the
two (bench.estimate).

`measure` is what `make gpu-check` (bench.gpucheck) runs for every method, and what `bench paper --estimate`
runs on the current device when no throughput file is given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import config, data
from bench.contract import DataSpec, ImageDataset, config_fields
from bench.grid import registry
from bench.metrics.protocols import METRIC_PROTOCOL, PROTOCOLS
from bench.metrics.protocols.base import Context, resolve_settings
from bench.privacy import Budget

FORMAT = 1  # version of the throughput file's layout


class Enough(Exception):
    """Raised by TimingProgress inside a fit once the units it was asked to time are timed."""


@dataclass
class StageTiming:
    description: str
    total: int  # units the stage would run in a whole fit
    stamps: list[float] = field(default_factory=list)  # time after each unit (the first is the stage's start)

    def timed(self, warmup: int) -> list[float]:
        """Seconds of each unit after the first `warmup` ones."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return gaps[warmup:] if len(gaps) > warmup else gaps[-1:]


class TimingProgress:
    """A Progress that times units of work. A stage longer than `warmup + units` units stops the fit (Enough) once
    that many have run, or once at least one unit after the warm-up has run and `max_seconds` have passed since the
    stage began; a shorter stage runs to its end.
    Shared stages (DP-SAD's teacher) run inside it as stages of their own; nothing is checkpointed or resumed."""

    def __init__(self, *, units: int, warmup: int, max_seconds: float, sync: Callable[[], None]) -> None:
        self.units, self.warmup, self.max_seconds, self.sync = units, warmup, max_seconds, sync
        self.stages: list[StageTiming] = []

    def start(self, total: int, description: str = "") -> None:
        self.sync()
        self.stages.append(StageTiming(description, int(total), [time.perf_counter()]))

    def advance(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.sync()
        stage = self.stages[-1]
        stage.stamps.extend([time.perf_counter()] * n)
        done, enough = len(stage.stamps) - 1, self.warmup + self.units
        if stage.total <= enough:  # a short stage (DP-SAD's cut teacher) runs to its end: the next one is timed
            return
        if done >= enough or (done > self.warmup and stage.stamps[-1] - stage.stamps[0] > self.max_seconds):
            raise Enough

    def resume(self) -> dict[str, Any] | None:
        return None

    def checkpoint(self, state_fn: Callable[[], dict[str, Any]]) -> None:
        pass

    def shared(self, name: str, ident: dict[str, Any], build: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return build(self)


def random_dataset(spec: DataSpec, generator: torch.Generator) -> ImageDataset:
    """Random uint8 images and labels of `spec`'s shape and size."""
    shape = (spec.num_train, spec.channels, spec.height, spec.width)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, spec.num_classes, (spec.num_train,), generator=generator)
    return ImageDataset(images, labels, spec.num_classes, "random")


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _seconds(device: torch.device, call: Callable[[], Any]) -> float:
    """Wall seconds of `call()`, the device's queued work finished before and after."""
    sync = _sync(device)
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - t0


def shortened(method: str, cfg: Any, num_records: int, units: int) -> Any:
    """`cfg` with a stage that must finish before the timed one (DP-SAD's shared teacher) cut to `units` steps."""
    if method == "dpsad" and hasattr(cfg, "teacher_epochs"):
        return dataclasses.replace(cfg, teacher_epochs=units * cfg.teacher_batch_size / num_records)
    return cfg


# Config fields that set how many units a fit runs (or how it is cut for timing), not what one unit costs: a
# measurement stands for every config equal to its own but for these.
COUNT_FIELDS = frozenset({"epochs", "teacher_epochs", "iterations"})
CPU_PHYSICAL_ROWS = 512  # rows (examples × noise draws) per chunk when timing on a CPU


def cost_key(config_json: dict[str, Any]) -> str:
    """The part of a resolved config (as JSON) that sets the cost of one unit and of one sample."""
    return json.dumps({k: v for k, v in config_json.items() if k not in COUNT_FIELDS}, sort_keys=True, default=str)


@dataclass
class Measurement:
    method: str
    dataset: str
    precision: str  # the config's precision ("fp32", "bf16", "auto"), or "default" (the method has no such option)
    device: str
    config: dict[str, Any]  # the resolved config measured (before the timing cut of a preceding stage)
    stages: list[dict[str, Any]]  # per stage: description, units of the cut fit, timed units, seconds per unit
    peak_memory_gib: float | None
    sample_seconds: float | None  # seconds per sample
    sample_n: int
    seconds: float  # wall time of the whole measurement
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(method: str, dataset: str, *, profile: str, epsilon: float, sets: dict[str, Any] | None = None) -> Any:
    """`method`'s resolved Config for `dataset` at `epsilon` under `profile` and `sets`."""
    cls = registry.get(method)
    eps = math.inf if cls.guarantee == "none" else epsilon
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile(profile), method=method, dataset=dataset, epsilon=eps, sets=sets or {}
    )
    return cfg


def measure(
    method: str,
    dataset: str,
    cfg: Any,
    *,
    device: torch.device,
    epsilon: float = 10.0,
    delta: float = 1e-5,
    units: int = 3,
    warmup: int = 1,
    max_seconds: float = 60.0,
    sample_n: int = 64,
    seed: int = 0,
) -> Measurement:
    """Time `units` units of each stage of `method`'s fit with config `cfg` (after `warmup` untimed ones) on random
    data of `dataset`'s shape and size, then the sampling of `sample_n` labelled images, on `device`."""
    t_start = time.perf_counter()
    cls = registry.get(method)
    spec = data.spec_without_files(dataset)
    generator = torch.Generator().manual_seed(seed)
    train = random_dataset(spec, generator)
    budget = Budget.unlimited(delta) if cls.guarantee == "none" else Budget(epsilon=epsilon, delta=delta)
    progress = TimingProgress(units=units, warmup=warmup, max_seconds=max_seconds, sync=_sync(device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    error, sample_s = "", None
    run_cfg = shortened(method, cfg, spec.num_train, warmup + units)
    rows = max(1, CPU_PHYSICAL_ROWS // getattr(run_cfg, "noise_multiplicity", 1))
    if device.type == "cpu" and getattr(run_cfg, "physical_batch_size", 0) > rows:
        # memory only, the same step (bench.privacy.dpsgd): the paper profile's chunks (dpdm: 512 examples × K = 32
        # noise draws; 128 × 32 too) took over 24 GiB and the OS killed the estimate; on a CPU, chunks of ≤ 512 rows
        run_cfg = dataclasses.replace(run_cfg, physical_batch_size=rows)
    model = cls(run_cfg, spec=spec, device=device)
    try:
        model.fit(train, budget=budget, generator=generator, progress=progress)
    except Enough:
        pass
    except torch.OutOfMemoryError as e:
        error = f"out of memory: {str(e).splitlines()[0]}"
    if not error and sample_n > 0:
        labels = torch.arange(sample_n) % spec.num_classes if cls.conditional else None
        try:
            sample_s = (
                _seconds(
                    device, lambda: model.sample(sample_n, labels=labels, generator=torch.Generator().manual_seed(seed))
                )
                / sample_n
            )
        except Exception as e:  # a measurement, not a run: record why sampling could not be timed
            error = f"sampling: {type(e).__name__}: {e}"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    stages = []
    for st in progress.stages:
        gaps = st.timed(warmup)
        stages.append({
            "description": st.description,
            "units": st.total,
            "timed_units": len(gaps),
            "seconds_per_unit": sum(gaps) / len(gaps) if gaps else None,
        })  # fmt: skip
    precision = getattr(cfg, "precision", None)
    return Measurement(
        method=method,
        dataset=dataset,
        precision=str(precision) if precision is not None else "default",
        device=str(device),
        config=config.to_jsonable(cfg),
        stages=stages,
        peak_memory_gib=peak,
        sample_seconds=sample_s,
        sample_n=sample_n,
        seconds=time.perf_counter() - t_start,
        error=error,
    )


def has_precision(method: str) -> bool:
    """Whether the method's Config has a `precision` option (fp32 / bf16)."""
    return "precision" in config_fields(registry.get(method).Config)


def protocol_work(metric: str, dataset: str, overrides: Any, n_gen: int) -> tuple[int, int]:
    """(epochs, samples) the downstream classifier behind `metric` trains on for a run of `n_gen` samples: the
    protocol's settings for `dataset` under `overrides` (its Settings), its sample counts capped at n_gen as the run
    caps them. A protocol without epochs (scikit-learn) counts as 1."""
    name, _ = METRIC_PROTOCOL[metric]
    p = PROTOCOLS[name]
    spec = data.spec_without_files(dataset)
    shape = (spec.channels, spec.height, spec.width)
    resolved, _ = resolve_settings(p, overrides, dataset=dataset, shape=shape, num_classes=spec.num_classes)
    samples = sum(int(v) for k, v in resolved.items() if k.startswith("n_") and v is not None)
    return int(resolved.get("epochs", 1)), min(samples, n_gen)


def measure_classifiers(
    metrics: Iterable[str], dataset: str, *, device: torch.device, n: int = 2048, epochs: int = 1, seed: int = 0
) -> list[dict[str, Any]]:
    """Seconds per (sample · epoch) of the downstream classifier behind each metric, trained by its protocol on `n`
    random labelled images of `dataset`'s shape (its per-epoch scoring included) and tested on n/4 more, and its
    start-up seconds (building the networks, the first batches' kernel selection, the final scoring). Each is
    trained twice, for `epochs` and for 2 × `epochs` epochs: the difference is `epochs` epochs without the start-up.
    Where timing noise makes the longer run no slower ("separated": false), the longer run's mean epoch is taken and
    the start-up counts as 0 (an upper bound of the epochs, as one run would give)."""
    spec = data.spec_without_files(dataset)
    g = torch.Generator().manual_seed(seed)
    train = random_dataset(dataclasses.replace(spec, num_train=n), g)
    test = random_dataset(dataclasses.replace(spec, num_train=max(16, n // 4)), g)
    shape = (spec.channels, spec.height, spec.width)
    out = []
    for metric in metrics:
        name, classifier = METRIC_PROTOCOL[metric]
        p = PROTOCOLS[name]
        fields = config_fields(p.Settings)
        context = Context(real_train=train, epsilon=1.0)  # dpimagebench's mode val carves its validation from it
        timed = []  # (epochs, seconds), shorter run first
        for e in (epochs, 2 * epochs) if "epochs" in fields else (epochs,):  # scikit-learn: no epochs, one run
            over = {k: v for k, v in {"epochs": e, "n_train": n, "n_eval": n // 5}.items() if k in fields}
            if "n_eval" in over:
                over["n_train"] = n - over["n_eval"]
            resolved, _ = resolve_settings(p, p.Settings(**over), dataset=dataset, shape=shape,
                                           num_classes=spec.num_classes)  # fmt: skip
            run = functools.partial(p.run, [classifier], train, test, settings=resolved, seed=seed, device=device,
                                    context=context)  # fmt: skip
            timed.append((int(resolved.get("epochs", 1)), _seconds(device, run)))
        (e1, t1), (e2, t2) = timed[0], timed[-1]
        separated = e2 > e1 and t2 > t1
        per_epoch = (t2 - t1) / (e2 - e1) if separated else t2 / e2
        out.append({"metric": metric, "dataset": dataset, "device": str(device), "samples": n, "epochs": [e1, e2],
                    "seconds": [t1, t2], "separated": separated, "seconds_per_sample_epoch": per_epoch / n,
                    "startup_s": max(t1 - e1 * per_epoch, 0.0) if separated else 0.0})  # fmt: skip
    return out
