"""Non-private minibatch training, shared by every network a method trains without DP (the non-private reference
`ddpm`, DP-SAD's teacher): shuffled epochs, as a DataLoader with shuffle=True and drop_last=True, and one plain
optimiser step followed by the EMA update. The DP-SGD counterpart is bench.dpsgd."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bench.diffusion import EMA


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
