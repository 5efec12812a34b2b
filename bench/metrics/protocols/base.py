"""What every downstream-classification protocol shares: its description, its settings and the record it writes.

A protocol reproduces ONE reference script (its module cites repository@commit:path and lists every
deviation). Its `Settings` dataclass has one field per knob the reference fixes (epochs, batch size,
learning rate, number of synthetic samples, ...); every field defaults to None, which means "the
reference's value for this dataset" (`reference_settings`). A profile may set a field to something else
to save time: the record then says `shortened` with each changed field as [reference, used], and
`bench paper` marks it. Using fewer synthetic samples than the reference because the run generated fewer
is a shortening too.

`fit_torch` is the epoch loop both torch protocols share: train, score, keep the first best epoch, as
nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:train_downstream_classifiers.py `train_model`
(`if acc > best_acc`) and Keras's `max(val_acc)` in AI-secure/DataLens@72d0f2fe89aeee2e5a043c17b3de09e0023f94a6
evaluation/train-classifier-fmnist.py.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.metrics.features import train_epoch

Record = dict[str, Any]
CHANNELS_LAST = torch.channels_last


@dataclass(frozen=True)
class Context:
    """What a run knows beyond the samples and the test split, for a protocol that needs it (None: not known).

    real_train: the real training split the generator was trained on (a protocol that selects on real
    validation records carves them out of it, as dpimagebench's `val` mode does); epsilon: the run's target ε
    (math.inf for a non-private run), which dpimagebench's `val` mode uses as the scale 1/ε of its Laplace noise.
    """

    real_train: ImageDataset | None = None
    epsilon: float | None = None


NO_CONTEXT = Context()


class Protocol(ABC):
    """A downstream protocol: train each of its classifiers on labelled synthetic images, test on real ones."""

    name: ClassVar[str]  # registry key, used in metrics.json and published_results.csv ("dpdm", "datalens", ...)
    version: ClassVar[int]  # bump when a result of the protocol changes (part of every cache key)
    reference: ClassVar[str]  # repository@commit:path of the script it reproduces
    title: ClassVar[str]  # one line for `bench list`
    test_selected: ClassVar[bool]  # True when the real test set selects what is reported (marked ‡)
    selection: ClassVar[str]  # how the reported epoch (or model) is chosen
    reported: ClassVar[str]  # what the value is
    metrics: ClassVar[dict[str, str]]  # classifier -> our metric name
    published: ClassVar[dict[str, str]]  # published metric name (papers.toml vocabulary) -> our metric name
    deviations: ClassVar[tuple[str, ...]]  # from the reference, always true (dataset-specific ones are added)
    Settings: ClassVar[type]  # frozen dataclass; every field None = the reference's value

    @abstractmethod
    def reference_settings(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        """The reference script's value of every Settings field for this dataset."""

    @abstractmethod
    def run(
        self,
        classifiers: list[str],
        train: ImageDataset,
        test: ImageDataset,
        *,
        settings: dict[str, Any],
        seed: int,
        device: torch.device,
        context: Context = NO_CONTEXT,
    ) -> dict[str, Record]:
        """Records (value and how it was obtained) per classifier, with `settings` fully resolved; `context`
        carries what the run knows beyond the samples and the test split (most protocols use none of it)."""

    def check_resources(
        self, classifiers: list[str], shape: tuple[int, int, int], num_classes: int, *, settings: dict[str, Any],
        device: torch.device,
    ) -> None:  # fmt: skip
        """BenchError when these classifiers cannot train on `device` (e.g. a step that does not fit in its memory);
        the runner asks before a fit, so that a run is not trained for hours and then refused at scoring. The
        default: every protocol's classifiers train anywhere."""
        return None

    def dataset_deviations(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> list[str]:
        """Deviations that hold for this dataset only (e.g. a dataset the reference script never ran on)."""
        return []

    def settings_of(self, classifier: str) -> set[str] | None:
        """The Settings fields that change this classifier's result (None: all of them)."""
        return None

    def parameters(self, classifier: str, shape: tuple[int, int, int], num_classes: int) -> int | None:
        """Trainable parameters of the classifier on this data shape (None: not a parametric model)."""
        return None


def check_positive(settings: Any, *names: str) -> None:
    """Settings.__post_init__: every named field that is set (not None) must be > 0 (ValueError naming it)."""
    for name in names:
        v = getattr(settings, name)
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def resolve_settings(
    protocol: Protocol, overrides: Any, *, dataset: str, shape: tuple[int, int, int], num_classes: int
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The settings a run uses (reference values, then the profile's overrides) and what was shortened."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - as the record's JSON will hold it
    reference = {k: plain(v) for k, v in protocol.reference_settings(dataset, shape, num_classes).items()}
    given = {k: plain(v) for k, v in dataclasses.asdict(overrides).items() if v is not None}
    resolved = reference | given
    shortened = {k: [reference[k], v] for k, v in given.items() if v != reference[k]}
    return resolved, shortened


def take_samples(
    train: ImageDataset, counts: dict[str, int]
) -> tuple[list[ImageDataset], dict[str, int], dict[str, list[int]]]:
    """Consecutive parts of `train` of the sizes in `counts` (e.g. {"n_train": 60000, "n_eval": 10000}).

    With fewer records than the parts need, every part shrinks in proportion (each keeps at least one
    record) and the change is returned as a shortening ({name: [asked, used]}); with more, the first
    records are used. Generated samples are stored in generation order, so a part of consecutive samples
    is a sample of the generator like any other.
    """
    need, n = sum(counts.values()), len(train)
    if n >= need:
        used = dict(counts)
    else:
        if n < len(counts):
            raise BenchError(f"downstream classifiers need at least {len(counts)} labelled samples, got {n}")
        used = {k: max(1, round(n * v / need)) for k, v in counts.items()}
        first = next(iter(used))
        used[first] = n - sum(v for k, v in used.items() if k != first)
    parts, start = [], 0
    for k in counts:
        parts.append(train.subset(torch.arange(start, start + used[k])))
        start += used[k]
    shortened = {k: [counts[k], used[k]] for k in counts if used[k] != counts[k]}
    return parts, used, shortened


def record(
    protocol: Protocol,
    classifier: str,
    *,
    value: float | None,  # None: the classifier did not run (its record's `note` says why)
    per_class: list[float | None],
    seed: int,
    seconds: float,
    **fields: Any,
) -> Record:
    """The record of one classifier: the value, the protocol and reference, and what the protocol reports."""
    return {
        "value": value,
        "protocol": protocol.name,
        "protocol_version": protocol.version,
        "reference_code": protocol.reference,
        "classifier": classifier,
        "test_selected": protocol.test_selected,
        "selection": protocol.selection,
        "reported": protocol.reported,
        "per_class": per_class,
        "classifier_seed": seed,
        **fields,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------
# Torch classifiers: the training loop both torch protocols use


def fit_torch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: ImageDataset,
    *,
    epochs: int,
    batch_size: int,
    shuffle: torch.Generator | None,
    prepare: Callable[[Tensor], Tensor],
    score: Callable[[nn.Module], float],
    keep_best_state: bool,
) -> tuple[list[float], int, dict[str, Tensor] | None]:
    """Train for `epochs`; after each, `score` the model (a fraction). Returns the curve (in %), the first
    epoch (1-based) with the best score and, with `keep_best_state`, that epoch's weights."""
    curve: list[float] = []
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, epochs + 1):
        train_epoch(model, train.images, train.labels, optimizer, batch_size=batch_size, generator=shuffle,
                    prepare=prepare)  # fmt: skip
        s = score(model)
        curve.append(100.0 * s)
        if s > best:  # strictly better: the earliest epoch wins a tie, as `acc > best_acc` in the references
            best, best_epoch = s, epoch
            if keep_best_state:
                best_state = copy.deepcopy(model.state_dict())
    return curve, best_epoch, best_state


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, prepare: Callable[[Tensor], Tensor], *, batch_size: int = 512) -> Tensor:
    """int64 [N] predicted classes (on the CPU) of uint8 `images` [N, C, H, W], in evaluation mode."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(prepare(x.to(device))).argmax(1).cpu() for x in images.split(batch_size)])


def scorer(data: ImageDataset, prepare: Callable[[Tensor], Tensor]) -> Callable[[nn.Module], float]:
    """A `score` for fit_torch: the model's accuracy (a fraction) on `data`."""
    return lambda model: accuracy(predict(model, data.images, prepare), data.labels)


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return int((pred == labels).sum()) / len(labels) if len(labels) else 0.0


def per_class(pred: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Accuracy (%) per class of `labels`; None for a class absent from them."""
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    count = torch.bincount(labels, minlength=num_classes)
    return [100.0 * int(c) / int(k) if k else None for c, k in zip(correct, count, strict=True)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The block's torch RNG (initialisation, dropout) seeded by `seed`; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def names_of(protocol: Protocol, classifiers: Collection[str]) -> list[str]:
    unknown = [c for c in classifiers if c not in protocol.metrics]
    if unknown:
        raise BenchError(
            f"protocol {protocol.name} has no classifier {unknown[0]!r}; it has {', '.join(protocol.metrics)}"
        )
    return list(dict.fromkeys(classifiers))
