"""The Fréchet distance (FID with Inception-v3 features, FD with the domain CNN's): Heusel et al. 2017, computed by
torch-fidelity (`fid_features_to_statistics`, `fid_statistics_to_metric`, `calculate_metrics`).

`frechet` takes features and the real set's cached side (bench.metrics.realside); `frechet_distance` is the whole
torch-fidelity call on images, the plain library path the tests and benchmarks compare against.

Provenance: reproduces toshas/torch-fidelity@2e5d88dcd8f374602fc68be872e3d0aee11913e3:torch_fidelity/metric_fid.py
(`fid_features_to_statistics`, `fid_statistics_to_metric`, which we call; `frechet_distance` calls `calculate_metrics`).
Deviations: none in the estimator; the real side's statistics are cached by us (bench.metrics.realside) instead of by
torch-fidelity when features come from the domain extractor. (The commit is torch-fidelity v0.4.0, the version
pyproject.toml pins.)
"""

from __future__ import annotations

import numpy as np
import torch_fidelity
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from bench.contract import ImageDataset
from bench.metrics.features import DomainExtractor, UInt8Images, fidelity_call_options, reference_cache_name
from bench.metrics.realside import RealSide


def frechet(fake: Tensor, real: RealSide) -> float:
    stats = fid_features_to_statistics(fake.double().cpu())
    ref = {k: np.asarray(v, dtype=np.float64) for k, v in real.stats.items()}
    return float(fid_statistics_to_metric(stats, ref, verbose=False)[KEY_METRIC_FID])


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
        **fidelity_call_options(cache=cache, batch_size=batch_size, cuda=cuda),
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])
