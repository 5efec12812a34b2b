"""Fréchet distance in the domain extractor's feature space, computed by torch-fidelity.

torch-fidelity extracts the features, computes the statistics and the distance; we only hand it two
uint8 datasets and the registered extractor. Reference statistics of the real set are cached by
torch-fidelity under $BENCH_CACHE/fidelity.
"""

from __future__ import annotations

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset

from bench.contract import ImageDataset
from bench.data import cache_root
from bench.metrics.features import DomainExtractor, fingerprint


class UInt8Images(Dataset[Tensor]):
    """Items are uint8 [C, H, W], what torch-fidelity feeds to feature extractors."""

    def __init__(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def reference_cache_name(real: ImageDataset, extractor: DomainExtractor) -> str:
    """The torch-fidelity cache entry of `real`'s statistics.

    torch-fidelity names its files <input cache name>-<extractor registry name>-stat-fid-<layer>; the
    registry name is the same for every dataset and every set of weights, so the weights' key goes here.
    """
    return f"{extractor.key}-ref-{fingerprint(real)}"


def frechet_distance(
    fake: Tensor,
    real: ImageDataset,
    *,
    extractor: DomainExtractor,
    cache: bool = True,
    batch_size: int = 256,
    cuda: bool | None = None,
) -> float:
    """Fréchet distance between uint8 `fake` [N, C, H, W] and `real` in `extractor`'s feature space.

    `cache`: reuse torch-fidelity's cached statistics (and features) of `real`. `cuda`: run the extractor
    on the GPU; default when one is available. Non-negative; 0 for identical feature distributions.
    """
    if tuple(fake.shape[1:]) != tuple(real.images.shape[1:]):
        raise ValueError(
            f"fake images {tuple(fake.shape[1:])} differ in shape from real {tuple(real.images.shape[1:])}"
        )
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(fake),
        input2=UInt8Images(real.images),
        input2_cache_name=reference_cache_name(real, extractor),
        fid=True,
        feature_extractor=extractor.name,
        feature_layer_fid=extractor.feature_layer,
        feature_extractor_weights_path=str(extractor.weights_path),
        cache=cache,
        cache_root=str(cache_root() / "fidelity"),
        batch_size=batch_size,
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        save_cpu_ram=True,  # no DataLoader worker processes: the data are already in memory
        verbose=False,
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])
