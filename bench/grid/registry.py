"""The method registry: built-ins, entry points in group `bench.methods`, and `--plugin file.py`.

Merged once per set of plugin files. A duplicate name is an error; a plugin file the user names (`--plugin`) that
fails to import, defines no method or breaks the contract is a one-line error (nothing runs); an entry-point plugin
that does is a warning naming it; an unknown name lists the available ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from bench.contract import Method
from bench.errors import BenchError, one_line

# Built-in methods: registry key -> "module:Class". Plugins add to this through entry points.
BUILTINS: dict[str, str] = {
    "dpdm": "bench.baselines.dpdm:DPDM",
    "ddpm": "bench.baselines.ddpm:DDPM",
    "dpgan": "bench.baselines.dpgan:DPGAN",
    "pategan": "bench.baselines.pategan:PATEGAN",
    "datalens": "bench.baselines.datalens:DataLens",
    "gpate": "bench.baselines.gpate:GPATE",
    "dpmerf": "bench.baselines.dpmerf:DPMERF",
    "dphp": "bench.baselines.dphp:DPHP",
    "dpntk": "bench.baselines.dpntk:DPNTK",
    "dpkernel": "bench.baselines.dpkernel:DPKernel",
    "gswgan": "bench.baselines.gswgan:GSWGAN",
    "dpsad": "bench.methods.dpsad:DPSAD",
    "dpsad-e2e": "bench.methods.dpsad_e2e:DPSADE2E",
    "dpsad-teacher": "bench.methods.dpsad_teacher:DPSADTeacher",
}
ENTRY_POINT_GROUP = "bench.methods"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_GUARANTEES = ("end-to-end", "partial", "none")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the rest of the registry still works."""


def validate(cls: object) -> type[Method]:
    """Check that `cls` satisfies the method contract; raise ValueError saying what is missing."""
    if not isinstance(cls, type):
        raise ValueError(f"{cls!r} is not a class")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{cls.__qualname__}.name must be a lowercase-kebab string, got {name!r}")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise ValueError(f"{name}: Config must be a dataclass")
    if not config.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise ValueError(f"{name}: Config must be a frozen dataclass")
    for attr in ("fit", "sample", "state_dict", "load_state_dict"):
        if not callable(getattr(cls, attr, None)):
            raise ValueError(f"{name}: missing method {attr}()")
    if getattr(cls, "guarantee", None) not in _GUARANTEES:
        raise ValueError(f"{name}: guarantee must be one of {_GUARANTEES}")
    for flag in ("conditional", "needs_public_data"):
        if not isinstance(getattr(cls, flag, None), bool):
            raise ValueError(f"{name}: capability {flag} must be declared as a bool")
    version = getattr(cls, "version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{name}: version must be an integer ≥ 0, got {version!r}")
    return cls  # type: ignore[return-value]


def is_builtin(cls: type) -> bool:
    return cls.__module__ in {target.partition(":")[0] for target in BUILTINS.values()}


def source_hash(cls: type) -> str:
    """The first 12 hex digits of the SHA-256 of the file that defines `cls` ("" when it has none)."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        path = None
    if path is None or not Path(path).is_file():
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


@functools.cache
def harness_hash() -> str:
    """The first 12 hex digits of a SHA-256 over the harness's own source (bench/**/*.py without the built-in
    methods, which each have their own version): a record of which code computed a run."""
    root = Path(__file__).resolve().parents[1]  # bench/
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("methods", "baselines"):
            continue
        digest.update(str(rel).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def code_record(cls: type) -> dict[str, str]:
    """What config.json records of the code that computes a run: the method's version and source hash, and the
    harness's hash (`bench run` compares them when it reuses a finished cell)."""
    return {"method_version": method_version(cls), "method_source": source_hash(cls), "harness": harness_hash()}


def method_version(cls: type) -> str:
    """What a run key records of a method's code: a built-in's declared `version` ("1"); a plugin's declared
    version (0 when none) and the hash of its source file ("0+1a2b3c4d5e6f"), so an edited plugin never reuses
    the cells its earlier code computed."""
    version = str(getattr(cls, "version", 0))
    return version if is_builtin(cls) else f"{version}+{source_hash(cls)}"


def _add(registry: dict[str, type[Method]], cls: type[Method], origin: str, origins: dict[str, str]) -> None:
    if cls.name in registry:
        if registry[cls.name] is cls:
            return
        raise BenchError(f"duplicate method name {cls.name!r}: from {origins[cls.name]} and from {origin}")
    registry[cls.name] = cls
    origins[cls.name] = origin


def _import(target: str) -> object:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_plugin_file(path: str | Path) -> list[type[Method]]:
    """Classes defined in a single local file that declare a `name` and a `Config` (the contract)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"plugin file {path} does not exist")
    mod_name = f"bench_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise BenchError(f"plugin file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == mod_name and hasattr(obj, "name") and hasattr(obj, "Config")
    ]


_cache: dict[tuple[str, ...], dict[str, type[Method]]] = {}


def methods(plugins: tuple[str | Path, ...] = ()) -> dict[str, type[Method]]:
    """All registered methods: built-ins, then entry points, then plugin files (merged once)."""
    key = tuple(str(Path(p).resolve()) for p in plugins)
    if key in _cache:
        return _cache[key]
    registry: dict[str, type[Method]] = {}
    origins: dict[str, str] = {}
    for name, target in BUILTINS.items():
        cls = validate(_import(target))  # a broken built-in is a bug of ours: let it raise
        if cls.name != name:
            raise RuntimeError(f"built-in {target} has name {cls.name!r}, registered as {name!r}")
        if not isinstance(vars(cls).get("version"), int):
            raise RuntimeError(f"built-in {target} declares no `version: ClassVar[int]`")
        _add(registry, cls, f"built-in {target}", origins)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = validate(ep.load())
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of third-party code is reported, not fatal
            warnings.warn(f"plugin {ep.name!r} ({ep.value}) failed to load: {e}", PluginWarning, stacklevel=2)
            continue
        if cls.name != ep.name:
            warnings.warn(
                f"plugin entry point {ep.name!r} loads a method named {cls.name!r}",
                PluginWarning,
                stacklevel=2,
            )
        _add(registry, cls, f"entry point {ep.value}", origins)
    for path in plugins:  # a file the user names must load, or nothing runs (an entry point may stay a warning)
        try:
            found = load_plugin_file(path)
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the file's code: one line naming it
            raise BenchError(f"plugin file {path} failed to load: {type(e).__name__}: {one_line(e)}") from None
        if not found:
            raise BenchError(f"plugin file {path} defines no method class (with `name` and `Config`)")
        for obj in found:
            try:
                cls = validate(obj)
            except ValueError as e:
                raise BenchError(f"plugin file {path}: {e}") from None
            _add(registry, cls, f"plugin file {path}", origins)
    _cache[key] = registry
    return registry


def get(name: str, plugins: tuple[str | Path, ...] = ()) -> type[Method]:
    registry = methods(plugins)
    if name not in registry:
        raise BenchError(f"unknown method {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]
