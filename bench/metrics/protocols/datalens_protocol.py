"""The DataLens downstream protocol (Wang et al., CCS 2021), which DPGEN and DP-SAD's accuracy tables follow.

Reproduces AI-secure/DataLens@72d0f2fe89aeee2e5a043c17b3de09e0023f94a6:evaluation/train-classifier-fmnist.py
(train-classifier-mnist.py is the same script for MNIST; train-classifier-celebA.py and -hair.py are the
CelebA variants whose settings are used for the celeba datasets), with the samples main.py writes
(100,000 rows of `gen_data`, model.py: generator outputs in [0, 1] and uniform random one-hot labels).

What the reference does, read from the code (Keras):

- CNN: Conv2D(32, 3, relu) → MaxPooling2D(2) → Dropout(.2) → Conv2D(64, 3, relu) → Dropout(.25) →
  Flatten → Dense(64, relu) → Dense(classes, softmax); "valid" convolutions; Keras's default
  initialisation (Glorot uniform weights, zero biases). 515,146 parameters on 1×28×28. The CelebA scripts
  build the same model with input_shape (64, 64, 3): Keras infers the Dense layer's input from the shape,
  64·29·29 = 53,824. Ours infers it the same way on every shape, 64·(⌊(H − 2)/2⌋ − 2)·(⌊(W − 2)/2⌋ − 2)
  (derived for 3×32×32, which no reference script trains on: 64·13·13 = 10,816).
- Categorical cross-entropy; SGD without momentum: lr 2e-3, batch 512, 600 epochs (MNIST/FMNIST);
  lr 1e-4, batch 256, 250 epochs (CelebA gender and hair, 64×64×3); Keras reshuffles every epoch.
- Data: 100,000 synthetic rows; the real test set / 255 ([0, 1]) is the `validation_data` of `fit`.
- Reported: `max(val_acc)`, the best real test accuracy over all epochs. The real test set selects the
  epoch: TEST-SELECTED, optimistic, and not private (the test set is real data). We run it only to set
  numbers beside the tables that used it, and mark it ‡ wherever it is shown.

Deviations (recorded in every record's `deviations`):

- Samples are uint8 as each method releases them ( / 255 → [0, 1]); the reference trains on the
  generator's float outputs.
- Labels balanced (index mod classes) in generation order; reference: uniform random labels.
- Cross-entropy on logits in float32; Keras clips the softmax to [1e-7, 1 − 1e-7] before the log.
- PyTorch's layout: the flattened features are in C·H·W order, not Keras's H·W·C (a fixed permutation of
  the inputs of an i.i.d.-initialised dense layer: the same model).
- train-classifier-fmnist.py's `--range` defaults to 1 (one pickle of the ten main.py's README
  describes) and zero-fills the rest of its 100,000-row buffer; we train on 100,000 samples, as the MNIST
  script (default `--range 10`) does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.metrics.protocols import base

REFERENCE = "AI-secure/DataLens@72d0f2fe89aeee2e5a043c17b3de09e0023f94a6:evaluation/train-classifier-fmnist.py"
DIGITS = {"lr": 2e-3, "batch_size": 512, "epochs": 600, "n_train": 100_000}  # train-classifier-{mnist,fmnist}.py
CELEBA = {"lr": 1e-4, "batch_size": 256, "epochs": 250, "n_train": 100_000}  # train-classifier-{celebA,hair}.py


@dataclass(frozen=True, kw_only=True)
class Settings:
    """None: the reference's value for the dataset (MNIST/FMNIST; CelebA in brackets after it)."""

    epochs: int | None = None  # [600; 250]
    batch_size: int | None = None  # [512; 256]
    lr: float | None = None  # [2e-3; 1e-4] SGD, no momentum
    n_train: int | None = None  # [100000] synthetic samples

    def __post_init__(self) -> None:
        base.check_positive(self, "epochs", "batch_size", "lr", "n_train")


