"""What every method's `fit` shares.

- Non-private minibatch training (the non-private reference `ddpm`, DP-SAD's teacher): shuffled epochs, as a
  DataLoader with shuffle=True and drop_last=True, and one plain optimiser step followed by the EMA update.
- The skeleton of a resumable fit: `FitState` (set-up of what is checkpointed, resume, progress, checkpoint),
  and for DP-SGD (whose step is bench.privacy.dpsgd) the rate check, the step count, the loop over Poisson batches and
  the ledger of the executed stages. dpdm, dpgan and both DP-SAD variants are built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bench.contract import Progress
from bench.diffusion import EMA
from bench.privacy import PrivacyLedger, Stage
from bench.privacy.dpsgd import ChargedSteps
from bench.privacy.setup import poisson_rate, steps_for  # noqa: F401 - their old home: methods import them here


@dataclass
class ShuffledEpochs:
    """Minibatches that visit every record once per epoch, in an order drawn at each epoch's start: step k takes
    batch k mod per_epoch of the current permutation. `steps` = round(epochs · per_epoch), at least 1."""

    num_records: int
    batch_size: int
    epochs: float
    per_epoch: int = field(init=False)
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = min(self.batch_size, self.num_records)
        self.per_epoch = max(1, self.num_records // self.batch_size)
        self.steps = max(1, round(self.epochs * self.per_epoch))

    def first_permutation(self) -> Tensor:
        """The permutation before the first step (replaced at step 0): the identity."""
        return torch.arange(self.num_records)

    def batch(self, step: int, perm: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Step `step`'s record indices, and the permutation to keep (checkpointed with the step): a new one from
        `generator` at each epoch's start, else `perm`."""
        if step % self.per_epoch == 0:
            perm = torch.randperm(self.num_records, generator=generator)
        i = step % self.per_epoch
        return perm[i * self.batch_size : (i + 1) * self.batch_size], perm


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, ema: EMA | None = None) -> None:
    """One non-private step on `loss`, then the EMA update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if ema is not None:
        ema.update(model)


# ---------------------------------------------------------------------------------------------------
# The skeleton of a resumable fit (DP-SGD or not)
# ---------------------------------------------------------------------------------------------------


def _state_of(part: Any) -> Any:
    if isinstance(part, list | tuple):
        return [p.state_dict() for p in part]
    if isinstance(part, dict):
        return {k: p.state_dict() for k, p in part.items()}
    return part.state_dict()


def _load(part: Any, state: Any) -> None:
    if isinstance(part, list | tuple):
        for p, s in zip(part, state, strict=True):
            p.load_state_dict(s)
    elif isinstance(part, dict):
        for k, p in part.items():
            p.load_state_dict(state[k])
    else:
        part.load_state_dict(state)


class FitState:
    """The whole training state of one `fit`, checkpointed and restored as one, so that a resumed fit continues
    where the interrupted one stopped and spends no privacy budget twice.

    `parts` name objects with state_dict/load_state_dict (the method, optimisers, DP-SGD engines: their step
    counters), or lists or dicts of them; `values` name plain values the loop updates (a step, a permutation);
    `generator` is the run's CPU generator and `noise_gen` the one seeded from it where the parameters live.
    Checkpoint layout: {part name: its state, value name: value, "generator", "noise_generator"}.
    """

    def __init__(
        self,
        progress: Progress,
        generator: torch.Generator,
        noise_gen: torch.Generator,
        parts: dict[str, Any],
        values: dict[str, Any] | None = None,
    ) -> None:
        self.progress, self.generator, self.noise_gen = progress, generator, noise_gen
        self.parts, self.values = parts, dict(values or {})
        if clash := set(parts) & set(self.values) | (set(parts) | set(self.values)) & {"generator", "noise_generator"}:
            raise ValueError(f"FitState: names used twice: {sorted(clash)}")

    def state(self) -> dict[str, Any]:
        return {
            **{name: _state_of(part) for name, part in self.parts.items()},
            **self.values,
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_gen.get_state(),
        }

    def resume(self) -> bool:
        """Restore the last checkpoint of an interrupted fit of this run, if there is one."""
        if (state := self.progress.resume()) is None:
            return False
        for name, part in self.parts.items():
            _load(part, state[name])
        self.values.update({k: state[k] for k in self.values})
        self.generator.set_state(state["generator"])
        self.noise_gen.set_state(state["noise_generator"])
        return True

    def start(self, total: int, description: str, done: int) -> None:
        """Show the progress bar, `done` of `total` units already taken (by a resumed fit)."""
        self.progress.start(total, description)
        self.progress.advance(done)

    def step_done(self) -> None:
        """One unit of work taken: advance the bar; the harness checkpoints when one is due."""
        self.progress.advance()
        self.progress.checkpoint(self.state)


def dp_steps(
    fit: FitState, engine: ChargedSteps, steps: int, batches: Iterator[Tensor], device: torch.device,
    body: Callable[[Tensor], None],
) -> None:  # fmt: skip
    """The DP-SGD loop: Poisson batches (record indices, moved to `device`) until `engine` has taken `steps`
    charged steps (`body` takes one); progress and checkpoint after each."""
    while engine.steps < steps:
        body(next(batches).to(device))
        fit.step_done()


def plain_steps(
    fit: FitState, epochs: ShuffledEpochs, device: torch.device, body: Callable[[Tensor], None], *,
    step: str = "step", perm: str = "perm",
) -> None:  # fmt: skip
    """The non-private loop: shuffled minibatches (record indices, moved to `device`) until `epochs.steps`
    steps are taken (`body` takes one); the step and the permutation are `fit.values[step]` and
    `fit.values[perm]` (checkpointed), the permutations are drawn from the run's generator."""
    while (k := fit.values[step]) < epochs.steps:
        idx, fit.values[perm] = epochs.batch(k, fit.values[perm], fit.generator)
        body(idx.to(device))
        fit.values[step] = k + 1
        fit.step_done()


def ledger_of(*stages: Stage) -> PrivacyLedger:
    """A ledger of the stages each DP mechanism executed, in the order they ran."""
    ledger = PrivacyLedger()
    for stage in stages:
        ledger.add(stage)
    return ledger
