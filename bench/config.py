"""Profiles and configuration: dataclass defaults < profile < profile per dataset < per ε < --set.

A profile is a TOML file of overrides per method and dataset (bench/grid/profiles/<name>.toml, or a path), optionally
over another profile (`extends = "smoke"`: its tables merged key by key):

    [eval]                    # evaluation settings (bench.metrics.EvalSettings)
    n_gen = 1000
    [dpdm]                    # overrides of DPDM.Config for every dataset
    epochs = 2
    [dpdm.fmnist]             # ... for one dataset
    batch_size = 512
    [dpdm.fmnist.eps."10"]    # ... tuned for one ε only

Per-ε entries are the only way a hyper-parameter may depend on ε. Running at an ε that has no entry
while other ε do uses the nearest tuned ε, with a warning that is recorded in the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from bench.errors import BenchError

PROFILES = ("smoke", "demo", "cpu", "paper", "gpu-short")


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """A config field restricted to named values: a ValueError naming the field and the choices."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# Ranges of numeric config fields, checked in a Config's __post_init__ (so at plan time, by `--dry-run` too).
# Every int or float field of a method's Config must refuse -1 unless its dataclass field carries SIGNED
# metadata (`field(default=..., metadata=SIGNED)`): tests/test_registry.py checks every registered method.
SIGNED = {"signed": True}


def at_least(config: Any, low: float, *names: str) -> None:
    """Each named field is a finite number ≥ low (a ValueError naming the first that is not)."""
    for name in names:
        v = getattr(config, name)
        if not (math.isfinite(v) and v >= low):
            raise ValueError(f"{name} must be a finite number ≥ {low:g}, got {v!r}")