class DataLensCNN(nn.Module):
    """The Keras model of the reference, with Keras's initialisation."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        fh, fw = (h - 2) // 2 - 2, (w - 2) // 2 - 2
        if fh < 1 or fw < 1:
            raise BenchError(f"the DataLens CNN needs images of at least 8×8, got {h}×{w}")
        self.conv1 = nn.Conv2d(c, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.drop1 = nn.Dropout(0.2)
        self.drop2 = nn.Dropout(0.25)
        self.dense = nn.Linear(64 * fh * fw, 64)
        self.output = nn.Linear(64, num_classes)
        for layer in (self.conv1, self.conv2, self.dense, self.output):
            nn.init.xavier_uniform_(layer.weight)  # Keras glorot_uniform: the same fan-in/fan-out limits
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(F.max_pool2d(F.relu(self.conv1(x)), 2))
        x = self.drop2(F.relu(self.conv2(x))).flatten(1)
        return self.output(F.relu(self.dense(x)))  # logits; the softmax is in the loss


def prepare(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] → float [0, 1] (x / 255), channels-last."""
    return (images.float() / 255.0).contiguous(memory_format=base.CHANNELS_LAST)


def _celeba(dataset: str) -> bool:
    return dataset.startswith("celeba")


class DataLensProtocol(base.Protocol):
    name = "datalens"
    version = 1
    reference = REFERENCE
    title = "DataLens's script: Keras CNN, SGD 2e-3, batch 512, 600 epochs, 100k samples; best test accuracy (‡)"
    test_selected = True
    selection = "the epoch with the best real test accuracy (the test set selects: optimistic, marked ‡)"
    reported = "best real test accuracy (%) over all epochs"
    metrics = {"cnn": "acc_cnn_datalens"}
    published = {"acc_cnn": "acc_cnn_datalens"}
    deviations = (
        "uint8 samples as the method quantises them; reference: the generator's float outputs",
        "labels balanced (index mod classes) in generation order; reference: uniform random labels",
        "cross-entropy on logits; Keras clips probabilities to [1e-7, 1-1e-7]",
    )
    Settings = Settings

    def reference_settings(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        return dict(CELEBA if _celeba(dataset) else DIGITS)

    def dataset_deviations(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> list[str]:
        if dataset in ("mnist", "fmnist") or _celeba(dataset):
            return []
        return [f"the reference scripts run on MNIST, FMNIST and CelebA; applied to {dataset} with the MNIST settings"]

    def parameters(self, classifier: str, shape: tuple[int, int, int], num_classes: int) -> int:
        return base.count_parameters(DataLensCNN(shape, num_classes))

    def run(
        self,
        classifiers: list[str],
        train: ImageDataset,
        test: ImageDataset,
        *,
        settings: dict[str, Any],
        seed: int,
        device: torch.device,
        context: base.Context = base.NO_CONTEXT,  # unused: the samples and the test split are all it needs
    ) -> dict[str, base.Record]:
        (fit,), used, shortened = base.take_samples(train, {"n_train": settings["n_train"]})
        shape = (int(train.images.shape[1]), int(train.images.shape[2]), int(train.images.shape[3]))
        t0 = time.perf_counter()
        shuffle = torch.Generator().manual_seed(seed)  # Keras's per-epoch shuffle
        best: dict[str, Any] = {"acc": -1.0, "pred": None}

        def score(model: nn.Module) -> float:  # Keras's val_acc after every epoch
            pred = base.predict(model, test.images, prepare)
            acc = base.accuracy(pred, test.labels)
            if acc > best["acc"]:
                best.update(acc=acc, pred=pred)
            return acc

        with base.seeded(seed, device):  # initialisation and dropout
            model = DataLensCNN(shape, test.num_classes).to(device).to(memory_format=base.CHANNELS_LAST)
            optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
            curve, epoch, _ = base.fit_torch(
                model, optimizer, fit, epochs=settings["epochs"], batch_size=settings["batch_size"],
                shuffle=shuffle, prepare=prepare, score=score, keep_best_state=False,
            )  # fmt: skip
        pred = best["pred"]
        return {
            name: base.record(
                self,
                name,
                value=100.0 * base.accuracy(pred, test.labels),
                per_class=base.per_class(pred, test.labels, test.num_classes),
                seed=seed,
                seconds=time.perf_counter() - t0,
                selected_epoch=epoch,
                curve=curve,
                parameters=base.count_parameters(model),
                optimizer=f"SGD(lr={settings['lr']:g}, momentum=0)",
                epochs=settings["epochs"],
                batch_size=settings["batch_size"],
                n_train=used["n_train"],
                n_eval=0,
                n_test=len(test),
                shortened=shortened,
            )  # fmt: skip
            for name in classifiers
        }


PROTOCOL = DataLensProtocol()
