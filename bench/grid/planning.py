"""Plan a grid: expand methods × datasets × ε × seeds × sweeps into RunSpecs, checked before anything runs.

A RunSpec has a stable key: a hash of everything that changes its result (method, resolved config, dataset, ε, δ,
accountant, seed, evaluation settings). A finished key is skipped unless forced (bench.grid.runner).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import config as cfgmod
from bench import data
from bench.errors import BenchError
from bench.grid import curve, registry
from bench.privacy import Budget, default_delta

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
    # the method's resolved and checked Config (an instance of its `Config` dataclass): what the fit is built from;
    # it becomes JSON only at the boundaries (`config_json`: the key, config.json, the index, a Ray task)
    config: Any
    eval: EvalPlan
    method_version: str = ""  # bench.grid.registry.method_version: the method's declared version (+ a plugin's hash)
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

    @functools.cached_property
    def budget(self) -> Budget:
        """The cell's typed budget: the grid's (ε, δ, accountant) that `plan` checked, or unlimited (ε = ∞) for a
        non-private row, built once per spec. The fit is calibrated to it and the card verified against it."""
        if math.isfinite(self.epsilon):
            return Budget(epsilon=self.epsilon, delta=self.delta, accountant=self.accountant)
        return Budget.unlimited(self.delta)

    @property
    def config_json(self) -> dict[str, Any]:
        """The config as JSON (what the key hashes and config.json records). A spec read back without checking its
        config (`spec_from_json(..., check=False)`: re-scoring a finished run needs no method class) holds the
        recorded JSON itself."""
        return dict(self.config) if isinstance(self.config, dict) else cfgmod.to_jsonable(self.config)

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
            "config": self.config_json,
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
        """The spec at a boundary: JSON, its config included (`spec_from_json` reads it back)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("config", "eval")}
        return fields | {"config": self.config_json, "eval": dataclasses.asdict(self.eval), "key": self.key}


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


def spec_from_json(d: dict[str, Any], plugins: tuple[str, ...] = (), *, check: bool = True) -> RunSpec:
    """The RunSpec a config.json (or a Ray task's payload) was written from, its config checked again by the method's
    Config (`plugins`: where a plugin method's class is found). `check=False` keeps the recorded JSON config, for
    reading a finished run without its method (`bench score` of a plugin's run needs no --plugin)."""
    eps = d["epsilon"]
    return RunSpec(
        method=d["method"],
        dataset=d["dataset"],
        epsilon=math.inf if eps is None else float(eps),
        delta=d["delta"],
        accountant=d["accountant"],
        seed=d["seed"],
        profile=d["profile"],
        config=cfgmod.build_dataclass(registry.get(d["method"], plugins).Config, d["config"], d["method"])
        if check
        else dict(d["config"]),
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
        for name, (config, sweep) in (hook(spec.config_json, spec.sweep) if hook is not None else {}).items():
            cls = registry.get(name, plugins)
            checked = cfgmod.build_dataclass(cls.Config, config, name)  # the hook speaks JSON: checked here
            row = dataclasses.replace(spec, method=name, epsilon=math.inf, config=checked, notes=(), sweep=sweep,
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
) -> Iterator[tuple[Any, dict[str, Any], list[str]]]:
    """(resolved and checked config, its swept values, notes) at each combination of the swept values (the cartesian
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
        yield config, sweep, notes


def index_fields(job: Job) -> dict[str, Any]:
    """The index columns that describe a job (the rest are its outcome)."""
    fields = {"method": job.method, "dataset": job.dataset, "target_epsilon": job.epsilon, "seed": job.seed,
              "profile": job.profile}  # fmt: skip
    if isinstance(job, RunSpec):
        fields |= {"delta": job.delta, "accountant": job.accountant}
        if job.sweep:  # JSON {field: value}; NULL for a cell of no sweep
            fields["sweep"] = json.dumps(job.sweep, default=str)
    return fields


NOISE_SOURCES = ("seed", "os")
