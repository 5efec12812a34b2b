"""bench.privacy.setup, the one DP-SGD set-up every DP-SGD method calls, and the package's old import paths."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from bench.privacy import ACCOUNTANTS, Budget, calibrate_sigma, epsilon
from bench.privacy.dpsgd import DPSGD
from bench.privacy.setup import make_dpsgd, plan_dpsgd, steps_for


def loss(call, x):  # noqa: ANN001, ANN201
    return call(x[None]).pow(2).sum()


def test_make_dpsgd_wires_rate_steps_sigma_and_the_engine() -> None:
    """q = B/N, steps = round(epochs/(q·m))·m, σ = calibrate_sigma's for exactly those, and an engine that charges
    them: its stage after `steps` steps spends the budget, no more."""
    budget = Budget(epsilon=3.0, delta=1e-5)
    model = nn.Linear(3, 1)
    private = make_dpsgd(model, torch.optim.SGD(model.parameters(), lr=0.1), name="test: batch_size",
                         per_example_loss=loss, budget=budget, batch_size=40, epochs=2.0, num_records=1000,
                         max_grad_norm=1.0, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                         steps_multiple=3, mode="folded")  # fmt: skip
    q, steps, sigma = private.plan.astuple()
    assert q == 0.04 and steps == 51 and steps % 3 == 0  # round(2 / 0.12) = 17 rounds of 3
    assert sigma == calibrate_sigma(3.0, sample_rate=0.04, steps=51, delta=1e-5, accountant="rdp")
    dp = private.engine
    assert isinstance(dp, DPSGD) and dp.noise_multiplier == sigma and dp.sample_rate == q and dp.mode == "folded"
    assert private.noise_generator is not None
    for _ in range(steps):
        dp.step(torch.randn(2, 3))
    assert epsilon([dp.stage("s")], 1e-5) == pytest.approx(3.0, rel=1e-2) and epsilon([dp.stage("s")], 1e-5) <= 3.0
    assert plan_dpsgd("x", budget=budget, batch_size=40, epochs=2.0, num_records=1000).steps == steps_for(2.0, 0.04)
    with pytest.raises(BenchError, match="test: batch_size 2000 exceeds the 1000 training records"):
        plan_dpsgd("test: batch_size", budget=budget, batch_size=2000, epochs=1.0, num_records=1000)


def test_the_accountants_are_a_registry() -> None:
    assert list(ACCOUNTANTS) == ["rdp", "pld", "prv"] and all(callable(f) for f in ACCOUNTANTS.values())


def test_the_old_import_path_of_the_engine_still_works_with_a_warning() -> None:
    """Plugins wrote `from bench.dpsgd import DPSGD`: it still works, warns, and IS the engine's module (so a
    test's spy set on it reaches the engine)."""
    sys.modules.pop("bench.dpsgd", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("bench.dpsgd")
    assert old is importlib.import_module("bench.privacy.dpsgd") and old.DPSGD is DPSGD
    assert any(issubclass(w.category, DeprecationWarning) and "bench.privacy.dpsgd" in str(w.message) for w in caught)
