from __future__ import annotations

import dataclasses
import warnings
from importlib.metadata import EntryPoint

import pytest

from bench.errors import BenchError
from bench.grid import registry
from tests.conftest import TESTS

PLUGINS = TESTS / "plugins"


@pytest.fixture(autouse=True)
def _fresh_registry() -> None:
    registry._cache.clear()


def test_builtins_are_registered_and_valid() -> None:
    reg = registry.methods()
    assert {"dpdm", "ddpm"} <= set(reg)
    for name, cls in reg.items():
        assert cls.name == name
        assert dataclasses.is_dataclass(cls.Config)


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(BenchError, match=r"unknown method 'nope'; available: .*dpdm"):
        registry.get("nope")


def test_plugin_file_adds_a_method() -> None:
    reg = registry.methods((str(PLUGINS / "good_plugin.py"),))
    assert reg["noisy-means"].__name__ == "NoisyMeans"
    assert "dpdm" in reg


def test_duplicate_name_is_an_error() -> None:
    with pytest.raises(BenchError, match="duplicate method name 'dpdm'"):
        registry.methods((str(PLUGINS / "duplicate_plugin.py"),))


def test_a_named_plugin_file_that_fails_to_load_is_an_error_naming_it(tmp_path) -> None:
    """A file the user names must load, or nothing runs: import failures, a file without a method class and a class
    that breaks the contract are one-line errors (an entry point that fails stays a warning, below)."""
    with pytest.raises(BenchError, match=r"plugin file .*broken_plugin.py failed to load: \w+Error") as e:
        registry.methods((str(PLUGINS / "broken_plugin.py"),))
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(BenchError, match="defines no method class"):
        registry.methods((str(empty),))
    bad = tmp_path / "bad.py"
    bad.write_text("class Bad:\n    name = 'Bad Name'\n    Config = dict\n")
    with pytest.raises(BenchError, match=r"plugin file .*bad.py: "):
        registry.methods((str(bad),))


def test_broken_entry_point_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        EntryPoint("ghost", "no_such_package.mod:Ghost", registry.ENTRY_POINT_GROUP),
        EntryPoint("noisy-means", "good_plugin:NoisyMeans", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])
    with pytest.warns(registry.PluginWarning, match="'ghost'"):
        reg = registry.methods()
    assert "noisy-means" in reg and "ghost" not in reg


def test_entry_point_duplicating_a_builtin_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    ep = EntryPoint("dpdm", "duplicate_plugin:FakeDPDM", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    with pytest.raises(BenchError, match="duplicate method name 'dpdm'"):
        registry.methods()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c, "name", "Bad Name"), "lowercase-kebab"),
        (lambda c: setattr(c, "Config", dict), "Config must be a dataclass"),
        (lambda c: delattr(c, "sample"), "missing method sample"),
        (lambda c: setattr(c, "guarantee", "strong"), "guarantee must be one of"),
        (lambda c: setattr(c, "conditional", "yes"), "conditional must be declared"),
    ],
)
def test_validation_names_what_is_wrong(mutate, message) -> None:
    base = registry.methods()["ddpm"]
    cls = type(
        "Candidate",
        (),
        {
            k: getattr(base, k)
            for k in (
                "name",
                "Config",
                "conditional",
                "guarantee",
                "needs_public_data",
                "fit",
                "sample",
                "state_dict",
                "load_state_dict",
            )
        },
    )
    registry.validate(cls)
    mutate(cls)
    with pytest.raises(ValueError, match=message):
        registry.validate(cls)


def test_unfrozen_config_is_rejected() -> None:
    @dataclasses.dataclass
    class Loose:
        x: int = 1

    base = registry.methods()["ddpm"]
    cls = type("Candidate", (base,), {"Config": Loose})
    with pytest.raises(ValueError, match="frozen"):
        registry.validate(cls)


def test_no_warning_for_clean_registry() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.PluginWarning)
        registry.methods()


def unchecked_fields(classes: dict[str, type]) -> list[str]:
    """The (method.field=value) a Config accepts though it should refuse it: -1 for an int/float field (unless
    SIGNED), a made-up value for a free str field, a value of the wrong type for any field."""
    import typing

    from bench import config

    accepted = []
    for name, cfg in sorted(classes.items()):
        hints = typing.get_type_hints(cfg)
        for f in dataclasses.fields(cfg):
            kind = hints[f.name]
            tries = {int: [-1, "x"], float: [-1.0, "x"], str: ["no-such-value", 3], bool: ["yes"]}.get(kind, [])
            if f.metadata.get("signed"):
                tries = tries[1:]
            for value in tries:
                try:
                    config.build_dataclass(cfg, {f.name: value}, name)
                except BenchError:
                    continue
                accepted.append(f"{name}.{f.name}={value!r}")
    return accepted


def test_every_config_field_is_checked_at_plan_time() -> None:
    """build_dataclass is what `plan` (and so `--dry-run`) calls for every cell."""
    assert unchecked_fields({name: cls.Config for name, cls in registry.methods().items()}) == []


def test_the_field_check_catches_an_unchecked_field() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Loose:
        width: int = 4
        mode: str = "a"

    assert unchecked_fields({"loose": Loose}) == ["loose.width=-1", "loose.mode='no-such-value'"]