def positive(config: Any, *names: str) -> None:
    """Each named field is a finite number > 0."""
    for name in names:
        v = getattr(config, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def fraction(config: Any, *names: str) -> None:
    """Each named field is in [0, 1)."""
    for name in names:
        v = getattr(config, name)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")


def env_seconds(name: str, default: float) -> float:
    """A duration from environment variable `name` (a number of seconds ≥ 0), else `default`; a one-line error
    for anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise BenchError(f"{name} must be a number of seconds ≥ 0, got {text!r}")
    return value


def load_profile(profile: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The TOML table of a named profile (bench/grid/profiles/NAME.toml) or of a path to a .toml file. A profile with
    `extends = "NAME"` (a named profile or a path) is that profile with this one's tables merged over it, key by
    key: `[dpdm]` here changes only the fields it names."""
    if profile.endswith(".toml"):
        path = Path(profile)
        if not path.is_file():
            raise BenchError(f"profile file {profile} does not exist")
        text = path.read_text()
    elif profile in PROFILES:
        text = resources.files("bench").joinpath(f"grid/profiles/{profile}.toml").read_text()
    else:
        raise BenchError(f"unknown profile {profile!r}; available: {', '.join(PROFILES)} (or a path to a .toml file)")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"profile {profile}: invalid TOML: {e}") from None
    base = table.pop("extends", None)
    if base is None:
        return table
    if not isinstance(base, str):
        raise BenchError(f"profile {profile}: extends must be a profile name or path, got {base!r}")
    if base in _seen or base == profile:
        raise BenchError(f"profile {profile}: extends {base!r} again (a cycle: {' -> '.join((*_seen, profile, base))})")
    return merged(load_profile(base, (*_seen, profile)), table)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` key by key: nested tables merge, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_value(text: str) -> Any:
    """A --set value: TOML syntax where it parses (1, 1e-3, true, [1, 2], "s"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's type annotation; int -> float and list -> tuple are allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(annotation):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, arm, where)
            except BenchError as e:
                errors.append(str(e))
        raise BenchError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise BenchError(f"{where}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise BenchError(f"{where}: expected a list like [1, 2], got {value!r}")
        args = typing.get_args(annotation)
        arm = args[0] if args else Any
        return tuple(coerce(v, arm, where) if arm is not Any else v for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise BenchError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BenchError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BenchError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise BenchError(f"{where}: expected a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise BenchError(f"{where}: expected a table, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, overrides: dict[str, Any], where: str) -> Any:
    """Instantiate a frozen config dataclass with checked overrides; unknown keys are errors."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in overrides.items():
        if key not in types_:
            raise BenchError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(types_))}")
        kwargs[key] = coerce(value, types_[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise BenchError(f"{where}: {e}") from None


def _scalars(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if not isinstance(v, dict)}


def method_overrides(
    profile: dict[str, Any], method: str, dataset: str, epsilon: float
) -> tuple[dict[str, Any], list[str]]:
    """The profile's overrides for (method, dataset, ε), and notes (warnings) to record."""
    notes: list[str] = []
    table = profile.get(method, {})
    merged = _scalars(table)
    ds = table.get(dataset, {})
    if isinstance(ds, dict):
        merged |= _scalars(ds)
        per_eps = ds.get("eps", {})
        if per_eps:
            tuned = {float(k): v for k, v in per_eps.items()}
            if epsilon in tuned:
                merged |= tuned[epsilon]
            elif math.isfinite(epsilon):
                nearest = min(tuned, key=lambda e: abs(math.log(e) - math.log(epsilon)))
                merged |= tuned[nearest]
                notes.append(f"{method} on {dataset}: hyper-parameters tuned for ε={nearest:g} used at ε={epsilon:g}")
    return merged, notes


def resolve(
    config_cls: type,
    *,
    profile: dict[str, Any],
    method: str,
    dataset: str,
    epsilon: float,
    sets: dict[str, Any],
) -> tuple[Any, list[str]]:
    """The resolved, validated Config instance for one run, and notes to record.

    A Config with a `preset_fields(preset, dataset, epsilon)` classmethod (DPDM's sampler presets) expands a
    non-empty `sampler_preset` into its fields, over the profile's values and under explicit `--set` ones.
    """
    overrides, notes = method_overrides(profile, method, dataset, epsilon)
    preset = sets.get("sampler_preset", overrides.get("sampler_preset"))
    if preset and hasattr(config_cls, "preset_fields"):
        overrides |= config_cls.preset_fields(preset, dataset, epsilon)
    overrides |= sets
    return build_dataclass(config_cls, overrides, method), notes


def parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `--set key=value` items into method-config (field or METHOD.field; see method_sets) and `eval.`
    overrides."""
    method_sets: dict[str, Any] = {}
    eval_sets: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"--set expects key=value, got {item!r}")
        if key.startswith("eval."):
            table, _, field = key.removeprefix("eval.").rpartition(".")
            if table:  # eval.dpdm.epochs: a field of one downstream protocol's settings
                if not isinstance(eval_sets.setdefault(table, {}), dict):
                    raise BenchError(f"--set {key}: eval.{table} is a setting, not a table")
                eval_sets[table][field] = parse_value(value.strip())
            else:
                eval_sets[field] = parse_value(value.strip())
        else:
            method_sets[key] = parse_value(value.strip())
    return method_sets, eval_sets


def method_sets(sets: dict[str, Any], methods: dict[str, Any], option: str = "--set") -> dict[str, dict[str, Any]]:
    """The `--set` overrides of each method of a grid (name -> class): METHOD.field=value sets one method's
    field, a bare field=value sets it for every method, which must all have it (else an error naming those that
    lack it); a scoped value wins over a bare one. `option="--sweep"`: the same rules for `--sweep` (each value
    a list of values), its errors naming that option."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    scoped = {}
    for key, value in sets.items():
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in methods:
                raise BenchError(f"{option} {key}: {scope!r} is not a method of this grid ({', '.join(methods)})")
            scoped[scope, name] = value
            continue
        having = [m for m, cls in methods.items() if key in _field_types(cls.Config)]
        lacking = [m for m in methods if m not in having]
        if having and lacking:
            example = ",".join(map(_text, value)) if option == "--sweep" else _text(value)
            raise BenchError(
                f"{option} {key}: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no field {key!r}; "
                f"{option.removeprefix('--')} it for one method as METHOD.{key}="
                f"{'V1,V2,...' if option == '--sweep' else 'VALUE'} "
                f"(e.g. {option} {having[0]}.{key}={example})"
            )
        for m in methods:
            out[m][key] = value
    for (m, name), value in scoped.items():
        out[m][name] = value
    return out


def parse_sweeps(items: list[str]) -> dict[str, list[Any]]:
    """`--sweep key=v1,v2,...` items: key (a field, or METHOD.field; see method_sets) -> its values, each parsed as
    a `--set` value (commas inside [...] or quotes do not split). Checked against the methods' Configs when the
    grid is planned (bench.grid.plan)."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"--sweep expects key=v1,v2,..., got {item!r}")
        if key.startswith("eval."):
            raise BenchError(f"--sweep {key}: a sweep is over a method's fields; set evaluation settings with --set")
        if key in out:
            raise BenchError(f"--sweep {key} is given twice; give all its values in one --sweep {key}=v1,v2,...")
        parts = split_values(text)
        if not all(parts):
            raise BenchError(f"--sweep {key}: empty value in {text.strip()!r} (use e.g. --sweep {key}=1,2)")
        out[key] = [parse_value(p) for p in parts]
    return out


def split_values(text: str) -> list[str]:
    """ "1, [2, 3], 'a,b'" -> ["1", "[2, 3]", "'a,b'"]: split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[]":
            depth += 1 if ch == "[" else -1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def value_text(value: Any) -> str:
    """A config value as `--set`/`--sweep` text that parses back to it (TOML: true, 1.5, "s", [1, 2])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return repr(value)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def to_jsonable(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


# ---------------------------------------------------------------- the grid's list options (--eps, --seeds, ...)


def parse_epsilons(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise BenchError(f"--eps: {part!r} is not a number (use e.g. --eps 1,10)") from None
        if not math.isfinite(value) or value <= 0:
            raise BenchError(f"--eps: ε must be a finite number > 0, got {part}")
        values.append(value)
    return values


def parse_seeds(text: str) -> list[int]:
    """--seeds: comma-separated integers in [0, 2⁶³), each once."""
    seeds: list[int] = []
    for s in parse_list(text, "--seeds"):
        if not re.fullmatch(r"\d+", s) or int(s) >= 2**63:
            raise BenchError(f"--seeds: {s!r} is not an integer in [0, 2^63) (use e.g. --seeds 0,1,2)")
        if int(s) in seeds:
            raise BenchError(f"--seeds: {s} is given twice")
        seeds.append(int(s))
    return seeds


def parse_list(text: str, what: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise BenchError(f"{what}: empty list")
    return items


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridOptions:
    """The options `bench run`, `bench audit` and `bench paper` share, parsed and checked once (`parse`): what
    `runner.plan` (and the audit's and the paper's planning) take. `methods`, `epsilons` and `datasets` are empty
    for `bench paper`, whose table names them."""

    methods: tuple[str, ...] = ()
    epsilons: tuple[float, ...] = ()
    datasets: tuple[str, ...] = ()
    seeds: tuple[int, ...]
    delta: float | None
    accountant: str
    profile: str
    sets: tuple[str, ...] = ()
    sweeps: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    data_root: str | None = None

    @classmethod
    def parse(
        cls, *, seeds: str, delta: float | None, accountant: str, profile: str, sets: list[str] | None,
        plugins: list[Any] | None, data_root: str | None, sweeps: list[str] | None = None, methods: str | None = None,
        eps: str | None = None, dataset: str | None = None,
    ) -> GridOptions:  # fmt: skip
        """From the command line's text: one-line errors (BenchError) for a bad list, ε, seed or δ."""
        if delta is not None and not 0 < delta < 1:
            raise BenchError(f"--delta must be in (0, 1), got {delta}")
        return cls(
            methods=tuple(parse_list(methods, "--methods")) if methods is not None else (),
            epsilons=tuple(parse_epsilons(eps)) if eps is not None else (),
            datasets=tuple(parse_list(dataset, "--dataset")) if dataset is not None else (),
            seeds=tuple(parse_seeds(seeds)), delta=delta, accountant=accountant, profile=profile,
            sets=tuple(sets or ()), sweeps=tuple(sweeps or ()), plugins=tuple(str(p) for p in plugins or ()),
            data_root=data_root,
        )  # fmt: skip

    def plan_args(self, *, sweeps: bool = True) -> dict[str, Any]:
        """The keyword arguments of `runner.plan` (and of `audit.plan_audits`, without `sweeps`)."""
        args: dict[str, Any] = {
            "methods": list(self.methods), "epsilons": list(self.epsilons), "datasets": list(self.datasets),
            "seeds": list(self.seeds), "delta": self.delta, "accountant": self.accountant, "profile": self.profile,
            "sets": list(self.sets), "plugins": self.plugins, "data_root": self.data_root,
        }  # fmt: skip
        return args | ({"sweeps": list(self.sweeps)} if sweeps else {})
