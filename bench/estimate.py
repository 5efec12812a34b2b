"""What a grid costs before it runs: `bench paper ID --estimate [--throughput FILE]`.

For every run of a paper's plan: the units of work of each stage of its fit (the method's `work(config,
num_records, budget)`, the same counts its fit announces to its progress) times the seconds per unit measured for
the same config, plus the samples it generates (`eval.n_gen`) times the seconds per sample, plus, for each accuracy
metric the plan scores, its downstream classifier's epochs × training samples (the protocol's settings, capped at
n_gen, times `classifier_seeds`) times the seconds per sample·epoch measured for that classifier. The seconds come
from a throughput file (`throughput.json`, written by `make gpu-check` on a GPU) or, without one, from timing
each distinct config on the current device (bench.throughput). A measurement stands for a run when the two configs
are equal but for the fields that only count units (bench.throughput.COUNT_FIELDS) and their precision agrees.

Not estimated: the fidelity metrics' features (the domain extractor's training, Inception features of the samples
and of the real side), start-up and data loading. The table says so in its footer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench import config, data
from bench.errors import BenchError
from bench.grid import registry
from bench.grid.planning import RunSpec
from bench.metrics import EvalSettings
from bench.metrics.protocols import METRIC_PROTOCOL
from bench.privacy import Budget
from bench.throughput import FORMAT, Measurement, cost_key, measure, measure_classifiers, protocol_work

NOT_ESTIMATED = (
    "the fidelity metrics' features (the domain extractor's training, Inception features of samples and real "
    "images), start-up and data loading"
)


@dataclass(frozen=True)
class Throughput:
    device: str
    measurements: tuple[dict[str, Any], ...]
    classifiers: tuple[dict[str, Any], ...] = ()  # bench.throughput.measure_classifiers' rows

    def classifier(self, metric: str, dataset: str) -> dict[str, Any] | None:
        """The latest timing of the classifier behind `metric` on data of `dataset`'s image shape and classes."""
        shape = image_shape(dataset)
        found = None
        for c in self.classifiers:
            if c["metric"] == metric and image_shape(c["dataset"]) == shape:
                found = c
        return found

    def find(self, method: str, dataset: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
        """The latest measurement of `method` on data of `dataset`'s shape and size (MNIST stands for Fashion-MNIST,
        CelebA-64 hair for gender) with a config that costs what `cfg` costs, if any."""
        want = precision_of(cfg, self.device)
        key, shape = cost_key(without_precision(cfg)), data_shape(dataset)
        found = None
        for m in self.measurements:
            if m["method"] != method or data_shape(m["dataset"]) != shape or m.get("error"):
                continue
            if precision_of(m["config"], m["device"]) == want and cost_key(without_precision(m["config"])) == key:
                found = m
        return found


def data_shape(dataset: str) -> tuple[int, ...]:
    """What a method's speed depends on in a dataset: its image shape, record count and classes."""
    s = data.spec_without_files(dataset)
    return (s.channels, s.height, s.width, s.num_train, s.num_classes)


def image_shape(dataset: str) -> tuple[int, ...]:
    """What a downstream classifier's speed per sample depends on: the image shape and the classes."""
    s = data.spec_without_files(dataset)
    return (s.channels, s.height, s.width, s.num_classes)


def without_precision(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "precision"}


def precision_of(cfg: dict[str, Any], device: str) -> str:
    """The precision a config trains in on `device` ("auto": bf16 on CUDA, fp32 elsewhere; no option: fp32)."""
    p = cfg.get("precision", "fp32")
    return ("bf16" if device.startswith("cuda") else "fp32") if p == "auto" else str(p)


def load_throughput(path: Path) -> Throughput:
    """A throughput file (gpu-check's throughput.json); one-line errors for a missing or malformed one."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"--throughput: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise BenchError(f"--throughput: cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("measurements"), list):
        raise BenchError(f"--throughput: {path} is not a throughput file of format {FORMAT} (write one with gpu-check)")
    return Throughput(str(raw.get("device", "")), tuple(raw["measurements"]), tuple(raw.get("classifiers", ())))


def throughput_json(
    measurements: Iterable[Measurement], device: str, classifiers: Iterable[dict[str, Any]] = ()
) -> dict[str, Any]:
    return {"format": FORMAT, "device": device, "measurements": [m.to_json() for m in measurements],
            "classifiers": list(classifiers)}  # fmt: skip


def accuracy_metrics(metrics: Iterable[str]) -> list[str]:
    """The metrics among `metrics` that train a downstream classifier."""
    return [m for m in metrics if m in METRIC_PROTOCOL]


def work_of(spec: RunSpec) -> dict[str, int] | None:
    """Units of each stage of `spec`'s fit (None: the method declares no `work`)."""
    cls = registry.get(spec.method)
    work = getattr(cls, "work", None)
    if work is None:
        return None
    cfg = spec.config
    budget = (
        Budget.unlimited(spec.delta, spec.accountant)
        if math.isinf(spec.epsilon)
        else Budget(epsilon=spec.epsilon, delta=spec.delta, accountant=spec.accountant)
    )
    return dict(work(cfg, data.spec_without_files(spec.dataset).num_train, budget))


def scoring_seconds(spec: RunSpec, metrics: Iterable[str], th: Throughput) -> tuple[float, list[str]]:
    """Seconds of the downstream classifiers `spec` trains for `metrics`, and the metrics without a timing."""
    ev = EvalSettings(**spec.eval.settings)
    seconds, missing = 0.0, []
    for metric in accuracy_metrics(metrics):
        timing = th.classifier(metric, spec.dataset)
        if timing is None:
            missing.append(metric)
            continue
        epochs, samples = protocol_work(metric, spec.dataset, ev.protocols[METRIC_PROTOCOL[metric][0]], spec.eval.n_gen)
        per_seed = timing.get("startup_s", 0.0) + epochs * samples * timing["seconds_per_sample_epoch"]
        seconds += ev.classifier_seeds * per_seed  # a throughput file from before start-ups were timed: 0
    return seconds, missing


def cell_row(
    spec: RunSpec,
    found: dict[str, Any] | None,
    th: Throughput,
    metrics: Iterable[str] = (),
    shared: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """One run's estimate: units per stage × seconds per unit, samples × seconds per sample, and the downstream
    classifiers of `metrics` (epochs × samples × seconds per sample·epoch). `shared`: stages another row of the
    plan trains once for this run (dpsad's teacher: the dpsad-teacher row), counted there, not here."""
    unknown = data.spec_without_files(spec.dataset).num_train == 0
    work = None if unknown else work_of(spec)
    row: dict[str, Any] = {
        "method": spec.method,
        "dataset": spec.dataset,
        "epsilon": spec.epsilon,
        "seed": spec.seed,
        "units": "; ".join(f"{k} {v:,}" for k, v in (work or {}).items()),
        "n_gen": spec.eval.n_gen,
        "train_s": None,
        "sample_s": None,
        "score_s": None,
        "gpu_h": None,
        "status": "",
    }
    if unknown:
        row["status"] = "record count unknown without the dataset's files (--data-root): not estimated"
        return row
    if work is None:
        row["status"] = "the method declares no work() (a plugin): not estimated"
        return row
    if found is None:
        row["status"] = "no measurement of this config"
        return row
    stages = found["stages"]
    if len(stages) != len(work) or any(s["seconds_per_unit"] is None for s in stages):
        row["status"] = f"the measurement timed {len(stages)} stage(s), the fit has {len(work)}"
        return row
    notes = [f"{', '.join(sorted(shared))}: shared, in its own row"] if shared else []
    row["train_s"] = sum(
        units * st["seconds_per_unit"]
        for (stage, units), st in zip(work.items(), stages, strict=True)
        if stage not in shared
    )
    row["sample_s"] = spec.eval.n_gen * found["sample_seconds"] if found.get("sample_seconds") is not None else None
    if row["sample_s"] is None:
        notes.append("sampling not measured")
    row["score_s"], missing = scoring_seconds(spec, metrics, th)
    if missing:
        notes.append(f"classifiers not measured: {', '.join(missing)}")
    row["gpu_h"] = (row["train_s"] + (row["sample_s"] or 0.0) + row["score_s"]) / 3600
    missed = [n for n in notes if not n.endswith("in its own row")]
    row["status"] = "; ".join(notes) + (" (not in the total)" if missed else "")
    return row


def _same_config(config_json: dict[str, Any]) -> str:
    return json.dumps(config_json, sort_keys=True, default=str)


def teacher_json(dpsad_config: Any) -> dict[str, Any]:
    """The resolved config of dpsad's shared teacher as JSON (the dpsad-teacher row's config)."""
    return config.to_jsonable(dpsad_config.teacher_config())


def shared_teacher_rows(specs: list[RunSpec], th: Throughput) -> dict[int, tuple[dict[str, Any] | None, frozenset]]:
    """{index in specs: (measurement, shared stages)} for the runs a shared teacher changes: a dpsad run whose
    teacher is a dpsad-teacher row of the plan (same dataset, seed and config) does not count the teacher's steps,
    and a dpsad-teacher row without a measurement of its own takes the teacher stage of a dpsad measurement whose
    teacher has its config (its sampling is then not measured)."""
    teachers = {(s.dataset, s.seed, _same_config(s.config_json)) for s in specs if s.method == "dpsad-teacher"}
    out: dict[int, tuple[dict[str, Any] | None, frozenset]] = {}
    for i, s in enumerate(specs):
        if s.method == "dpsad" and (s.dataset, s.seed, _same_config(teacher_json(s.config))) in teachers:
            out[i] = (th.find(s.method, s.dataset, s.config_json), frozenset({"teacher steps"}))
        elif s.method == "dpsad-teacher" and th.find(s.method, s.dataset, s.config_json) is None:
            want = cost_key(s.config_json)
            for m in th.measurements:
                if m["method"] != "dpsad" or m.get("error") or data_shape(m["dataset"]) != data_shape(s.dataset):
                    continue
                try:
                    cfg = config.build_dataclass(registry.get("dpsad").Config, m["config"], "a dpsad measurement")
                except BenchError:  # measured by another version of the code
                    continue
                if cost_key(teacher_json(cfg)) == want and m["stages"] and m["stages"][0]["seconds_per_unit"]:
                    out[i] = ({**m, "stages": m["stages"][:1], "sample_seconds": None}, frozenset())
    return out


def estimate(
    specs: Iterable[RunSpec],
    throughput: Throughput | None,
    *,
    device: torch.device,
    metrics: Iterable[str] = (),
    measure_fn: Callable[..., Measurement] = measure,
    classifiers_fn: Callable[..., list[dict[str, Any]]] = measure_classifiers,
    echo: Callable[[str], None] = lambda s: None,
) -> tuple[pd.DataFrame, Throughput]:
    """Rows of `estimate` per run (see cell_row), its downstream classifiers those of `metrics`; without
    `throughput`, each distinct config and each classifier is timed on `device` first. Returns the rows and the
    throughput used."""
    specs, metrics = list(specs), list(metrics)
    if throughput is None:
        measured: dict[tuple[str, tuple[int, ...], str], Measurement] = {}
        for spec in specs:
            k = (spec.method, data_shape(spec.dataset), cost_key(spec.config_json))  # MNIST is timed as FMNIST
            if k in measured:
                continue
            if data.spec_without_files(spec.dataset).num_train == 0:
                continue  # its record count is unknown: the row says so
            echo(f"timing {spec.method} on {spec.dataset} ({device})")
            cfg = spec.config
            eps = 10.0 if math.isinf(spec.epsilon) else spec.epsilon
            try:
                measured[k] = measure_fn(spec.method, spec.dataset, cfg, device=device, epsilon=eps, delta=spec.delta)
            except BenchError as e:  # e.g. a network that does not fit the data's shape: the row says "no measurement"
                echo(f"warning: cannot time {spec.method} on {spec.dataset}: {e}")
        timed: list[dict[str, Any]] = []
        shapes = {image_shape(s.dataset): s.dataset for s in specs}  # one timing per shape, as `classifier` looks up
        for dataset in shapes.values():
            if wanted := accuracy_metrics(metrics):
                echo(f"timing the downstream classifiers on {dataset} ({device})")
                for metric in wanted:  # one at a time: one that cannot be timed leaves the others' timings
                    try:
                        timed += classifiers_fn([metric], dataset, device=device)
                    except BenchError as e:  # e.g. a classifier whose training step does not fit in memory
                        echo(f"warning: cannot time {metric} on {dataset}: {e}")
        throughput = Throughput(str(device), tuple(m.to_json() for m in measured.values()), tuple(timed))
    teacher = shared_teacher_rows(specs, throughput)
    rows = []
    for i, s in enumerate(specs):
        found, shared = teacher.get(i, (throughput.find(s.method, s.dataset, s.config_json), frozenset()))
        rows.append(cell_row(s, found, throughput, metrics, shared))
    return pd.DataFrame(rows), throughput


def hours_unit(device: str) -> str:
    """GPU-h on a CUDA device, CPU-h on a CPU (as the cost table: bench.report.plots)."""
    return "GPU-h" if device.startswith("cuda") else "CPU-h" if device.startswith("cpu") else "device-h"


def to_markdown(frame: pd.DataFrame, title: str, device: str) -> str:
    lines = [f"# {title}: estimated cost on {device or 'the measured device'}", ""]
    cols = ["method", "dataset", "ε", "seed", "units of work", "samples", "train [h]", "sample [h]", "classifiers [h]",
            f"{hours_unit(device)}", "note"]  # fmt: skip
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def h(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v / 3600:.2f}"

    for r in frame.itertuples():
        eps = "∞" if math.isinf(r.epsilon) else f"{r.epsilon:g}"
        gpu = "—" if r.gpu_h is None or math.isnan(r.gpu_h) else f"{r.gpu_h:.2f}"
        lines.append(
            f"| {r.method} | {r.dataset} | {eps} | {r.seed} | {r.units} | {r.n_gen:,} | {h(r.train_s)} | "
            f"{h(r.sample_s)} | {h(r.score_s)} | {gpu} | {r.status} |"
        )
    known = frame["gpu_h"].dropna()
    missing = len(frame) - len(known)
    total = f"**{known.sum():.2f} {hours_unit(device)}** for the {len(known)} run(s) estimated"
    if missing:
        total += f"; {missing} run(s) not estimated (see their notes), so the table costs more"
    lines += ["", total, "", f"Not included: {NOT_ESTIMATED}."]
    return "\n".join(lines) + "\n"


def write(frame: pd.DataFrame, text: str, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"estimate-{name}.md", out / f"estimate-{name}.csv"
    md.write_text(text)
    frame.to_csv(csv, index=False)
    return [md, csv]
