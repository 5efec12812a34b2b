"""Metrics, computed by the harness for every method's samples (see EVALUATION.md).

`evaluate` returns one record per metric: its value and how it was computed (extractor or protocol,
sample counts, reference split), because numbers computed differently are not comparable.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.contract import DataSpec, ImageDataset
from bench.errors import BenchError
from bench.metrics.downstream import classifier_seeds, downstream_accuracy, over_seeds
from bench.metrics.features import domain_extractor
from bench.metrics.fidelity import domain_fidelity
from bench.metrics.inception import inception_metrics

__all__ = ["METRICS", "EvalSettings", "accuracy_classifiers", "check_samples", "evaluate", "select_metrics"]

# Every metric `evaluate` computes, with how it is computed (shown by `bench list`). Metrics that one
# library call computes together share a group: (group, the group's own name for it).
METRICS: dict[str, str] = {
    "fd_domain": "Fréchet distance to the real training set in the features of a small CNN trained on it "
    "(bench-domain-cnn; offline, not comparable with Inception FID)",
    "kid_domain": "kernel inception distance on the same domain features",
    "precision_domain": "precision (k=3 manifolds) on the same domain features",
    "recall_domain": "recall (k=3 manifolds) on the same domain features",
    "fid_inception": "standard FID: torch-fidelity inception-v3-compat features vs the real training set",
    "kid_inception": "KID on Inception features",
    "is_inception": "Inception score",
    "precision_inception": "precision (k=3) on Inception features",
    "recall_inception": "recall (k=3) on Inception features",
    "acc_logreg": "real test accuracy (%) of logistic regression trained on the samples (DPDM protocol: epoch "
    "chosen on held-out samples)",
    "acc_mlp": "real test accuracy (%) of an MLP trained on the samples (DPDM protocol)",
    "acc_cnn": "real test accuracy (%) of a CNN trained on the samples (DPDM protocol)",
    "acc_cnn_datalens": "best real test accuracy (%) over epochs of the DataLens/DPGEN CNN: test-selected, "
    "for comparison with published tables only",
}
_GROUPS: dict[str, tuple[str, str]] = {
    "fd_domain": ("domain", "fd"),
    "kid_domain": ("domain", "kid"),
    "precision_domain": ("domain", "prc"),
    "recall_domain": ("domain", "prc"),
    "fid_inception": ("inception", "fid"),
    "kid_inception": ("inception", "kid"),
    "is_inception": ("inception", "isc"),
    "precision_inception": ("inception", "prc"),
    "recall_inception": ("inception", "prc"),
    "acc_logreg": ("accuracy", "logreg"),
    "acc_mlp": ("accuracy", "mlp"),
    "acc_cnn": ("accuracy", "cnn"),
    "acc_cnn_datalens": ("accuracy", "cnn_datalens"),
}


def accuracy_classifiers(wanted: Collection[str]) -> list[str]:
    """The downstream classifiers (bench.metrics.downstream names) behind the wanted accuracy metrics."""
    return _group(wanted, "accuracy")


def _group(wanted: Collection[str], group: str) -> list[str]:
    """The group's own names of the wanted metrics that belong to `group` (deduplicated, in order)."""
    return list(dict.fromkeys(_GROUPS[m][1] for m in wanted if _GROUPS[m][0] == group))


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    epochs: int = 50  # downstream CNN epochs (DPDM protocol, paper: 50)
    batch_size: int = 128  # downstream CNN minibatch
    val_fraction: float = 0.1  # share of the synthetic samples held out for epoch selection
    extractor_epochs: int = 5  # domain extractor training epochs; part of its cache key
    feature_batch_size: int = 256  # feature extraction batch (does not change the result)
    classifier_seeds: int = 1  # downstream classifiers trained per run, each with its own seed

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "extractor_epochs", "feature_batch_size", "classifier_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def select_metrics(names: Collection[str] | None) -> tuple[str, ...]:
    """Validate metric names (None: all of them), in METRICS order."""
    if names is None:
        return tuple(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise BenchError(f"unknown metric {unknown[0]!r}; available: {', '.join(METRICS)}")
    return tuple(n for n in METRICS if n in set(names))


def check_samples(images: Any, labels: Any, *, spec: DataSpec, conditional: bool) -> None:
    """Refuse samples a metric must not score: wrong dtype, shape or label range (one-line BenchError)."""
    expected = (spec.channels, spec.height, spec.width)
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise BenchError(f"samples must be uint8 images, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise BenchError(f"samples must have shape [N, {', '.join(map(str, expected))}], got {list(images.shape)}")
    if len(images) == 0:
        raise BenchError("samples are empty")
    if not conditional:
        return
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise BenchError(f"labels must be integers, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (len(images),):
        raise BenchError(f"labels must have shape [{len(images)}], got {list(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes:
        raise BenchError(f"labels must be in 0..{spec.num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")


def evaluate(
    images: Tensor,
    labels: Tensor | None,
    *,
    dataset: str,
    train: ImageDataset,
    test: ImageDataset,
    seed: int,
    settings: EvalSettings = EvalSettings(),
    device: torch.device | str = "cpu",
    metrics: Collection[str] | None = None,
    inception_weights: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Score generated uint8 `images` [N, C, H, W] with int64 `labels` [N] (None: unconditional).

    `metrics` names entries of METRICS (None: all). Fidelity is measured against the real `train`
    split, in the domain CNN's features and in Inception's (records "unavailable" with value None when
    no Inception weights are found: `inception_weights`, $BENCH_INCEPTION_WEIGHTS or torch-fidelity's
    cache); accuracy on the real `test` split. `seed` seeds the downstream classifiers (`settings.classifier_seeds`
    > 1: more seeds derived from it, records averaged, values kept in `per_seed`); the domain extractor has
    its own fixed seed.
    """
    wanted = select_metrics(metrics)
    n_gen = len(images)
    cuda = torch.device(device).type == "cuda"
    results: dict[str, dict[str, Any]] = {}
    if domain := _group(wanted, "domain"):
        t0 = time.perf_counter()
        extractor = domain_extractor(train, dataset=dataset, epochs=settings.extractor_epochs, device=device)
        records = domain_fidelity(
            images, train, extractor=extractor, metrics=domain, batch_size=settings.feature_batch_size, cuda=cuda
        )
        results |= _timed_records(records, t0)
    if inception := _group(wanted, "inception"):
        t0 = time.perf_counter()
        records = inception_metrics(
            images, train, weights=inception_weights, metrics=inception, cuda=cuda, cache_name=f"{dataset}-train"
        )
        results |= _timed_records(records, t0)
    if classifiers := _group(wanted, "accuracy"):
        if labels is None:
            for c in classifiers:
                results[f"acc_{c}"] = {"value": None, "n_gen": n_gen, "note": "n/a: unconditional method"}
        else:
            records = over_seeds(
                [
                    downstream_accuracy(
                        images,
                        labels,
                        test,
                        seed=classifier_seed,
                        classifiers=classifiers,
                        epochs=settings.epochs,
                        batch_size=settings.batch_size,
                        val_fraction=settings.val_fraction,
                        device=device,
                    )
                    for classifier_seed in classifier_seeds(seed, settings.classifier_seeds)
                ]
            )
            results |= {name: rec | {"n_gen": n_gen} for name, rec in records.items()}
    return {m: results[m] for m in wanted if m in results}


def _timed_records(records: dict[str, dict[str, Any]], t0: float) -> dict[str, dict[str, Any]]:
    """Stamp the seconds a group of metrics took on each of its records."""
    seconds = round(time.perf_counter() - t0, 3)
    return {name: {**rec, "seconds": seconds} for name, rec in records.items()}
