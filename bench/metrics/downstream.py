"""Downstream classification utility: train classifiers on synthetic labelled images, test on real data.

Two protocols (see EVALUATION.md, "Utility"):

- "dpdm" (Dockhorn et al., "Differentially Private Diffusion Models", 2023), used by "logreg", "mlp" and
  "cnn": a fraction of the *synthetic* data is held out; after every epoch the classifier is scored on
  that held-out part, the epoch with the best held-out accuracy (earliest on ties) is selected, and only
  that epoch's weights are scored on the real test split, once. No private data is used for selection.
- "datalens" (DataLens, Wang et al. 2021; DPGEN, Chen et al. 2022), used by "cnn_datalens": train on all
  the synthetic data, score on the real test split after every epoch and report the best. It selects
  on the test set, so its records carry `test_selected: True` and say so in their note.

Classifiers (inputs: uint8 pixels scaled to [-1, 1] with fixed constants):

- "logreg": one linear layer on the flattened pixels (multinomial logistic regression), Adam 3e-4.
- "mlp": flatten → dense 128 → ReLU → dense 128 → ReLU → dense classes, Adam 3e-4.
- "cnn": features.SmallCNN (the domain extractor's architecture, freshly initialised), Adam 3e-4.
- "cnn_datalens": conv 32 3×3 → ReLU → maxpool 2 → dropout .2 → conv 64 3×3 → ReLU → dropout .25 →
  dense 64 → ReLU → dense classes ("valid" convolutions, as in Keras), SGD lr 0.01 momentum 0.9. The
  papers do not state the optimiser settings; these are our assumption.

Every classifier's result depends only on its name, the data and `seed` (initialisation, validation
split, minibatch order and dropout all come from `seed`; the global RNG is left untouched), not on which
other classifiers are requested.

`real_reference` gives the same classifiers trained on the real training set (the "real data" row),
cached on disk per classifier under $BENCH_CACHE/downstream.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import ImageDataset
from bench.data import cache_root
from bench.errors import BenchError
from bench.metrics.features import SmallCNN, fingerprint, to_input, train_epoch

VERSION = 1  # bump when a classifier, its training or a protocol changes: invalidates real_reference caches
CLASSIFIER_SEED_STRIDE = 100_003  # classifier seed j of a run: run seed + j · stride (j = 0: the run seed)
DPDM_LR = 3e-4
DATALENS_LR = 0.01
DATALENS_MOMENTUM = 0.9
DATALENS_NOTE = "test-selected (DataLens/DPGEN protocol)"
CHANNELS_LAST = torch.channels_last


class LogReg(nn.Module):
    """Multinomial logistic regression on flattened pixels."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        self.linear = nn.Linear(c * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """flatten → dense 128 → ReLU → dense 128 → ReLU → dense classes."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DataLensCNN(nn.Module):
    """The DataLens/DPGEN evaluation CNN: conv32 3×3 → maxpool → dropout .2 → conv64 3×3 → dropout .25 →
    dense 64 → dense classes, ReLU activations, no padding. Inputs of at least 8×8."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        self.conv1 = nn.Conv2d(c, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.drop1 = nn.Dropout(0.2)
        self.drop2 = nn.Dropout(0.25)
        fh, fw = (h - 2) // 2 - 2, (w - 2) // 2 - 2
        if fh < 1 or fw < 1:
            raise BenchError(f"cnn_datalens needs images of at least 8×8, got {h}×{w}")
        self.fc = nn.Linear(64 * fh * fw, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(F.relu(F.max_pool2d(self.conv1(x), 2)))  # = maxpool(relu(.)), cheaper
        x = self.drop2(F.relu(self.conv2(x))).flatten(1)
        return self.head(F.relu(self.fc(x)))


def _small_cnn(shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return SmallCNN(shape[0], num_classes)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=DPDM_LR)


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=DATALENS_LR, momentum=DATALENS_MOMENTUM)


# name -> (architecture, optimizer, protocol)
CLASSIFIERS: dict[str, tuple[Callable[[tuple[int, int, int], int], nn.Module], Callable[[Any], Any], str]] = {
    "logreg": (LogReg, _adam, "dpdm"),
    "mlp": (MLP, _adam, "dpdm"),
    "cnn": (_small_cnn, _adam, "dpdm"),
    "cnn_datalens": (DataLensCNN, _sgd, "datalens"),
}
DEFAULT_CLASSIFIERS = tuple(CLASSIFIERS)


def downstream_accuracy(
    images: Tensor,
    labels: Tensor,
    test: ImageDataset,
    *,
    seed: int,
    classifiers: Collection[str] = DEFAULT_CLASSIFIERS,
    epochs: int,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Train each classifier on uint8 `images` [N, C, H, W] with int64 `labels` [N]; score on real `test`.

    Returns {"acc_<name>": record} in the order of `classifiers`; a record has value (real test accuracy
    in %), protocol, test_selected, selected_epoch (1-based), per_class (% per class on `test`, None for a
    class absent from it), curve (per epoch: held-out accuracy for "dpdm", test accuracy for "datalens"),
    classifier_seed, epochs, n_train, n_val, n_test, seconds, selection and note.
    """
    names = _check_classifiers(classifiers)
    _check_inputs(images, labels, test, epochs=epochs, batch_size=batch_size, val_fraction=val_fraction)
    return {
        f"acc_{name}": _fit_one(
            name,
            images,
            labels,
            test,
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            val_fraction=val_fraction,
            device=torch.device(device),
        )
        for name in names
    }


