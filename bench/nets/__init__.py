"""Networks shared by several methods. GroupNorm only: BatchNorm mixes examples and breaks DP-SGD."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bench.nets.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "seeded_init"]


@contextmanager
def seeded_init(generator: torch.Generator) -> Iterator[None]:
    """Draw a seed from `generator` and use it for torch's global RNG inside the block, restoring it after.

    nn.Module constructors initialise parameters from the global RNG; building networks inside this
    block makes their initial weights a function of the run's generator (same seed -> same model).
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
