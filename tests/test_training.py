"""bench.training: shuffled epochs visit every record once per epoch in a fresh order; one plain step."""

from __future__ import annotations

import torch

from bench.diffusion import EMA
from bench.training import ShuffledEpochs, plain_step


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