def real_reference(
    train: ImageDataset,
    test: ImageDataset,
    *,
    dataset: str,
    seed: int,
    classifiers: Collection[str] = DEFAULT_CLASSIFIERS,
    epochs: int,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """`downstream_accuracy` of the classifiers trained on the real `train` split: the "real data" row.

    Each classifier's record is cached as JSON in $BENCH_CACHE/downstream, keyed by dataset, the train
    and test fingerprints, classifier, epochs, batch size, validation fraction, seed and VERSION; a cached
    record is returned as it was stored (with the seconds its training took).
    """
    names = _check_classifiers(classifiers)
    _check_inputs(train.images, train.labels, test, epochs=epochs, batch_size=batch_size, val_fraction=val_fraction)
    data_key = f"{dataset}-{fingerprint(train)}-{fingerprint(test)}"
    folder = cache_root() / "downstream"
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        path = folder / f"{data_key}-{name}-e{epochs}-b{batch_size}-vf{val_fraction:g}-s{seed}-v{VERSION}.json"
        record = _load(path)
        if record is None:
            record = _fit_one(
                name,
                train.images,
                train.labels,
                test,
                seed=seed,
                epochs=epochs,
                batch_size=batch_size,
                val_fraction=val_fraction,
                device=torch.device(device),
            )
            record["reference"] = "real train"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        results[f"acc_{name}"] = record
    return results


def classifier_seeds(run_seed: int, count: int) -> list[int]:
    """The classifier seeds of a run: its own seed first, then `count` - 1 more derived from it."""
    if count < 1:
        raise BenchError(f"classifier_seeds must be >= 1, got {count}")
    return [run_seed + CLASSIFIER_SEED_STRIDE * j for j in range(count)]


def over_seeds(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One record per classifier from its records under several classifier seeds (same classifiers each).

    value: the mean; per_seed: the values, in seed order (the report's mean ± std counts each one);
    per_class: the mean per class; curve and selected_epoch: lists, one entry per seed; seconds: the sum.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, first in per_seed[0].items():
        records = [r[name] for r in per_seed]
        values = [r["value"] for r in records]
        classes = zip(*(r["per_class"] for r in records), strict=True)
        out[name] = first | {
            "value": sum(values) / len(values),
            "per_seed": values,
            "classifier_seeds": [r["classifier_seed"] for r in records],
            "per_class": [None if None in c else sum(c) / len(c) for c in classes],
            "selected_epoch": [r["selected_epoch"] for r in records],
            "curve": [r["curve"] for r in records],
            "seconds": sum(r["seconds"] for r in records),
        }
        del out[name]["classifier_seed"]
    return out


def _load(path: Any) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: recompute and overwrite
        return None
    return record if isinstance(record, dict) and "value" in record else None


# ---------------------------------------------------------------------------------------------------


def _check_classifiers(classifiers: Collection[str]) -> list[str]:
    if isinstance(classifiers, str):
        classifiers = [classifiers]
    names = list(dict.fromkeys(classifiers))
    unknown = [n for n in names if n not in CLASSIFIERS]
    if unknown or not names:
        raise BenchError(
            f"unknown downstream classifier(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"valid: {', '.join(CLASSIFIERS)}"
        )
    return names


def _check_inputs(
    images: Tensor, labels: Tensor, test: ImageDataset, *, epochs: int, batch_size: int, val_fraction: float
) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise BenchError(f"downstream images must be uint8 [N, C, H, W], got {got}")
    if tuple(images.shape[1:]) != tuple(test.images.shape[1:]):
        raise BenchError(
            f"downstream images are {tuple(images.shape[1:])} but the test split is {tuple(test.images.shape[1:])}"
        )
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        got = str(labels.dtype) if isinstance(labels, Tensor) else type(labels).__name__
        raise BenchError(f"downstream labels must be an int64 tensor, got {got}")
    n = len(images)
    if tuple(labels.shape) != (n,):
        raise BenchError(f"downstream labels must be [N] = [{n}] like the images, got {tuple(labels.shape)}")
    if n < 2:
        raise BenchError(f"downstream classifiers need at least 2 labelled samples, got {n}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= test.num_classes:
        raise BenchError(f"downstream labels must be in 0..{test.num_classes - 1}, got {lo}..{hi}")
    if epochs < 1 or batch_size < 1:
        raise BenchError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not 0.0 < val_fraction < 1.0:
        raise BenchError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _fit_one(
    name: str,
    images: Tensor,
    labels: Tensor,
    test: ImageDataset,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    val_fraction: float,
    device: torch.device,
) -> dict[str, Any]:
    """Train classifier `name` under its protocol and return its record (inputs already checked)."""
    t0 = time.perf_counter()
    arch, make_optimizer, protocol = CLASSIFIERS[name]
    n = len(images)
    generator = torch.Generator().manual_seed(seed)  # validation split and minibatch order
    if protocol == "dpdm":
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        perm = torch.randperm(n, generator=generator)
        val, fit = perm[:n_val], perm[n_val:]
        fit_x, fit_y, val_x, val_y = images[fit], labels[fit], images[val], labels[val]
    else:  # datalens: all the data for training, the test split for selection
        n_val = 0
        fit_x, fit_y = images, labels
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # initialisation and dropout; the caller's RNG state is restored on exit
        shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
        model = arch(shape, test.num_classes).to(device).to(memory_format=CHANNELS_LAST)  # type: ignore[call-overload]
        optimizer = make_optimizer(model.parameters())
        best, best_epoch, best_state, best_pred = -1.0, 0, None, None
        curve: list[float] = []
        for epoch in range(1, epochs + 1):
            train_epoch(
                model, fit_x, fit_y, optimizer, batch_size=batch_size, generator=generator, prepare=_channels_last
            )
            if protocol == "dpdm":
                score = _accuracy(_predict(model, val_x), val_y)
            else:
                pred = _predict(model, test.images)
                score = _accuracy(pred, test.labels)
            curve.append(100.0 * score)
            if score > best:
                best, best_epoch = score, epoch
                if protocol == "dpdm":
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    best_pred = pred
    if protocol == "dpdm":
        assert best_state is not None
        model.load_state_dict(best_state)
        best_pred = _predict(model, test.images)  # the test split is looked at once, after selection
    assert best_pred is not None
    per_class = _per_class(best_pred, test.labels, test.num_classes)
    return {
        "value": 100.0 * _accuracy(best_pred, test.labels),
        "protocol": protocol,
        "test_selected": protocol == "datalens",
        "selected_epoch": best_epoch,
        "per_class": per_class,
        "curve": curve,
        "classifier": name,
        "classifier_seed": seed,
        "epochs": epochs,
        "n_train": len(fit_x),
        "n_val": n_val,
        "n_test": len(test),
        "seconds": time.perf_counter() - t0,
        "selection": "held-out part of the training data" if protocol == "dpdm" else "best test accuracy",
        "note": "" if protocol == "dpdm" else DATALENS_NOTE,
    }


@torch.inference_mode()
def _predict(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """int64 [N] predicted classes (on the CPU) of uint8 `images` [N, C, H, W]."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(_to_input(x, device)).argmax(1).cpu() for x in images.split(batch_size)])


def _channels_last(images: Tensor) -> Tensor:
    """features.to_input, channels-last: CPU convolutions and pooling run about 3× faster in that layout."""
    return to_input(images).contiguous(memory_format=CHANNELS_LAST)


def _to_input(images: Tensor, device: torch.device) -> Tensor:
    return _channels_last(images.to(device))


def _accuracy(pred: Tensor, labels: Tensor) -> float:
    return int((pred == labels).sum()) / len(labels) if len(labels) else 0.0


def _per_class(pred: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    count = torch.bincount(labels, minlength=num_classes)
    return [100.0 * int(c) / int(k) if k else None for c, k in zip(correct, count, strict=True)]
