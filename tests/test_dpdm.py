"""DPDM specifics: the ledger charges exactly what the training loop executed."""

from __future__ import annotations

import pytest
import torch

from bench import config, registry
from bench.contract import NullProgress
from bench.dpsgd import DPSGD
from bench.errors import BenchError
from bench.privacy import Budget, calibrate_sigma, epsilon
from tests.conftest import TINY_PROFILE


def test_ledger_matches_the_executed_steps(train, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = registry.get("dpdm")
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method="dpdm",
        dataset="synthetic",
        epsilon=3.0,
        sets={"noise_multiplicity": 3},
    )
    calls: list[tuple[int, int]] = []  # (batch size, K) of every executed noisy step
    real_step = DPSGD.step

    def spy(self, *batch):
        calls.append((batch[0].shape[0], batch[2].shape[1]))
        return real_step(self, *batch)

    monkeypatch.setattr(DPSGD, "step", spy)
    budget = Budget.for_records(3.0, len(train))
    ledger = cls(cfg, spec=train.spec, device=torch.device("cpu")).fit(
        train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress()
    )
    (stage,) = ledger.stages
    q = cfg.batch_size / len(train)
    assert stage.mechanism == "poisson_gaussian"
    assert stage.sampling_rate == pytest.approx(q)
    assert stage.steps == len(calls) == round(cfg.epochs / q)
    assert stage.max_grad_norm == cfg.max_grad_norm
    assert stage.noise_multiplier == calibrate_sigma(3.0, sample_rate=q, steps=stage.steps, delta=budget.delta)
    assert all(k == 3 for _, k in calls), "every example's loss is averaged over K draws"
    assert sum(b for b, _ in calls) / len(calls) == pytest.approx(cfg.batch_size, rel=0.3)  # Poisson batches
    assert len({b for b, _ in calls}) > 1, "batch sizes vary under Poisson sampling"
    assert epsilon(ledger, budget.delta, "rdp") <= 3.0


def test_batch_larger_than_dataset_is_refused(train) -> None:
    cls = registry.get("dpdm")
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method="dpdm",
        dataset="synthetic",
        epsilon=3.0,
        sets={"batch_size": 5000},
    )
    with pytest.raises(BenchError, match="exceeds the 2000 training records"):
        cls(cfg, spec=train.spec, device=torch.device("cpu")).fit(
            train, budget=Budget.for_records(3.0, 2000), generator=torch.Generator(), progress=NullProgress()
        )
