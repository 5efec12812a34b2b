"""The DPDM downstream protocol (Dockhorn, Cao, Vahdat, Kreis, TMLR 2023, Table 1 "Acc (%)").

Reproduces nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:train_downstream_classifiers.py, with
the sample folders it reads as utils/util.py (FolderDataset) and runners/generate_base.py write them.

What the reference does, read from the code:

- Classifiers: LogReg = Linear(784, 10); MLP = Linear(784, 100) → ReLU → Linear(100, 10); CNN =
  Conv(1, 32, 3) → MaxPool(2) → ReLU → Dropout(.5) → Conv(32, 64, 3) → MaxPool(2) → ReLU → Dropout(.5) →
  Conv(64, 128, 3) → ReLU → Flatten → Linear(1152, 128) → ReLU → Dropout(.5) → Linear(128, 10); PyTorch's
  default initialisation; cross-entropy (LogReg and MLP as log-softmax + NLL, the same loss).
  7,850 / 79,510 / 241,546 parameters on 1×28×28.
- Inputs: the uint8 sample PNGs / 255 · 2 − 1, real MNIST/FMNIST through ToTensor() · 2 − 1: [−1, 1].
- Adam(lr = 3e-4, default betas), batch 128 (`--batch_size`), 50 epochs (`max_epochs`).
- The training folder is read WITHOUT shuffling (DataLoader's default): every epoch visits the samples in
  the order they were written.
- After every epoch: accuracy on a second folder of generated samples (`--eval_path`); when it is
  strictly better than at every earlier epoch, the real test accuracy at that epoch is kept. The last
  kept test accuracy is reported. No real data selects anything.
- Sample counts: the script takes what the two folders hold. The paper's tables use 60,000 generated
  training samples (as DP-Sinkhorn, whose authors overlap); the size of the evaluation folder is stated
  neither in the code nor in the tables: 10,000 is our choice.
- Labels of the samples: uniform at random (generate_base.py: `torch.randint(n_classes, ...)`).

Deviations (recorded in every record's `deviations`):

- Labels are balanced (label = index mod classes) in generation order, not uniform at random: the harness
  draws one labelled sample set for every metric of a run.
- Samples are uint8 as each method releases them (bench's methods round (x + 1) · 127.5; the reference
  truncates clip(x / 2 + .5) · 255).
- The training and evaluation sets are consecutive parts of one generated set, not two sampling runs of
  the same model: the same distribution.
- The test split is predicted once, with the selected epoch's weights kept in memory, instead of at every
  improvement: the same value.
- Channels-last memory layout (faster CPU convolutions): the same maths, other float rounding.
- On shapes other than 1×28×28 the sizes are derived, not copied: the script accepts MNIST and FMNIST only
  and DPDM's cifar10_32/celeba_32/celeba_64 configs train no classifier. LogReg and MLP take the C·H·W
  pixels; the CNN's first convolution takes C channels and its dense layer the flattened output of its
  layers, 128 maps of side ⌊(⌊(H − 2)/2⌋ − 2)/2⌋ − 2 (Conv(3) → MaxPool(2) → Conv(3) → MaxPool(2) → Conv(3)):
  1152 (3×3) on 28×28, 2048 (4×4) on 3×32×32, 18,432 (12×12) on 3×64×64. An image smaller than 22×22,
  too small for three valid convolutions and two poolings, is padded with black (−1) to 22×22.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import ImageDataset
from bench.metrics.protocols import base

REFERENCE = "nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:train_downstream_classifiers.py"
MIN_SIDE = 22  # 22 → 20 → 10 → 8 → 4 → 2: the smallest side the CNN's valid convolutions and poolings take


@dataclass(frozen=True, kw_only=True)
class Settings:
    """None: the reference's value (in brackets)."""

    epochs: int | None = None  # [50] max_epochs
    batch_size: int | None = None  # [128] --batch_size
    lr: float | None = None  # [3e-4] Adam
    n_train: int | None = None  # [60000] generated training samples
    n_eval: int | None = None  # [10000] generated samples that select the epoch (size: our choice)

    def __post_init__(self) -> None:
        base.check_positive(self, "epochs", "batch_size", "lr", "n_train", "n_eval")


