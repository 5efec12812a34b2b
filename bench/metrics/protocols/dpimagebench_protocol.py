"""The DPImageBench downstream protocol (Gong, Li, Lin, Wang, CCS 2025, README "Main Results" accuracy table).

Reproduces 2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:evaluation/evaluator.py
(`Evaluator.eval`, `Evaluator.cal_acc`), with the classifiers it imports (evaluation/classifier/resnet.py,
wrn.py, resnext.py), its EMA (evaluation/ema.py), the validation split of data/dataset_loader.py
(`load_sensitive_data`) and the ε of utils/utils.py (`parse_config`). Line numbers below are of that commit.

What the reference does, read from the code:

- Classifiers (evaluator.py:41, 271-301): ResNet, WRN and ResNeXt; only ResNet and WRN when the images are
  wider than 32 px (evaluator.py:68-70). On a dataset whose name contains "cifar": ResNet-164 (BasicBlock),
  WRN-28-10 (dropout .3), ResNeXt-28 (cardinality 8, widen factor 10); on every other dataset (MNIST,
  FMNIST, EuroSAT, CelebA, Camelyon) the constructors' defaults: ResNet-110 (BasicBlock), WRN-40-4 (dropout
  .3), ResNeXt-29 (cardinality 8, widen factor 4). ResNeXt takes `dropRate=0.3` and ignores it
  (resnext.py:51: no dropout anywhere). Their own initialisations (resnet.py:114-120, wrn.py:68-75,
  resnext.py:75-84). Global average pooling over img_size/4 (the images' side must be divisible by 4).
  On 1×28×28 with 10 classes: 1,730,426 / 8,948,922 / 34,425,546 parameters (3×32×32: 1,730,714 /
  8,949,210 / 34,426,698; CIFAR's on 3×32×32: 2,605,658 / 36,479,194 / 40,559,690). The port below keeps the
  reference's module names: loaded beside the reference's classes it has the same state-dict keys and shapes,
  the same outputs on the same weights and, under the same torch seed, the same initial weights.
- Training (evaluator.py:271-352): cross-entropy; "cifar": SGD(lr .1, momentum .9, weight decay 5e-4),
  StepLR(60, .2), 200 epochs, batch 126; otherwise Adam(lr .01), StepLR(20, .2), 50 epochs, batch 256,
  accumulated over 16 micro-batches of 16 on 64 px images and 64 of 4 on 128 px (`n_splits`; the batch
  norms see the micro-batches). The synthetic set is read in a fresh random order every epoch
  (DataLoader(shuffle=True)); no augmentation. An EMA of the weights (decay min(.9999, (1 + t)/(10 + t)) after
  t steps, ema.py:44-52) is updated after every optimiser step and swapped in for every evaluation
  (evaluator.py:357-359, 422). Inputs: images in [0, 1] · 2 − 1.
- Synthetic samples (evaluator.py:258-266): permuted by numpy's default_rng(0); the first 55,000 train the
  classifier, the rest (5,000 of the 60,000 the configs generate, `gen.data_num`) form the synthetic
  validation set.
- Selection, after every epoch (evaluator.py:361-419), by `eval.mode` (configs: `val`, the README's default):
  `val`: the "sensitive validation set", N − train_size records of the real training split (train_size:
  55,000 for MNIST/FMNIST, 45,000 CIFAR, 21,000 EuroSAT, 145,064 CelebA, 269,538 Camelyon; chosen by
  torch.manual_seed(0) then random_split, dataset_loader.py:38-59), which the generator does NOT train on.
  `syn`: the held-out synthetic samples. Tracked together (ties go to the LATER epoch, `>=`):
  `best_test_acc_on_val` = the test accuracy at the epoch with the best NOISE-FREE validation accuracy
  (:414-416); in `val` mode also `best_test_acc_on_noisy_val` = the test accuracy at the epoch with the best
  count of correct validation records plus Laplace noise of scale 1/ε (`np.random.laplace(0, 1/epsilon)`,
  :403-409; ε = the generator's target ε, utils.py:118); and the best test accuracy itself (:418-419,
  test-selected).
- Reported (evaluator.py:74-93): `eval` appends `test_acc_on_val` — the NOISE-FREE selection — per
  classifier (:83) and logs the list and its mean and std (np.std, ddof 0; :85-93). The noisy selection is
  computed but never reported: the "noisy" log line prints the noise-free numbers again (:79; the
  training_demo logs show identical values on both lines), although the list's log line (:89) and the
  README's "Results Explanation" (README.md:607-640, :635) call the list the noisy one. The per-epoch
  Laplace releases are composed nowhere: DPImageBench's ε covers the generator only.
- The README's accuracy table (README.md:805-823, "Acc (%) of the classifier trained on synthetic images")
  is, where a training_demo log of the same cell exists, the MAX of the three logged numbers, never their
  mean: DP-FETA MNIST ε=1 [95.5, 95.57, 95.11] → 95.6; PE CIFAR-10 ε=1 [10.0, 64.6, 61.8] → 64.6; DP-MERF
  CelebA ε=10 [81.24, 79.97, 79.00] → 81.2; GS-WGAN MNIST ε=10 [75.31, 74.35, 65.84] → 75.3; DP-LDM-SD
  Camelyon ε=1 [82.95, 84.00, 80.18] → 84.0; PrivImage FMNIST ε=10 [85.48, 87.11, 86.11] → 87.1. Six other
  logs (DPDM and DP-Kernel CelebA ε=1, PDP-Diffusion and PrivImage MNIST ε=10, DP-LoRA FMNIST ε=10, DP-GAN
  CelebA ε=10) match neither the max nor the mean of their lists: other runs than the table's. The README's
  own text does not say how the table aggregates. (training_demo/*: their per-epoch lines also confirm the
  epoch counts, 50 and 200, and that the logged number is the test accuracy at the best validation epoch.)

Here: one metric per classifier (acc_resnet/acc_wrn/acc_resnext_dpimagebench) and two over the classifiers
the reference runs at this resolution: acc_max_dpimagebench (the README table's statistic) and
acc_mean_dpimagebench (the logged mean; its record holds the std). Settings: `mode` ("val" | "syn") and
`report`: "noise_free" (default: what the reference reports, `test_acc_on_val`; in `val` mode real data
selects without noise: NOT private, flagged `non_private_selection` and marked ∗ in reports) or "noisy"
(`best_test_acc_on_noisy_val`, `val` mode only). Every record holds all three numbers
(test_acc_noise_free_val, test_acc_noisy_val, test_acc_best_test) and, in `val` mode, `selection_privacy`:
the per-epoch Laplace ε, the number of releases and classifiers and their basic composition, which is NOT
in the run's privacy card.

The real validation records reach the protocol through `base.Context.real_train` (the run's real training
split) and ε through `base.Context.epsilon` (the run's target ε; `laplace_epsilon` overrides it).

Deviations (the first two and the uint8 and seeding ones are in every record's `deviations`, with the
dataset's own: a dataset DPImageBench does not have, one without its validation split):

- mode val: our generator was trained on the whole real training split, so the validation records are not
  held out from it, as they are in DPImageBench (its generator trains on the other train_size records).
- mode val: the validation records are the last N − train_size indices of torch.randperm(N) under seed 0:
  random_split's rule after torch.manual_seed(0) (checked equal in torch 2.x); the same records as the
  reference's only if our record order is its ImageFolderDataset's. Datasets it has no train_size for (and a
  split no larger than its train_size: the real-data row on a subset): 11/12 of the split stays, 1/12
  validates (MNIST's 5,000 of 60,000).
- The real-data row (downstream.real_reference): classifiers trained on the real split, validated without
  noise (ε = ∞) on records carved from that same split, so the validation records are among its training
  records.
- Samples are uint8 as each method releases them ( / 255 · 2 − 1); the reference reads the generator's floats.
- Seeded: initialisation, minibatch order, dropout and the Laplace draws come from the classifier seed; the
  reference's torch RNG is wherever torch.manual_seed(0) in its data loader left it, its Laplace draws
  (numpy's global RNG) are unseeded.
- More samples than n_train + n_eval: the first n_train + n_eval of the seeded permutation are used; the
  reference's synthetic validation part is every sample after the first 55,000.
- No epoch's noisy count at least 0 (a near-zero count at small ε): the noisy selection is None; the
  reference would stop with an UnboundLocalError.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.memory import check_fits
from bench.metrics.protocols import base

MEMORY_ADVICE = ("score on a GPU, or split each batch with eval.dpimagebench.micro_batches=K (its batch norms then see "
                 "batch_size/K records; the record lists the change under `shortened`)")  # fmt: skip
REFERENCE = "2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:evaluation/evaluator.py"
CLASSIFIERS = ("resnet", "wrn", "resnext")  # evaluator.py:41, in its order
MEAN, MAX = "mean", "max"  # pseudo-classifiers: the statistic over the classifiers behind them
MODES = ("val", "syn")
REPORTS = ("noise_free", "noisy")
ARCHITECTURES = ("default", "cifar")
OPTIMIZERS = ("adam", "sgd")
EMA_DECAY = 0.9999  # evaluator.py:306
LR_GAMMA = 0.2  # StepLR gamma, evaluator.py:283 and :301
SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.9, 5e-4  # evaluator.py:282
SYNTHETIC_SPLIT_SEED = 0  # np.random.default_rng(seed=0), evaluator.py:259
REAL_SPLIT_SEED = 0  # torch.manual_seed(0) before random_split, dataset_loader.py:56
# dataset_loader.py:40-53: records of the real training split left to the generator, by a substring of the name
REAL_TRAIN_SIZE = (("mnist", 55_000), ("cifar", 45_000), ("eurosat", 21_000), ("celeba", 145_064),
                   ("camelyon", 269_538), ("imagenet", 1_000_000))  # fmt: skip
FALLBACK_VAL_FRACTION = 1 / 12  # ours, for datasets without a train_size: MNIST's 5,000 of 60,000
LAPLACE_STREAM = 0x1A91ACE  # separates the Laplace draws' numpy stream from anything else seeded by the seed


@dataclass(frozen=True, kw_only=True)
class Settings:
    """None: the reference's value for the dataset (in brackets: "cifar" datasets; the others)."""

    mode: str | None = None  # ["val"] eval.mode: "val" real validation records select, "syn" held-out samples
    report: str | None = None  # ["noise_free"] `value`: "noise_free" (what eval() reports) or "noisy" (val only)
    classifiers: tuple[str, ...] | None = None  # [resnet, wrn, resnext; resnet, wrn above 32 px]
    architecture: str | None = None  # ["cifar": ResNet-164, WRN-28-10, ResNeXt-28 w10; "default": 110, 40-4, 29 w4]
    optimizer: str | None = None  # ["sgd" lr .1, momentum .9, wd 5e-4; "adam"]
    lr: float | None = None  # [0.1; 0.01]
    lr_step: int | None = None  # [60; 20] StepLR step (epochs), gamma 0.2
    epochs: int | None = None  # [200; 50]
    batch_size: int | None = None  # [126; 256]
    micro_batches: int | None = None  # [1; 1, 16 at 64 px, 64 at 128 px] n_splits (gradient accumulation)
    n_train: int | None = None  # [55000] synthetic samples the classifiers train on
    n_eval: int | None = None  # [5000] held-out synthetic samples (mode syn selects on them; val: unused)
    real_train_size: int | None = None  # [45000; 55000 MNIST/FMNIST, 145064 CelebA gender] val: N − this validate
    laplace_epsilon: float | None = None  # [the run's target ε] mode val: noise of scale 1/ε per epoch

    def __post_init__(self) -> None:
        base.check_positive(self, "lr", "lr_step", "epochs", "batch_size", "micro_batches", "n_train", "n_eval",
                            "real_train_size", "laplace_epsilon")  # fmt: skip
        for name, allowed in (("mode", MODES), ("report", REPORTS), ("architecture", ARCHITECTURES),
                              ("optimizer", OPTIMIZERS)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if self.report == "noisy" and self.mode == "syn":
            raise ValueError("report 'noisy' needs mode 'val': in mode 'syn' the reference adds no noise")
        if self.classifiers is not None:
            unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
            if unknown or not self.classifiers:
                what = f"unknown classifier {unknown[0]!r}" if unknown else "no classifier"
                raise ValueError(f"classifiers: {what}; choose from {', '.join(CLASSIFIERS)}")
        if self.micro_batches is not None and self.batch_size is not None and self.micro_batches > self.batch_size:
            raise ValueError(f"micro_batches ({self.micro_batches}) must be <= batch_size ({self.batch_size})")


# --------------------------------------------------------------------------------------------------
# The classifiers: evaluation/classifier/{resnet,wrn,resnext}.py at the commit above, module names kept


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class ResNetBlock(nn.Module):
    """resnet.py BasicBlock: conv3×3 → BN → ReLU → conv3×3 → BN, + identity (or 1×1 conv + BN), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """resnet.py ResNet(depth, in_c, img_size, num_classes, block_name='BasicBlock'): 16/32/64 channels."""

    def __init__(self, depth: int = 110, in_c: int = 3, img_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise BenchError(f"ResNet with BasicBlock needs depth 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_c, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AvgPool2d(img_size // 4)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [ResNetBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ResNetBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class WRNBlock(nn.Module):
    """wrn.py BasicBlock (pre-activation): BN → ReLU → conv3×3 → BN → ReLU → dropout → conv3×3, + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = c_in == c_out
        self.convShortcut = (
            None if self.equalInOut else nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:  # the shortcut takes the pre-activated input, as the reference's (x is reassigned)
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(x)
        return torch.add(shortcut, out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, c_in: int, c_out: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WRNBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, drop_rate) for i in range(nb_layers))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """wrn.py WideResNet(in_c, img_size, num_classes, depth=40, widen_factor=4, dropRate)."""

    def __init__(self, in_c: int = 3, img_size: int = 32, num_classes: int = 10, depth: int = 40,
                 widen_factor: int = 4, drop_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if (depth - 4) % 6:
            raise BenchError(f"WideResNet needs depth 6n + 4, got {depth}")
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.img_size = img_size
        self.conv1 = nn.Conv2d(in_c, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, self.img_size // 4)
        return self.fc(out.view(-1, self.nChannels))


class ResNeXtBottleneck(nn.Module):
    """resnext.py ResNeXtBottleneck: 1×1 reduce to D = cardinality·out/widen → grouped 3×3 → 1×1 expand."""

    def __init__(self, c_in: int, c_out: int, stride: int, cardinality: int, widen_factor: int) -> None:
        super().__init__()
        d = cardinality * c_out // widen_factor
        self.conv_reduce = nn.Conv2d(c_in, d, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(d, d, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.conv_expand = nn.Conv2d(d, c_out, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_expand = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if c_in != c_out:
            self.shortcut.add_module(
                "shortcut_conv", nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, padding=0, bias=False)
            )
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        b = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        b = F.relu(self.bn(self.conv_conv(b)), inplace=True)
        b = self.bn_expand(self.conv_expand(b))
        return F.relu(self.shortcut(x) + b, inplace=True)


class ResNeXt(nn.Module):
    """resnext.py ResNeXt(in_c, img_size, cardinality=8, depth=29, num_classes, widen_factor=4); its dropRate
    is accepted and unused by the reference, so there is none here."""

    def __init__(self, in_c: int = 3, img_size: int = 32, cardinality: int = 8, depth: int = 29,
                 num_classes: int = 10, widen_factor: int = 4) -> None:  # fmt: skip
        super().__init__()
        self.cardinality = cardinality
        self.block_depth = (depth - 2) // 9
        self.widen_factor = widen_factor
        self.img_size = img_size
        self.stages = [64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor]
        self.conv_1_3x3 = nn.Conv2d(in_c, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.stage_1 = self.block("stage_1", self.stages[0], self.stages[1], 1)
        self.stage_2 = self.block("stage_2", self.stages[1], self.stages[2], 2)
        self.stage_3 = self.block("stage_3", self.stages[2], self.stages[3], 2)
        self.classifier = nn.Linear(256 * widen_factor, num_classes)
        nn.init.kaiming_normal_(self.classifier.weight)
        state = self.state_dict()  # resnext.py:77-84: by the state dict's key names (tensors share the storage)
        for key in state:
            if key.split(".")[-1] == "weight":
                if "conv" in key:
                    nn.init.kaiming_normal_(state[key], mode="fan_out")
                if "bn" in key:
                    state[key][...] = 1
            elif key.split(".")[-1] == "bias":
                state[key][...] = 0

    def block(self, name: str, c_in: int, c_out: int, pool_stride: int = 2) -> nn.Sequential:
        block = nn.Sequential()
        for i in range(self.block_depth):
            first = i == 0
            block.add_module(
                f"{name}_bottleneck_{i}",
                ResNeXtBottleneck(
                    c_in if first else c_out, c_out, pool_stride if first else 1, self.cardinality, self.widen_factor
                ),  # fmt: skip
            )
        return block

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        x = F.avg_pool2d(x, self.img_size // 4, 1)
        return self.classifier(x.view(x.size(0), -1))


def build(name: str, architecture: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The reference's classifier `name` (evaluator.py:275-298) for C×H×W images."""
    c, h, _ = shape  # the reference passes synthetic_images.shape[2] (the height) as img_size
    cifar = architecture == "cifar"
    if name == "resnet":
        return ResNet(depth=164 if cifar else 110, in_c=c, img_size=h, num_classes=num_classes)
    if name == "wrn":
        return WideResNet(in_c=c, img_size=h, num_classes=num_classes, depth=28 if cifar else 40,
                          widen_factor=10 if cifar else 4, drop_rate=0.3)  # fmt: skip
    if name == "resnext":
        return ResNeXt(in_c=c, img_size=h, cardinality=8, depth=28 if cifar else 29, num_classes=num_classes,
                       widen_factor=10 if cifar else 4)  # fmt: skip
    raise BenchError(f"protocol dpimagebench has no classifier {name!r}; it has {', '.join(CLASSIFIERS)}")


# --------------------------------------------------------------------------------------------------
# Training, scoring and selection


def prepare(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] → float [−1, 1] (x / 255 · 2 − 1, the reference's inputs · 2 − 1)."""
    return images.float() / 255.0 * 2.0 - 1.0


class EMA:
    """evaluation/ema.py ExponentialMovingAverage(parameters, 0.9999) with use_num_updates=True."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.num_updates = decay, 0
        self.shadow = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, (p for p in model.parameters() if p.requires_grad), strict=True):
            s.sub_((1.0 - decay) * (s - p))

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights and the averages (twice: back to the training weights), as
        ema.store + ema.copy_to and ema.restore do around the reference's evaluation."""
        for s, p in zip(self.shadow, (p for p in model.parameters() if p.requires_grad), strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


@dataclass
class Trace:
    """What one classifier's training leaves for the selection: per epoch, the count of correct validation
    records and the test predictions (EMA weights), and the classifier's parameter count."""

    val_correct: list[int]
    val_total: int
    test_pred: list[Tensor]
    parameters: int


def train_classifier(
    name: str,
    fit: ImageDataset,
    val: ImageDataset,
    test: ImageDataset,
    *,
    settings: dict[str, Any],
    seed: int,
    device: torch.device,
) -> Trace:
    """evaluator.py:303-422 for one classifier: train for settings["epochs"], scoring `val` and `test` with the
    EMA weights after every epoch."""
    shape = (int(fit.images.shape[1]), int(fit.images.shape[2]), int(fit.images.shape[3]))
    micro = max(1, settings["batch_size"] // settings["micro_batches"])  # batch_size // n_splits
    shuffle = torch.Generator().manual_seed(seed)  # DataLoader(shuffle=True): a fresh order every epoch
    val_correct: list[int] = []
    test_pred: list[Tensor] = []
    with base.seeded(seed, device):  # initialisation and dropout
        model = build(name, settings["architecture"], shape, test.num_classes).to(device)
        if settings["optimizer"] == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=settings["lr"], momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY
            )
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings["lr_step"], gamma=LR_GAMMA)
        ema = EMA(model, EMA_DECAY)
        accumulated = 0  # grad_accu_step: carried across epochs, as the reference's
        for _ in range(settings["epochs"]):
            model.train()
            for idx in torch.randperm(len(fit), generator=shuffle).split(micro):
                x, y = prepare(fit.images[idx].to(device)), fit.labels[idx].to(device)
                if accumulated == 0:
                    optimizer.zero_grad(set_to_none=True)
                (F.cross_entropy(model(x), y) / settings["micro_batches"]).backward()
                accumulated += 1
                if accumulated == settings["micro_batches"]:
                    optimizer.step()
                    accumulated = 0
                    ema.update(model)
            scheduler.step()
            ema.swap(model)  # evaluate the averaged weights
            val_correct.append(int((base.predict(model, val.images, prepare) == val.labels).sum()))
            test_pred.append(base.predict(model, test.images, prepare))
            ema.swap(model)
    return Trace(val_correct=val_correct, val_total=len(val), test_pred=test_pred,
                 parameters=base.count_parameters(model))  # fmt: skip


def laplace(rng: np.random.Generator, scale: float) -> float:
    """One draw of Laplace(0, scale): np.random.laplace(loc=0, scale=1/ε) of evaluator.py:405, from `rng`."""
    return float(rng.laplace(loc=0.0, scale=scale)) if scale > 0 else 0.0


def last_best(scores: list[float], floor: float = 0.0) -> int | None:
    """Index of the last score that is >= every earlier one and >= `floor` (the reference's `if s >= best`
    with best starting at `floor`); None when no score reaches the floor."""
    best, at = floor, None
    for i, s in enumerate(scores):
        if s >= best:
            best, at = s, i
    return at


@dataclass(frozen=True)
class Selection:
    """0-based epochs chosen by each rule of evaluator.py:403-419 (noisy: None in mode syn, or never >= 0)."""

    noise_free: int
    noisy: int | None
    best_test: int


def select(val_acc: list[float], noisy_counts: list[float] | None, test_acc: list[float]) -> Selection:
    """The epochs of best_test_acc_on_val (noise-free validation accuracy), best_test_acc_on_noisy_val (noisy
    count of correct validation records) and best_test_acc_on_test; ties go to the later epoch."""
    noise_free, best_test = last_best(val_acc), last_best(test_acc)
    assert noise_free is not None and best_test is not None  # accuracies are >= 0: epoch 0 always qualifies
    return Selection(noise_free, None if noisy_counts is None else last_best(noisy_counts), best_test)


def real_validation(real: ImageDataset | None, train_size: int | None) -> tuple[ImageDataset, str]:
    """The reference's sensitive validation set: real records not among the first `train_size` of
    torch.randperm(N) under seed 0 (random_split after torch.manual_seed(0)); train_size None: 11/12 of N."""
    if real is None:
        raise BenchError(
            "protocol dpimagebench, mode 'val': the real training split is needed to carve the validation records "
            "(bench passes it; a direct caller passes real_train, or sets eval.dpimagebench.mode = 'syn')"
        )
    n = len(real)
    if n < 2:
        raise BenchError(
            f"protocol dpimagebench, mode 'val': the real training split has {n} record(s), too few to split"
        )
    if train_size is not None and train_size < n:
        keep, rule = train_size, f"N − {train_size}"
    else:  # no train_size for the dataset, or one as large as this split (the real-data row on a subset)
        keep = n - max(1, round(n * FALLBACK_VAL_FRACTION))
        rule = "1/12 of N: our rule, " + (
            "the reference has no split for this dataset" if train_size is None else f"train_size {train_size} ≥ N"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(REAL_SPLIT_SEED))
    return real.subset(perm[keep:]), (
        f"{n - keep} real records ({rule}; N = {n}) of the real training split: the last {n - keep} of "
        f"torch.randperm(N) under seed {REAL_SPLIT_SEED}, as random_split after torch.manual_seed(0)"
    )


def selection_privacy(epsilon: float, epochs: int, classifiers: int) -> dict[str, Any]:
    """The privacy cost of mode val's noisy selection, which DPImageBench composes nowhere."""
    finite = math.isfinite(epsilon)
    return {
        "mechanism": "Laplace noise of scale 1/ε added to the count of correct real validation records after "
        "every epoch (sensitivity 1: ε-DP per release); the epoch of the highest noisy count is selected",
        "epsilon_per_epoch": epsilon if finite else None,
        "releases_per_classifier": epochs,
        "classifiers": classifiers,
        "epsilon_per_classifier_basic_composition": epochs * epsilon if finite else None,
        "epsilon_all_classifiers_basic_composition": classifiers * epochs * epsilon if finite else None,
        "delta": 0.0,
        "in_privacy_card": False,
        "note": (
            "NOT in this run's privacy card: the run's ε covers the generator only. DPImageBench draws these "
            "releases (evaluator.py:403-409) on the same validation records for every classifier and composes "
            "them nowhere; by basic composition they add the ε above, on top of the generator's."
            if finite
            else "non-private run (ε = ∞): no noise is added; the selection is the noise-free one"
        ),
    }


def _side_ok(side: int) -> bool:
    return side >= 4 and side % 4 == 0


class DPImageBenchProtocol(base.Protocol):
    name = "dpimagebench"
    version = 1
    reference = REFERENCE
    title = (
        "DPImageBench's evaluator: ResNet-110, WRN-40-4, ResNeXt-29 (CIFAR: 164, 28-10, 28), Adam .01 × 50 epochs "
        "(CIFAR: SGD .1 × 200), EMA; epoch chosen on real validation records (∗ noise-free) or held-out samples"
    )
    test_selected = False
    selection = (
        "the last epoch with the best validation accuracy: real validation records without noise (mode val, "
        "report noise_free: DPImageBench's number, not private ∗), their Laplace-noised count (report noisy), "
        "or held-out synthetic samples (mode syn); each record's `selection` says which"
    )
    reported = (
        "real test accuracy (%) at the selected epoch; acc_max/acc_mean_dpimagebench: the max (the README "
        "table's) and the mean (with std, the log's) over the classifiers the reference runs at this resolution"
    )
    metrics = {
        "resnet": "acc_resnet_dpimagebench",
        "wrn": "acc_wrn_dpimagebench",
        "resnext": "acc_resnext_dpimagebench",
        MAX: "acc_max_dpimagebench",
        MEAN: "acc_mean_dpimagebench",
    }
    published = {"acc_max3": "acc_max_dpimagebench", "acc_mean3": "acc_mean_dpimagebench"}
    deviations = (
        "mode val: the generator was trained on the whole real training split, so the validation records are not "
        "held out from it as in DPImageBench (data/dataset_loader.py:38-65 trains it on the rest)",
        "mode val: validation records = the last N − train_size of torch.randperm(N) under seed 0 (random_split's "
        "rule after torch.manual_seed(0)); the reference's records only if our record order is its",
        "uint8 samples as the method quantises them; reference: the generator's float outputs",
        "seeded (initialisation, minibatch order, dropout, Laplace draws from the classifier seed); the reference's "
        "Laplace draws are unseeded",
    )
    Settings = Settings

    def reference_settings(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        side = shape[2]
        out: dict[str, Any] = {"mode": "val", "report": "noise_free",
                               "classifiers": CLASSIFIERS if side <= 32 else CLASSIFIERS[:2]}  # fmt: skip
        if "cifar" in dataset:  # evaluator.py:271-283
            out |= {"architecture": "cifar", "optimizer": "sgd", "lr": 0.1, "lr_step": 60, "epochs": 200,
                    "batch_size": 126, "micro_batches": 1}  # fmt: skip
        else:  # evaluator.py:284-301
            out |= {"architecture": "default", "optimizer": "adam", "lr": 0.01, "lr_step": 20, "epochs": 50,
                    "batch_size": 256, "micro_batches": {64: 16, 128: 64}.get(side, 1)}  # fmt: skip
        out |= {
            "n_train": 55_000,
            "n_eval": 5_000,
            "real_train_size": _real_train_size(dataset),
            "laplace_epsilon": None,
        }
        return out

    def dataset_deviations(self, dataset: str, shape: tuple[int, int, int], num_classes: int) -> list[str]:
        out = []
        names = ("mnist", "fmnist", "cifar10", "celeba32-gender", "celeba64-gender")
        if dataset not in names:
            how = "the CIFAR settings" if "cifar" in dataset else "the non-CIFAR (MNIST/CelebA) settings"
            out.append(f"DPImageBench has no {dataset}; applied with {how}")
        if _real_train_size(dataset) is None:
            out.append("mode val: DPImageBench has no validation split for this dataset; 1/12 of the real training "
                       "split validates (MNIST's 5,000 of 60,000)")  # fmt: skip
        return out

    def settings_of(self, classifier: str) -> set[str] | None:
        if classifier in (MEAN, MAX):
            return None
        return {f.name for f in dataclasses.fields(Settings)} - {"classifiers"}

    def parameters(self, classifier: str, shape: tuple[int, int, int], num_classes: int) -> int | None:
        if classifier in (MEAN, MAX):
            return None
        return base.count_parameters(build(classifier, "default", shape, num_classes))

    def run(
        self,
        classifiers: list[str],
        train: ImageDataset,
        test: ImageDataset,
        *,
        settings: dict[str, Any],
        seed: int,
        device: torch.device,
        context: base.Context = base.NO_CONTEXT,
    ) -> dict[str, base.Record]:
        classifiers = base.names_of(self, classifiers)
        behind = list(settings["classifiers"])
        wanted = _trained(classifiers, behind)
        shape = (int(train.images.shape[1]), int(train.images.shape[2]), int(train.images.shape[3]))
        if wanted and not (shape[1] == shape[2] and _side_ok(shape[1])):
            raise BenchError(
                f"protocol dpimagebench: its classifiers pool over img_size/4 and need square images with a side "
                f"divisible by 4, got {shape[1]}×{shape[2]}"
            )
        self.check_resources(classifiers, shape, test.num_classes, settings=settings, device=device)
        val_mode = settings["mode"] == "val"
        epsilon = settings["laplace_epsilon"] if settings["laplace_epsilon"] is not None else context.epsilon
        common: dict[str, Any] = {"mode": settings["mode"], "report": settings["report"]}
        if wanted and val_mode:
            if epsilon is None:
                raise BenchError(
                    "protocol dpimagebench, mode 'val': the Laplace noise has scale 1/ε, and neither the run's ε nor "
                    "eval.dpimagebench.laplace_epsilon is given"
                )
            val, described = real_validation(context.real_train, settings["real_train_size"])
            unused = "held out and unused in mode val, as evaluator.py:265-266 leaves them"
            common |= {"validation": described, "n_val": len(val), "n_eval_use": unused}
        perm = torch.from_numpy(np.random.default_rng(SYNTHETIC_SPLIT_SEED).permutation(len(train)))
        (fit, syn_val), used, shortened = base.take_samples(
            train.subset(perm), {"n_train": settings["n_train"], "n_eval": settings["n_eval"]}
        )
        if not val_mode:
            val = syn_val
            common |= {"validation": f"{len(val)} held-out synthetic samples (no real data selects)",
                       "n_val": len(val)}  # fmt: skip
        common |= {"n_train": used["n_train"], "n_eval": used["n_eval"], "n_test": len(test), "shortened": shortened}
        per: dict[str, dict[str, Any]] = {}
        for name in wanted:
            t0 = time.perf_counter()
            trace = train_classifier(name, fit, val, test, settings=settings, seed=seed, device=device)
            rng = np.random.default_rng([seed, LAPLACE_STREAM, CLASSIFIERS.index(name)])
            per[name] = self._selected(trace, test, settings, rng, epsilon if val_mode else None)
            per[name]["seconds"] = time.perf_counter() - t0
        out = {}
        for name in classifiers:
            if name in (MEAN, MAX):
                out[name] = self._statistic(name, per, behind, test, settings, seed, common,
                                            epsilon if val_mode else None)  # fmt: skip
            elif name in per:
                r = dict(per[name])
                out[name] = base.record(self, name, value=r.pop("value"), per_class=r.pop("per_class"), seed=seed,
                                        seconds=r.pop("seconds"), **common, **r,
                                        **self._privacy(settings, epsilon, len(behind)))  # fmt: skip
            else:
                out[name] = base.record(
                    self, name, value=None, per_class=[None] * test.num_classes, seed=seed, seconds=0.0,
                    note=f"n/a: {name} is not among the classifiers DPImageBench runs here ({', '.join(behind)}; "
                    "evaluator.py:68-70 drops ResNeXt above 32 px); eval.dpimagebench.classifiers can add it",
                    selected_epoch=None, curve=None, **common,
                )  # fmt: skip
        return out

    def check_resources(
        self, classifiers: list[str], shape: tuple[int, int, int], num_classes: int, *, settings: dict[str, Any],
        device: torch.device,
    ) -> None:  # fmt: skip
        """Each classifier to be trained, before any is: one that cannot must not first cost the others' hours."""
        micro = max(1, settings["batch_size"] // settings["micro_batches"])
        for name in _trained(base.names_of(self, classifiers), list(settings["classifiers"])):
            with torch.random.fork_rng(devices=[]):  # its initialisation draws nothing from the run's stream
                model = build(name, settings["architecture"], shape, num_classes)
            check_fits(f"protocol dpimagebench, {name}", model, shape, micro, device, advice=MEMORY_ADVICE)

    def _selected(
        self, trace: Trace, test: ImageDataset, settings: dict[str, Any], rng: np.random.Generator,
        epsilon: float | None,
    ) -> dict[str, Any]:  # fmt: skip
        """One classifier's three selections and the reported one (`value`), from its training trace."""
        val_acc = [100.0 * c / trace.val_total for c in trace.val_correct]
        test_acc = [100.0 * base.accuracy(p, test.labels) for p in trace.test_pred]
        noisy = None
        if epsilon is not None:  # one draw per epoch, in epoch order (evaluator.py:405)
            noisy = [c + laplace(rng, 1.0 / epsilon) for c in trace.val_correct]
        s = select(val_acc, noisy, test_acc)
        chosen = s.noise_free if settings["report"] == "noise_free" else s.noisy
        pred = None if chosen is None else trace.test_pred[chosen]
        return {
            "value": None if chosen is None else test_acc[chosen],
            "per_class": [None] * test.num_classes if pred is None else base.per_class(pred, test.labels,
                                                                                        test.num_classes),
            "selected_epoch": None if chosen is None else chosen + 1,
            "non_private_selection": epsilon is not None and settings["report"] == "noise_free",
            "selection": _selection_text(settings, epsilon),
            "test_acc_noise_free_val": test_acc[s.noise_free],
            "epoch_noise_free_val": s.noise_free + 1,
            "val_acc_best": val_acc[s.noise_free],
            "test_acc_noisy_val": None if s.noisy is None else test_acc[s.noisy],
            "epoch_noisy_val": None if s.noisy is None else s.noisy + 1,
            "noisy_val_acc_best": None if s.noisy is None or noisy is None else 100 * noisy[s.noisy] / trace.val_total,
            "test_acc_best_test": test_acc[s.best_test],
            "epoch_best_test": s.best_test + 1,
            "curve": val_acc,
            "test_curve": test_acc,
            "noisy_val_counts": noisy,
            "parameters": trace.parameters,
            "optimizer": _optimizer_text(settings),
            "epochs": settings["epochs"],
            "batch_size": settings["batch_size"],
            "micro_batches": settings["micro_batches"],
            "ema_decay": EMA_DECAY,
        }  # fmt: skip

    def _statistic(
        self, name: str, per: dict[str, dict[str, Any]], behind: list[str], test: ImageDataset,
        settings: dict[str, Any], seed: int, common: dict[str, Any], epsilon: float | None,
    ) -> base.Record:  # fmt: skip
        """acc_max (the README table's) or acc_mean (the log's, with its np.std) over the classifiers behind."""
        values = {c: per[c]["value"] for c in behind}
        known = [v for v in values.values() if v is not None]
        complete = len(known) == len(values)
        if name == MAX:
            best = max(behind, key=lambda c: -1.0 if values[c] is None else values[c])
            value, per_class = (values[best], per[best]["per_class"]) if complete else (None, None)
        else:
            value = sum(known) / len(known) if complete else None
            columns = zip(*(per[k]["per_class"] for k in behind), strict=True)
            per_class = [None if None in c else sum(c) / len(c) for c in columns] if complete else None
        return base.record(
            self, name, value=value, per_class=per_class or [None] * test.num_classes, seed=seed,
            seconds=sum(per[c]["seconds"] for c in behind), **common,
            per_classifier=values, std=float(np.std(known)) if complete else None,
            per_classifier_noise_free_val={c: per[c]["test_acc_noise_free_val"] for c in behind},
            per_classifier_noisy_val={c: per[c]["test_acc_noisy_val"] for c in behind},
            per_classifier_epoch={c: per[c]["selected_epoch"] for c in behind},
            non_private_selection=per[behind[0]]["non_private_selection"],
            selection=per[behind[0]]["selection"], selected_epoch=None, curve=None, parameters=None,
            optimizer=_optimizer_text(settings), epochs=settings["epochs"], batch_size=settings["batch_size"],
            micro_batches=settings["micro_batches"], ema_decay=EMA_DECAY,
            **self._privacy(settings, epsilon, len(behind)),
        )  # fmt: skip

    def _privacy(self, settings: dict[str, Any], epsilon: float | None, classifiers: int) -> dict[str, Any]:
        if settings["mode"] != "val" or epsilon is None:
            return {"selection_privacy": None}
        return {"selection_privacy": selection_privacy(epsilon, settings["epochs"], classifiers)}


def _trained(classifiers: list[str], behind: list[str]) -> list[str]:
    """The networks that `classifiers` (ours, MEAN and MAX included) train: MEAN and MAX train all those `behind`."""
    return [c for c in CLASSIFIERS if c in behind and (c in classifiers or {MEAN, MAX} & set(classifiers))]


def _real_train_size(dataset: str) -> int | None:
    """dataset_loader.py:40-53's train_size for our dataset name; None where it has none that fits."""
    if "hair" in dataset:  # CelebA's hair subset is smaller than 145,064: the reference's split would fail
        return None
    return next((size for key, size in REAL_TRAIN_SIZE if key in dataset), None)


def _optimizer_text(settings: dict[str, Any]) -> str:
    step = f"StepLR({settings['lr_step']}, {LR_GAMMA:g})"
    if settings["optimizer"] == "sgd":
        return f"SGD(lr={settings['lr']:g}, momentum={SGD_MOMENTUM:g}, weight_decay={SGD_WEIGHT_DECAY:g}), {step}"
    return f"Adam(lr={settings['lr']:g}), {step}"


def _selection_text(settings: dict[str, Any], epsilon: float | None) -> str:
    if epsilon is None:
        return "the last epoch with the best accuracy on held-out synthetic samples (mode syn): no real data selects"
    if settings["report"] == "noise_free":
        return (
            "the last epoch with the best accuracy on real validation records, WITHOUT noise (DPImageBench's "
            "reported test_acc_on_val, evaluator.py:414-416 and :83): real data selects outside any DP mechanism ∗"
        )
    return (
        "the last epoch with the best count of correct real validation records plus Laplace noise of scale 1/ε "
        "(best_test_acc_on_noisy_val, evaluator.py:403-409); its cost is in `selection_privacy`, not in the "
        "run's privacy card"
    )


PROTOCOL = DPImageBenchProtocol()
