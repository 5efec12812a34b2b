"""bench.training: shuffled epochs visit every record once per epoch in a fresh order; one plain step; a fit's
state (FitState) resumes where it stopped; the DP-SGD loop skeleton."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench.diffusion import EMA
from bench.errors import BenchError
from bench.privacy import Stage
from bench.privacy.dpsgd import DPSGD, poisson_stream
from bench.training import FitState, ShuffledEpochs, dp_steps, ledger_of, plain_step, poisson_rate, steps_for
from tests.conftest import InterruptAt


def test_every_record_once_per_epoch_in_a_new_order_each_epoch() -> None:
    epochs = ShuffledEpochs(10, 3, 2.0)  # drop_last: 3 batches of 3 per epoch, record 9 of each order left out
    assert (epochs.per_epoch, epochs.steps, epochs.batch_size) == (3, 6, 3)
    g, perm, seen = torch.Generator().manual_seed(0), epochs.first_permutation(), []
    for step in range(epochs.steps):
        idx, perm = epochs.batch(step, perm, g)
        seen.append(idx)
    first, second = torch.cat(seen[:3]), torch.cat(seen[3:])
    assert len(set(first.tolist())) == 9 and len(set(second.tolist())) == 9  # no record twice in an epoch
    assert not torch.equal(first, second)  # a new order each epoch
    assert ShuffledEpochs(5, 64, 0.1).batch_size == 5 and ShuffledEpochs(5, 64, 0.1).steps == 1


def test_a_resumed_schedule_continues_with_the_saved_permutation() -> None:
    epochs = ShuffledEpochs(12, 4, 3.0)
    g, perm, full = torch.Generator().manual_seed(1), epochs.first_permutation(), []
    for step in range(epochs.steps):
        idx, perm = epochs.batch(step, perm, g)
        full.append(idx)
    g, perm, resumed = torch.Generator().manual_seed(1), epochs.first_permutation(), []
    for step in range(4):
        idx, perm = epochs.batch(step, perm, g)
        resumed.append(idx)
    state, saved = g.get_state(), perm.clone()
    g2 = torch.Generator()
    g2.set_state(state)
    for step in range(4, epochs.steps):  # a fresh process: the generator state and the permutation restored
        idx, saved = epochs.batch(step, saved, g2)
        resumed.append(idx)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True))


def test_plain_step_updates_the_model_and_its_ema() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.5)
    before, ema_before = model.weight.detach().clone(), ema.model.weight.detach().clone()
    plain_step(model, torch.optim.SGD(model.parameters(), lr=0.1), model(torch.ones(1, 2)).sum(), ema)
    assert not torch.equal(model.weight, before)
    assert torch.allclose(ema.model.weight, 0.5 * ema_before + 0.5 * model.weight.detach())


def _dp_fit(progress: InterruptAt, stop_after: int | None = None) -> tuple[torch.nn.Linear, int]:
    """A tiny DP-SGD fit over FitState + dp_steps; `stop_after` interrupts it after that many steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    dp = DPSGD(model, opt, per_example_loss=lambda m, xb: m(xb).squeeze(-1) ** 2, noise_multiplier=1.0,
               max_grad_norm=1.0, sample_rate=0.25, num_records=40, generator=g, mode="functorch")  # fmt: skip
    fit = FitState(progress, g, g, {"model": model, "optimizers": [opt], "dpsgd": dp}, {"seen": 0})
    fit.resume()
    fit.start(8, "test", dp.steps)

    def step(idx: torch.Tensor) -> None:
        if stop_after is not None and dp.steps == stop_after:
            raise KeyboardInterrupt
        dp.step(x[idx])
        fit.values["seen"] += len(idx)

    with contextlib.suppress(KeyboardInterrupt):
        dp_steps(fit, dp, 8, poisson_stream(40, 0.25, g), torch.device("cpu"), step)
    return model, fit.values["seen"]


def test_a_fit_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does() -> None:
    whole, seen = _dp_fit(InterruptAt(0))
    progress = InterruptAt(3)  # the state after 3 steps, then interrupted
    _dp_fit(progress, stop_after=3)
    assert progress.saved is not None and progress.saved["dpsgd"]["steps"] == 3
    resumed_progress = InterruptAt(0, progress.saved)
    resumed, resumed_seen = _dp_fit(resumed_progress)
    assert resumed_progress.done == 8  # 3 already taken (start) + 5 more
    assert resumed_seen == seen and torch.equal(resumed.weight, whole.weight)


def test_a_resume_that_drops_the_generator_state_diverges() -> None:
    """The check above can fail: a checkpoint without the generators' state continues on another stream."""
    whole, _ = _dp_fit(InterruptAt(0))
    progress = InterruptAt(3)
    _dp_fit(progress, stop_after=3)
    assert progress.saved is not None
    tampered = dict(progress.saved, generator=torch.Generator().manual_seed(99).get_state())
    tampered["noise_generator"] = tampered["generator"]
    resumed, _ = _dp_fit(InterruptAt(0, tampered))
    assert not torch.equal(resumed.weight, whole.weight)


def test_fit_state_refuses_a_name_used_twice_and_the_rate_check_names_the_field() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match="names used twice"):
        FitState(InterruptAt(0), g, g, {"step": torch.nn.Linear(1, 1)}, {"step": 0})
    with pytest.raises(ValueError, match="names used twice"):
        FitState(InterruptAt(0), g, g, {"generator": torch.nn.Linear(1, 1)})
    with pytest.raises(BenchError, match="dpx: batch_size 64 exceeds the 10 training records"):
        poisson_rate("dpx: batch_size", 64, 10)
    assert poisson_rate("b", 10, 40) == 0.25 and steps_for(2.0, 0.25) == 8 and steps_for(0.01, 0.25) == 1
    stage = Stage(name="s", mechanism="poisson_gaussian", noise_multiplier=1.0, sampling_rate=0.1, steps=3)
    assert ledger_of(stage, stage).stages == [stage, stage] and ledger_of().stages == []
