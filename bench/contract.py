"""The method contract: what every generative method (built-in or plugin) provides.

A method trains on the private training set under a privacy budget and returns the ledger of every
mechanism it applied to private data; the harness recomputes ε from that ledger, samples labelled
images and scores them. Metrics are never computed by a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from bench.privacy import Budget, PrivacyLedger

Guarantee = Literal["end-to-end", "partial", "none"]


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Shape of a dataset, all a method may know before seeing the data."""

    channels: int
    height: int
    width: int
    num_classes: int
    num_train: int  # number of records in the private training set


@dataclass(frozen=True)
class ImageDataset:
    """Images in memory: `images` uint8 [N, C, H, W] in 0..255, `labels` int64 [N] in 0..classes-1."""

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spec(self) -> DataSpec:
        n, c, h, w = self.images.shape
        return DataSpec(channels=c, height=h, width=w, num_classes=self.num_classes, num_train=n)

    def subset(self, index: Tensor) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.num_classes, self.name)


class Progress(Protocol):
    """What the harness gives `fit`: progress display and crash-safe checkpoints.

    A method calls `start(total)` once, then `advance()` after each unit of work and
    `checkpoint(state_fn)` at points where its whole training state (model, optimizer, RNG and
    accountant state together) can be captured; the harness decides whether one is due and saves it
    atomically. At the start of `fit` a method calls `resume()`: a non-None result is the state it last
    checkpointed in an interrupted fit of the same run, from which it must continue, so that no
    privacy budget is spent twice.
    """

    def start(self, total: int, description: str = "") -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def resume(self) -> dict[str, Any] | None: ...
    def checkpoint(self, state_fn: Callable[[], dict[str, Any]]) -> None: ...


class NullProgress:
    """A Progress that shows nothing and never checkpoints (tests, library use)."""

    def start(self, total: int, description: str = "") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def resume(self) -> dict[str, Any] | None:
        return None

    def checkpoint(self, state_fn: Callable[[], dict[str, Any]]) -> None:
        pass


SharedBuild = Callable[[Progress], dict[str, Any]]


def shared_stage(progress: Progress, name: str, ident: dict[str, Any], build: SharedBuild) -> dict[str, Any]:
    """A stage that several runs share (DP-SAD's non-private teacher): `build(progress)` trains it (checkpointing and
    resuming through the Progress it is given, as a fit does) and returns its state; the harness (the optional
    Progress member `shared`, bench.grid.shared) keys it by `name`, `ident` (everything that determines it: config,
    seed, code version) and the dataset, builds it once per results folder under a lock and gives every later
    caller the stored state. A Progress without `shared` (a plugin's own) builds it each time."""
    member = getattr(progress, "shared", None)
    return member(name, ident, build) if member is not None else build(NullProgress())


@runtime_checkable
class Method(Protocol):
    """A generative method. See docs/design.md, "The method contract".

    `generator` is always a CPU torch.Generator seeded by the harness; a method that needs random
    numbers on an accelerator seeds a device generator from it (and checkpoints both states).

    A method may declare `version: ClassVar[int]` (built-ins must): it is part of every run key, so bumping it
    when a change alters the method's results makes the harness recompute instead of reusing old cells. A
    plugin's run keys also hash its source file (bench.grid.registry.method_version)."""

    name: ClassVar[str]  # registry key, lowercase-kebab
    Config: ClassVar[type]  # frozen keyword-only dataclass: the single source of defaults
    conditional: ClassVar[bool]  # samples carry requested labels
    guarantee: ClassVar[Guarantee]  # declared guarantee; the ledger may only weaken it
    needs_public_data: ClassVar[bool]

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None: ...

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger: ...

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """Return uint8 [n, C, H, W]; `labels` int64 [n] for a conditional method, else None."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # Optional members (the harness checks for them with getattr):
    # - Progress.shared(name, ident, build): see shared_stage (a stage several runs share, built once).
    # - released_model() -> nn.Module: the model a user would publish (its parameter count goes in the cost table).
    # - classmethod work(config, num_records, budget) -> {stage: units}: the units of work of each stage of a fit with
    #   `config` on `num_records` records, in order: each stage is one `progress.start(units)` of `fit`, its units the
    #   `advance()` calls that follow. `bench paper --estimate` multiplies them by measured seconds per unit
    #   (bench.estimate); tests/test_gpucheck.py checks them against a real fit. A method without it is not estimated.
    # - membership_scores(images, labels, *, generator) -> Tensor [m]: `bench audit`'s white-box score of each
    #   image (higher = more likely a training record), computed from the released model only, with every random
    #   draw from `generator` and shared by all images (bench.diffusion.ConditionalDenoiser: minus the denoising
    #   loss). A method without it is audited black-box (nearest generated sample) only.


def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """The contract's CPU `generator` itself on the CPU; elsewhere a generator on `device` seeded from it
    (one draw), so that a run's random numbers on an accelerator still follow from the run's seed."""
    if torch.device(device).type == generator.device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device).manual_seed(seed)


def config_fields(config_cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(config_cls)}
