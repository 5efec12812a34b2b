"""The domain feature extractor: a small CNN classifier trained on the real training set.

Evaluation only: it is trained with a fixed seed, cached on disk (trained once per dataset, data
fingerprint, architecture and epochs), and never influences a released model. It is registered in
torch-fidelity's feature-extractor registry as "bench-domain-cnn", so that torch-fidelity computes the
statistics; metrics that use it are labelled with it ("fd_domain") and never called FID.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from bench.contract import ImageDataset
from bench.data import cache_root, file_stem
from bench.errors import BenchError

EXTRACTOR_NAME = "bench-domain-cnn"
FEATURE_LAYER = "128"  # torch-fidelity's name for the penultimate layer
ARCH_VERSION = 1  # bump when SmallCNN, its input scaling or its training changes: invalidates caches
SEED = 0
BATCH_SIZE = 128
LR = 1e-3


class SmallCNN(nn.Module):
    """conv3×3(16) → ReLU → maxpool2 → conv3×3(32) → ReLU → maxpool2 → avgpool to 4×4 → dense 128 → ReLU
    → dense classes. Any input size ≥ 4×4; the adaptive pool makes the head size-independent."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """float [B, C, H, W] in [-1, 1] -> float [B, 128], the penultimate activations."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)  # [B, 512]
        return F.relu(self.fc(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def to_input(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float [B, C, H, W] in [-1, 1]: fixed constants, no data statistics."""
    return images.float() / 127.5 - 1.0


def new_classifier(channels: int, num_classes: int, seed: int) -> SmallCNN:
    """A SmallCNN whose initial weights depend only on `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(channels, num_classes)


def train_epoch(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    generator: torch.Generator | None,
    prepare: Callable[[Tensor], Tensor] = to_input,
) -> None:
    """One pass of cross-entropy training over uint8 `images` [N, C, H, W], in a fresh random order drawn
    from `generator`, or in the stored order when `generator` is None (a DataLoader without shuffle, as
    nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:train_downstream_classifiers.py reads its samples).

    `prepare` turns a uint8 batch (already on the model's device) into the model's float input.
    """
    device = next(model.parameters()).device
    model.train()
    n = len(images)
    order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    for idx in order.split(batch_size):
        x, y = prepare(images[idx].to(device)), labels[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 1024) -> float:
    """Fraction in [0, 1] of uint8 `images` [N, C, H, W] classified as `labels` [N]."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        correct += int((model(to_input(x.to(device))).argmax(1).cpu() == y).sum())
    return correct / max(len(images), 1)


def fingerprint(data: ImageDataset) -> str:
    """A short hash of the shape, all labels and the images of up to 256 evenly spaced records."""
    h = hashlib.sha256(repr((tuple(data.images.shape), data.num_classes)).encode())
    h.update(data.labels.numpy().tobytes())
    step = max(1, len(data) // 256)
    h.update(data.images[::step].contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class DomainExtractor:
    """A trained domain CNN on disk; `key` names it in every cache that depends on its weights."""

    weights_path: Path
    key: str  # <dataset>-<data fingerprint>-cnn<ARCH_VERSION>-e<epochs>
    name: str = EXTRACTOR_NAME  # torch-fidelity registry name
    feature_layer: str = FEATURE_LAYER


def domain_extractor(
    train: ImageDataset,
    *,
    dataset: str | None = None,
    epochs: int = 5,
    device: torch.device | str = "cpu",
) -> DomainExtractor:
    """Train (or load from $BENCH_CACHE/extractors) the domain CNN for the real training set `train`."""
    key = f"{file_stem(dataset or train.name or 'data')}-{fingerprint(train)}-cnn{ARCH_VERSION}-e{epochs}"
    path = cache_root() / "extractors" / f"{key}.pt"
    if not path.exists():
        model = _train(train, epochs=epochs, device=torch.device(device))
        arch = {"channels": train.spec.channels, "num_classes": train.num_classes}
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"arch": arch, "state_dict": state, "key": key}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return DomainExtractor(weights_path=path, key=key)


def _train(train: ImageDataset, *, epochs: int, device: torch.device) -> SmallCNN:
    model = new_classifier(train.spec.channels, train.num_classes, SEED).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        train_epoch(model, train.images, train.labels, optimizer, batch_size=BATCH_SIZE, generator=generator)
    return model.eval()


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of a DomainExtractor: uint8 [B, C, H, W] in, features "128" / "logits" out.

    torch-fidelity constructs it as cls(name, features_list, **calculate_metrics_kwargs); the weights come
    from `feature_extractor_weights_path` (a file written by `domain_extractor`).
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{EXTRACTOR_NAME} needs feature_extractor_weights_path (see domain_extractor)")
        try:
            ckpt = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
            self.net = SmallCNN(**ckpt["arch"])
            self.net.load_state_dict(ckpt["state_dict"])
        except (OSError, RuntimeError, KeyError, TypeError) as e:
            raise BenchError(
                f"cannot load the domain extractor {feature_extractor_weights_path}: {e}; delete the file to retrain it"
            ) from e

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURE_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8:
            raise ValueError(f"{EXTRACTOR_NAME} expects uint8 images, got {x.dtype}")
        features = self.net.features(to_input(x))
        out = {FEATURE_LAYER: features, "logits": self.net.head(features)}
        return tuple(out[name] for name in self.features_list)


def extract_features(
    extractor: DomainExtractor, images: Tensor, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> Tensor:
    """float32 CPU [N, 128] penultimate features of uint8 `images` [N, C, H, W], outside torch-fidelity."""
    fe = DomainFeatureExtractor(EXTRACTOR_NAME, [FEATURE_LAYER], str(extractor.weights_path)).eval()
    fe = fe.to(device, memory_format=torch.channels_last)  # CPU convolutions and pooling ~2× faster
    with torch.no_grad():
        return torch.cat(
            [fe(x.to(device).contiguous(memory_format=torch.channels_last))[0].cpu() for x in images.split(batch_size)]
        )


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # torch-fidelity refuses a second registration
    register_feature_extractor(EXTRACTOR_NAME, DomainFeatureExtractor)


class UInt8Images(Dataset[Tensor]):
    """Items are uint8 [C, H, W], what torch-fidelity feeds to feature extractors.

    `rgb`: single-channel images are repeated to 3 channels (Inception expects RGB)."""

    def __init__(self, images: Tensor, *, rgb: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if rgb and images.shape[1] not in (1, 3):
            raise ValueError(f"cannot make RGB images of {images.shape[1]} channels")
        self.images = images
        self.rgb = rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if self.rgb and x.shape[0] == 1 else x


def reference_cache_name(real: ImageDataset, extractor: DomainExtractor) -> str:
    """The torch-fidelity cache entry of `real`'s statistics.

    torch-fidelity names its files <input cache name>-<extractor registry name>-stat-fid-<layer>; the
    registry name is the same for every dataset and every set of weights, so the weights' key goes here.
    """
    return f"{extractor.key}-ref-{fingerprint(real)}"


def fidelity_call_options(*, cache: bool, batch_size: int, cuda: bool | None) -> dict[str, Any]:
    """The keyword arguments every torch_fidelity.calculate_metrics call of ours shares: its cache under
    $BENCH_CACHE/fidelity, the batch size, the device (the GPU when there is one, unless `cuda` says), and no
    DataLoader worker processes (the data are already in memory)."""
    return {
        "cache": cache,
        "cache_root": str(cache_root() / "fidelity"),
        "batch_size": batch_size,
        "cuda": torch.cuda.is_available() if cuda is None else cuda,
        "save_cpu_ram": True,
        "verbose": False,
    }
