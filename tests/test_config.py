from __future__ import annotations

import pytest

from bench import config, grid
from bench.errors import BenchError
from bench.grid import registry
from tests.conftest import TINY_PROFILE

DPDMConfig = registry.get("dpdm").Config


def test_layers_defaults_profile_dataset_eps_set() -> None:
    prof = {
        "dpdm": {
            "lr": 1e-3,
            "fmnist": {"batch_size": 256, "eps": {"10": {"epochs": 7.0}, "1": {"epochs": 3.0}}},
        },
    }
    cfg, notes = config.resolve(DPDMConfig, profile=prof, method="dpdm", dataset="fmnist", epsilon=10, sets={})
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.T) == (1e-3, 256, 7.0, DPDMConfig().T)
    assert notes == []
    cfg, _ = config.resolve(DPDMConfig, profile=prof, method="dpdm", dataset="mnist", epsilon=10, sets={"lr": 5e-4})
    assert (cfg.lr, cfg.batch_size) == (5e-4, DPDMConfig().batch_size)


def test_eps_without_a_tuned_entry_warns_and_records() -> None:
    prof = {"dpdm": {"fmnist": {"eps": {"10": {"epochs": 7.0}, "1": {"epochs": 3.0}}}}}
    cfg, notes = config.resolve(DPDMConfig, profile=prof, method="dpdm", dataset="fmnist", epsilon=2, sets={})
    assert cfg.epochs == 3.0
    assert notes and "tuned for ε=1 used at ε=2" in notes[0]


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"lrr": 1.0}, "unknown key 'lrr'"),
        ({"epochs": "abc"}, "expected a number"),
        ({"batch_size": 1.5}, "expected an integer"),
        ({"sampler": "euler"}, "not one of"),
        ({"sampler": "ddpm"}, "does not fit parameterization"),
        ({"channel_mults": 3}, "expected a list"),
        ({"lr": -1.0}, "lr must be > 0"),
    ],
)
def test_bad_overrides_are_one_line_errors(sets, message) -> None:
    with pytest.raises(BenchError, match=message) as e:
        config.resolve(DPDMConfig, profile={}, method="dpdm", dataset="fmnist", epsilon=1, sets=sets)
    assert "\n" not in str(e.value)


def test_parse_sets_types_and_eval_prefix() -> None:
    method, ev = config.parse_sets(["lr=1e-3", "channel_mults=[1, 2]", "sampler=ddpm", "eval.n_gen=10"])
    assert method == {"lr": 1e-3, "channel_mults": [1, 2], "sampler": "ddpm"}
    assert ev == {"n_gen": 10}
    with pytest.raises(BenchError, match="key=value"):
        config.parse_sets(["lr"])


def test_builtin_profiles_resolve_for_every_builtin_method() -> None:
    for profile in (*config.PROFILES, TINY_PROFILE):
        prof = config.load_profile(profile)
        for name, cls in registry.methods().items():
            for ds in ("fmnist", "mnist", "synthetic"):
                cfg, _ = config.resolve(cls.Config, profile=prof, method=name, dataset=ds, epsilon=1.0, sets={})
                assert isinstance(cfg, cls.Config)


def test_unknown_profile() -> None:
    with pytest.raises(BenchError, match="unknown profile 'fast'; available: smoke, demo, cpu, paper, gpu-short"):
        config.load_profile("fast")


