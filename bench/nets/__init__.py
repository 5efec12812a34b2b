"""Networks shared by several methods. GroupNorm only: BatchNorm mixes examples and breaks DP-SGD."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from bench.nets.unet import UNet, UNetConfig

__all__ = ["BuiltOnce", "UNet", "UNetConfig", "seeded_init"]


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


class BuiltOnce:
    """A method whose networks are built once. Its constructor checks that they fit the data (`check_networks`:
    the build run on PyTorch's meta device, which allocates nothing and draws no random number) without keeping
    them; `fit` builds them under the run's seed (`seeded_init`), and whatever reads them before a fit (the
    load_state_dict of a finished run, a curve snapshot, a test or a benchmark) builds them at its first access,
    unseeded (a load then overwrites every weight). A cell of the grid so builds its networks once, where the
    constructor used to build them and the fit again. `_networks()` builds and assigns them (default: `_build()`)."""

    device: torch.device

    def _build(self) -> Any:
        raise NotImplementedError

    def _networks(self) -> None:
        self._build()

    def check_networks(self) -> None:
        """Build on the meta device: a network that does not fit the data raises here (ValueError) as a real build
        would. The attributes the build sets are removed again and built for real at their first access."""
        before = dict(vars(self))
        device, self.device = self.device, torch.device("meta")
        try:
            with torch.device("meta"):
                self._networks()
        finally:
            self.device = device
        built = {k for k in vars(self) if k not in before}
        for k in built:
            delattr(self, k)
        self.__dict__["_unbuilt"] = frozenset(built)

    if not TYPE_CHECKING:  # mypy keeps checking attribute names; the first access to an unbuilt network builds all

        def __getattr__(self, name: str) -> Any:
            if name in self.__dict__.get("_unbuilt", ()):
                self.__dict__["_unbuilt"] = frozenset()
                self._networks()
                return getattr(self, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