class LogReg(nn.Module):
    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        self.net = nn.Linear(c * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(nn.Linear(c * h * w, 100), nn.ReLU(), nn.Linear(100, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        # derived from the layers (the reference hard-codes 1152 for 1×28×28): conv 3, pool 2, conv 3, pool 2, conv 3
        fh, fw = (_side(h) - 2) // 2, (_side(w) - 2) // 2
        fh, fw = (fh - 2) // 2 - 2, (fw - 2) // 2 - 2
        self.model = nn.Sequential(
            nn.Conv2d(c, 32, 3, 1),
            nn.MaxPool2d(2, 2),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(32, 64, 3, 1),
            nn.MaxPool2d(2, 2),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(64, 128, 3, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * fh * fw, 128),  # 1152 on 28×28
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"logreg": LogReg, "mlp": MLP, "cnn": CNN}


def _side(n: int) -> int:
    return max(n, MIN_SIDE)


def prepare(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] → float [−1, 1] (x / 255 · 2 − 1), channels-last."""
    return (images.float() / 255.0 * 2.0 - 1.0).contiguous(memory_format=base.CHANNELS_LAST)


def prepare_cnn(images: Tensor) -> Tensor:
    """`prepare`, then padded with −1 (black) to at least 22×22."""
    x = prepare(images)
    h, w = x.shape[-2:]
    if h < MIN_SIDE or w < MIN_SIDE:
        dh, dw = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=-1.0)
    return x.contiguous(memory_format=base.CHANNELS_LAST)


PREPARE = {"logreg": prepare, "mlp": prepare, "cnn": prepare_cnn}


class DPDMProtocol(base.Protocol):
    name = "dpdm"
    version = 1
    reference = REFERENCE
    title = (
        "DPDM's script: LogReg, MLP 784-100-10, CNN 32/64/128; Adam 3e-4, 50 epochs, batch 128; "
        "epoch chosen on generated samples"
    )
    test_selected = False
    selection = "the epoch with the best accuracy on a separate set of generated samples (earliest on ties)"
    reported = "real test accuracy (%) at the selected epoch"
    metrics = {"logreg": "acc_logreg", "mlp": "acc_mlp", "cnn": "acc_cnn"}
    published = {"acc_logreg": "acc_logreg", "acc_mlp": "acc_mlp", "acc_cnn": "acc_cnn"}
    deviations = (
        "labels balanced (index mod classes) in generation order; reference: uniform random labels",
        "uint8 samples as the method quantises them; reference: truncation of x·255",
        "training and evaluation sets are consecutive parts of one generated set",
    )
    Settings = Settings

    def reference_settings(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        return {"epochs": 50, "batch_size": 128, "lr": 3e-4, "n_train": 60_000, "n_eval": 10_000}

    def dataset_deviations(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> list[str]:
        out = []
        if dataset not in ("mnist", "fmnist"):
            out.append(f"the reference script runs on MNIST and FMNIST only; applied to {dataset}")
        if min(shape[1:]) < MIN_SIDE:
            out.append(f"{shape[1]}×{shape[2]} images padded with black to at least {MIN_SIDE}×{MIN_SIDE} for the CNN")
        return out

    def parameters(self, classifier: str, shape: tuple[int, int, int], num_classes: int) -> int:
        return base.count_parameters(ARCHITECTURES[classifier](shape, num_classes))

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
        (fit, select), used, shortened = base.take_samples(
            train, {"n_train": settings["n_train"], "n_eval": settings["n_eval"]}
        )
        shape = (int(train.images.shape[1]), int(train.images.shape[2]), int(train.images.shape[3]))
        out = {}
        for name in classifiers:
            t0 = time.perf_counter()
            prep = PREPARE[name]
            with base.seeded(seed, device):  # initialisation and dropout
                model = ARCHITECTURES[name](shape, test.num_classes).to(device).to(memory_format=base.CHANNELS_LAST)
                optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
                curve, epoch, state = base.fit_torch(
                    model, optimizer, fit, epochs=settings["epochs"], batch_size=settings["batch_size"],
                    shuffle=None, prepare=prep, keep_best_state=True,
                    score=base.scorer(select, prep),
                )  # fmt: skip
            assert state is not None
            model.load_state_dict(state)
            pred = base.predict(model, test.images, prep)  # the test split is looked at once, after selection
            out[name] = base.record(
                self, name, value=100.0 * base.accuracy(pred, test.labels),
                per_class=base.per_class(pred, test.labels, test.num_classes), seed=seed,
                seconds=time.perf_counter() - t0,
                selected_epoch=epoch, curve=curve, parameters=base.count_parameters(model),
                optimizer=f"Adam(lr={settings['lr']:g})", epochs=settings["epochs"],
                batch_size=settings["batch_size"], n_train=used["n_train"], n_eval=used["n_eval"],
                n_test=len(test), shortened=shortened,
            )  # fmt: skip
        return out


PROTOCOL = DPDMProtocol()