def test_protocol_settings_from_profile_and_set(tmp_path) -> None:
    """[eval.dpdm] in a profile and --set eval.dpdm.<field> merge field by field into the run's settings."""
    from bench import grid

    profile = tmp_path / "p.toml"
    profile.write_text("[eval]\nn_gen = 40\n[eval.dpdm]\nepochs = 3\nbatch_size = 64\n")
    _, ev = config.parse_sets(["eval.dpdm.epochs=5", "eval.datalens.lr=0.1", "eval.n_gen=30"])
    assert ev == {"dpdm": {"epochs": 5}, "datalens": {"lr": 0.1}, "n_gen": 30}
    (spec,) = grid.plan(methods=["ddpm"], epsilons=[1.0], datasets=["synthetic"], seeds=[0], delta=None,
                          accountant="rdp", profile=str(profile), sets=["eval.dpdm.epochs=5"])  # fmt: skip
    protocols = spec.eval.settings["protocols"]
    assert protocols["dpdm"] == {"epochs": 5, "batch_size": 64, "lr": None, "n_train": None, "n_eval": None}
    assert protocols["datalens"]["epochs"] is None  # untouched: the reference's value
    other = grid.plan(methods=["ddpm"], epsilons=[1.0], datasets=["synthetic"], seeds=[0], delta=None,
                        accountant="rdp", profile=str(profile), sets=[])  # fmt: skip
    assert other[0].key != spec.key  # protocol settings are part of the run key
    with pytest.raises(BenchError, match="--set eval.n_gen.x: eval.n_gen is a setting, not a table"):
        config.parse_sets(["eval.n_gen=3", "eval.n_gen.x=1"])


def test_set_scoped_to_one_method_and_a_bare_field_some_methods_lack() -> None:
    from bench.grid import registry

    classes = {m: registry.get(m) for m in ("dpdm", "dpgan")}
    sets, _ = config.parse_sets(["dpdm.lr=1e-3", "epochs=0.5", "dpgan.epochs=2"])
    got = config.method_sets(sets, classes)
    assert got == {"dpdm": {"lr": 1e-3, "epochs": 0.5}, "dpgan": {"epochs": 2}}  # the scoped value wins
    with pytest.raises(BenchError, match=r"--set lr: dpgan has no field 'lr'; set it for one method as METHOD.lr"):
        config.method_sets({"lr": 1e-3}, classes)
    with pytest.raises(BenchError, match=r"--set ddpm.lr: 'ddpm' is not a method of this grid \(dpdm, dpgan\)"):
        config.method_sets({"ddpm.lr": 1e-3}, classes)
    specs = grid.plan(methods=["dpdm", "dpgan"], epsilons=[10.0], datasets=["synthetic"], seeds=[0], delta=None,
                        accountant="rdp", profile="smoke", sets=["dpdm.lr=0.002"])  # fmt: skip
    assert [s.config_json.get("lr") for s in specs] == [0.002, None]


def test_a_profile_extends_another_key_by_key(tmp_path) -> None:
    base = tmp_path / "base.toml"
    base.write_text("[eval]\nn_gen = 40\ncurve = 2\n[dpdm]\nlr = 1e-3\nepochs = 2.0\n[dpdm.fmnist]\nbatch_size = 64\n")
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{base}"\n[eval]\ncurve = 5\n[dpdm]\nepochs = 4.0\n[dpgan]\nepochs = 3.0\n')
    prof = config.load_profile(str(child))
    assert prof == {
        "eval": {"n_gen": 40, "curve": 5},
        "dpdm": {"lr": 1e-3, "epochs": 4.0, "fmnist": {"batch_size": 64}},
        "dpgan": {"epochs": 3.0},
    }
    base.write_text(f'extends = "{child}"\n')
    with pytest.raises(BenchError, match="a cycle") as e:
        config.load_profile(str(child))
    assert "\n" not in str(e.value)
    child.write_text("extends = 3\n")
    with pytest.raises(BenchError, match="extends must be a profile name or path"):
        config.load_profile(str(child))
    child.write_text('extends = "fast"\n')
    with pytest.raises(BenchError, match="unknown profile 'fast'"):
        config.load_profile(str(child))


def _plan(methods: list[str], epsilons: list[float], profile: str) -> list[grid.RunSpec]:
    return grid.plan(methods=methods, epsilons=epsilons, datasets=["fmnist"], seeds=[0], delta=None,
                       accountant="rdp", profile=profile, sets=[])  # fmt: skip


