"""The exponential moving average of a network's weights, with warm-up: the released network of every diffusion
method."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    pass


class EMA:
    """Exponential moving average of a model's parameters (a post-processing of DP iterates).

    With `warmup`, the n-th update uses min(decay, (1 + n)/(10 + n)), as DPDM's model/ema.py
    (nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3, `use_num_updates=True`): early iterates are not
    frozen into the average by a decay meant for hundreds of thousands of steps. `updates` counts the updates
    (saved with the model: a resumed run continues the same schedule).
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - decay)