CPU_GRID = ["dpsad", "dpsad-e2e", "dpdm", "dpgan", "dpmerf", "pategan"]


def _steps(spec) -> float:
    """The training length a cell's config asks for, in the method's own units."""
    cfg = spec.config_json
    if spec.method == "pategan":
        return cfg["iterations"]
    return cfg["epochs"] * (1 + cfg.get("teacher_epochs", 0.0))


def test_the_cpu_profile_plans_every_method_at_both_eps_with_curves_and_more_steps_than_smoke() -> None:
    """`--profile cpu`: fmnist, ε ∈ {1, 10}, the six methods, dpsad's teacher row; the smoke profile's networks and
    scoring (it extends smoke) with longer fits and a quality-against-compute curve along each."""
    plan = {p: _plan(CPU_GRID, [1.0, 10.0], p) for p in ("smoke", "cpu")}
    cells = {(s.method, s.epsilon) for s in plan["cpu"]}
    assert cells == {(m, e) for m in CPU_GRID for e in (1.0, 10.0)} | {("dpsad-teacher", float("inf"))}
    smoke = {(s.method, s.epsilon): s for s in plan["smoke"]}
    longer = set()
    for s in plan["cpu"]:
        ref = smoke[(s.method, s.epsilon)]
        assert s.eval.settings["curve"] > 0 and ref.eval.settings.get("curve", 0) == 0
        same = {k: v for k, v in s.config_json.items() if k not in ("epochs", "teacher_epochs", "iterations")}
        assert same == {k: v for k, v in ref.config_json.items() if k in same}, s.method  # networks etc. are smoke's
        assert _steps(s) >= _steps(ref), s.method
        if _steps(s) > _steps(ref):
            longer.add(s.method)
    assert longer == {*CPU_GRID, "dpsad-teacher"}
    dpsad = next(s for s in plan["cpu"] if s.method == "dpsad")
    dpdm = next(s for s in plan["cpu"] if s.method == "dpdm")
    # equal DP steps: they differ in how the student trains
    assert dpsad.config_json["epochs"] == dpdm.config_json["epochs"]


def test_the_demo_profile_is_smoke_with_the_cuts_its_header_lists() -> None:
    """`make demo`'s profile: smoke's networks and learning rates; only the listed training lengths, the sample
    count and the sampler's levels differ, and dpdm and dpsad keep equal DP steps."""
    grid = ["dpsad", "dpsad-e2e", "dpdm", "dpgan", "dpmerf"]
    plans = {p: {s.method: s for s in _plan(grid, [10.0], p)} for p in ("smoke", "demo")}
    assert plans["demo"].keys() == plans["smoke"].keys() == {*grid, "dpsad-teacher"}
    cuts = {"sample_steps": (8, 12), "pool_sample_steps": (8, 12), "epochs": None, "teacher_epochs": None}
    for name, demo in plans["demo"].items():
        smoke = plans["smoke"][name]
        assert {k: v for k, v in demo.config_json.items() if k not in cuts} == {
            k: v for k, v in smoke.config_json.items() if k not in cuts
        }, name
        for k in ("sample_steps", "pool_sample_steps"):
            if k in demo.config_json:
                assert (demo.config_json[k], smoke.config_json[k]) == cuts[k], name
        for k in ("epochs", "teacher_epochs"):
            if k in demo.config_json and name != "dpgan":
                assert demo.config_json[k] < smoke.config_json[k], (name, k)
        assert (demo.eval.n_gen, smoke.eval.n_gen) == (500, 1000)
        assert (demo.eval.settings["extractor_epochs"], smoke.eval.settings["extractor_epochs"]) == (1, 2)
    assert plans["demo"]["dpsad"].config_json["epochs"] == plans["demo"]["dpdm"].config_json["epochs"]
    assert plans["demo"]["dpsad"].config_json["teacher_epochs"] == plans["demo"]["dpsad-teacher"].config_json["epochs"]
