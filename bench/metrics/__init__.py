"""Metrics, computed by the harness for every method's samples (see docs/evaluation.md).

`evaluate` returns one record per metric: its value and how it was computed (extractor or protocol,
sample counts, reference split), because numbers computed differently are not comparable.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bench.contract import DataSpec, ImageDataset
from bench.data import file_stem
from bench.errors import BenchError
from bench.metrics.downstream import classifier_seeds, downstream_accuracy, over_seeds
from bench.metrics.features import domain_extractor
from bench.metrics.fidelity import domain_fidelity
from bench.metrics.inception import FID_PROTOCOL, fid_protocol_fields, inception_metrics
from bench.metrics.protocols import METRIC_PROTOCOL, PROTOCOLS, default_settings, parse_settings
from bench.metrics.protocols import ON_REQUEST as PROTOCOL_ON_REQUEST
from bench.metrics.protocols import check_resources as check_protocol_resources

__all__ = [
    "METRICS",
    "ON_REQUEST",
    "EvalSettings",
    "accuracy_metrics",
    "check_resources",
    "check_samples",
    "evaluate",
    "metric_protocol",
    "published_metric",
    "select_metrics",
]

# Every metric `evaluate` computes, with how it is computed (shown by `bench list`). Metrics that one
# library call computes together share a group: (group, the group's own name for it).
METRICS: dict[str, str] = {
    "fd_domain": "Fréchet distance to the real training set in the features of a small CNN trained on it "
    "(bench-domain-cnn; offline, not comparable with Inception FID)",
    "kid_domain": "kernel inception distance on the same domain features",
    "precision_domain": "precision (k=3 manifolds) on the same domain features",
    "recall_domain": "recall (k=3 manifolds) on the same domain features",
    "fid_inception": "standard FID: torch-fidelity inception-v3-compat features vs the real training set "
    "(protocol dpdm: DPDM's compute_fid; papers: 60,000 samples)",
    "kid_inception": "KID on Inception features",
    "is_inception": "Inception score",
    "precision_inception": "precision (k=3) on Inception features",
    "recall_inception": "recall (k=3) on Inception features",
    "acc_logreg": "real test accuracy (%) of logistic regression trained on the samples (protocol dpdm: DPDM's "
    "script, epoch chosen on generated samples)",
    "acc_mlp": "real test accuracy (%) of the MLP 784-100-10 trained on the samples (protocol dpdm)",
    "acc_cnn": "real test accuracy (%) of DPDM's CNN (32/64/128 channels) trained on the samples (protocol dpdm)",
    "acc_cnn_datalens": "best real test accuracy (%) over epochs of the DataLens CNN (protocol datalens): "
    "test-selected, for comparison with published tables only",
    "acc_logreg_sklearn": "real test accuracy (%) of scikit-learn's logistic regression (protocol sklearn: "
    "DP-MERF's benchmark)",
    "acc_mlp_sklearn": "real test accuracy (%) of scikit-learn's MLPClassifier (protocol sklearn)",
    "acc_mean_sklearn": "mean real test accuracy (%) of DP-MERF's twelve classifiers (protocol sklearn)",
    "acc_resnet_dpimagebench": "real test accuracy (%) of DPImageBench's ResNet-110 (CIFAR: 164) trained on the "
    "samples (protocol dpimagebench; on request only): epoch chosen on real validation records, by default "
    "without noise as DPImageBench reports it (∗ not private)",
    "acc_wrn_dpimagebench": "the same for its WRN-40-4 (CIFAR: WRN-28-10) (protocol dpimagebench; on request only)",
    "acc_resnext_dpimagebench": "the same for its ResNeXt-29 (CIFAR: 28), run up to 32 px only (protocol "
    "dpimagebench; on request only)",
    "acc_max_dpimagebench": "max over DPImageBench's classifiers at this resolution: the statistic of its README "
    "table (protocol dpimagebench; on request only)",
    "acc_mean_dpimagebench": "mean (record: std) over DPImageBench's classifiers, as its evaluator logs them "
    "(protocol dpimagebench; on request only)",
}
# computed only when named (--metrics or a profile's `metrics`), never as part of "all"
ON_REQUEST = frozenset(m for m in METRICS if m in PROTOCOL_ON_REQUEST)
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
    **{metric: ("accuracy", metric) for metric in METRIC_PROTOCOL},
}


def metric_protocol(metric: str) -> str | None:
    """The protocol (reference code) our metric reproduces; None for bench's own metrics (domain, KID, ...)."""
    if metric in METRIC_PROTOCOL:
        return METRIC_PROTOCOL[metric][0]
    return FID_PROTOCOL if metric == "fid_inception" else None


def published_metric(published: str, protocol: str) -> str | None:
    """Our metric that computes the published metric `published` under our protocol `protocol`, if any."""
    if protocol == FID_PROTOCOL and published == "fid_inception":
        return "fid_inception"
    return PROTOCOLS[protocol].published.get(published) if protocol in PROTOCOLS else None


def accuracy_metrics(wanted: Collection[str]) -> list[str]:
    """The downstream accuracy metrics (bench.metrics.protocols) among the wanted metrics."""
    return _group(wanted, "accuracy")


def _group(wanted: Collection[str], group: str) -> list[str]:
    """The group's own names of the wanted metrics that belong to `group` (deduplicated, in order)."""
    return list(dict.fromkeys(_GROUPS[m][1] for m in wanted if _GROUPS[m][0] == group))


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    extractor_epochs: int = 5  # domain extractor training epochs; part of its cache key
    feature_batch_size: int = 256  # feature extraction batch (does not change the result)
    classifier_seeds: int = 1  # downstream classifiers trained per run, each with its own seed
    fidelity_samples: int | None = None  # fidelity scores the first N samples (None: all); papers: 60,000
    # what the real-data row's classifiers train on: "split" (the whole real training split, as the papers'
    # real rows) or "n_gen" (a seeded random subset as large as each run's samples: the same training-set
    # size as the synthetic rows, a fair ceiling for a shortened protocol)
    real_train: str = "split"
    # per downstream protocol, its Settings (None fields: the reference's values); a profile's [eval.dpdm]
    # table or `--set eval.dpdm.epochs=10` shortens one, and its records say so
    protocols: dict[str, Any] = field(default_factory=default_settings)
    # the quality-against-compute curve (bench.grid.curve): `curve` checkpoints evenly spaced over each fit's units of
    # progress (0: none), each scored on `curve_n` samples with `curve_metrics`; None: bench.grid.curve's defaults,
    # resolved when the grid is planned (bench.grid.curve.eval_json, which also keeps them out of a plan without a
    # curve)
    curve: int = 0
    curve_n: int | None = None
    curve_metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("extractor_epochs", "feature_batch_size", "classifier_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_curve()
        if self.fidelity_samples is not None and self.fidelity_samples < 1:
            raise ValueError(f"fidelity_samples must be >= 1, got {self.fidelity_samples}")
        if self.real_train not in ("split", "n_gen"):
            raise ValueError(f"real_train must be 'split' or 'n_gen', got {self.real_train!r}")
        object.__setattr__(self, "protocols", parse_settings(self.protocols))

    def _check_curve(self) -> None:
        if isinstance(self.curve, bool) or not isinstance(self.curve, int) or self.curve < 0:
            raise ValueError(f"curve must be an integer >= 0 (checkpoints scored along each fit), got {self.curve!r}")
        if self.curve_n is not None and self.curve_n < 1:
            raise ValueError(f"curve_n must be >= 1 (samples per curve point), got {self.curve_n}")
        if self.curve_metrics is not None:
            names = tuple(self.curve_metrics)  # a list from a run's config.json
            if not names:
                raise ValueError("curve_metrics must name at least one metric")
            if bad := next((n for n in names if n not in METRICS), None):
                raise ValueError(f"curve_metrics: unknown metric {bad!r}; available: {', '.join(METRICS)}")
            object.__setattr__(self, "curve_metrics", names)


def select_metrics(names: Collection[str] | None) -> tuple[str, ...]:
    """Validate metric names (None: all of them but the ON_REQUEST ones), in METRICS order."""
    if names is None:
        return tuple(m for m in METRICS if m not in ON_REQUEST)
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


def check_resources(
    dataset: str, spec: DataSpec, *, settings: EvalSettings, device: torch.device, metrics: Collection[str] | None
) -> None:
    """BenchError when a downstream classifier behind `metrics` (as `evaluate` selects them) cannot train on
    `device` on `dataset`'s images: bench.grid.runner asks before a run's fit, not after it."""
    if accuracy := accuracy_metrics(select_metrics(metrics)):
        shape = (spec.channels, spec.height, spec.width)
        check_protocol_resources(accuracy, dataset=dataset, shape=shape, num_classes=spec.num_classes,
                                 settings=settings.protocols, device=torch.device(device))  # fmt: skip


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
    epsilon: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Score generated uint8 `images` [N, C, H, W] with int64 `labels` [N] (None: unconditional).

    `metrics` names entries of METRICS (None: all but the ON_REQUEST ones). `epsilon` is the run's target ε
    (math.inf: non-private), the scale 1/ε of the Laplace noise of the dpimagebench protocol's selection, which
    also carves its validation records out of `train`. Fidelity is measured against the real `train`
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
    n_fid = min(n_gen, settings.fidelity_samples or n_gen)
    fid_images = images[:n_fid]  # generation order: the first n of balanced labels are balanced
    about = {"n_gen": n_fid, "labels": label_distribution(None if labels is None else labels[:n_fid]),
             "quantisation": QUANTISATION}  # fmt: skip
    if domain := _group(wanted, "domain"):
        t0 = time.perf_counter()
        extractor = domain_extractor(train, dataset=dataset, epochs=settings.extractor_epochs, device=device)
        records = domain_fidelity(
            fid_images, train, extractor=extractor, metrics=domain, batch_size=settings.feature_batch_size, cuda=cuda
        )
        results |= _timed_records(records, t0, about)
    if inception := _group(wanted, "inception"):
        t0 = time.perf_counter()
        records = inception_metrics(
            fid_images, train, weights=inception_weights, metrics=inception, cuda=cuda,
            cache_name=f"{file_stem(dataset)}-train",
        )  # fmt: skip
        results |= _timed_records(records, t0, about)
        if "fid_inception" in results:
            results["fid_inception"] |= fid_protocol_fields(dataset, n_fid)
    if accuracy := _group(wanted, "accuracy"):
        if labels is None:
            for m in accuracy:
                results[m] = {"value": None, "n_gen": n_gen, "note": "n/a: unconditional method"}
        else:
            records = over_seeds(
                [
                    downstream_accuracy(
                        images,
                        labels,
                        test,
                        dataset=dataset,
                        seed=classifier_seed,
                        metrics=accuracy,
                        settings=settings.protocols,
                        device=device,
                        real_train=train,
                        epsilon=epsilon,
                    )
                    for classifier_seed in classifier_seeds(seed, settings.classifier_seeds)
                ]
            )
            results |= {
                name: rec | {"n_gen": n_gen, "labels": label_distribution(labels)} for name, rec in records.items()
            }
    return {m: results[m] for m in wanted if m in results}


QUANTISATION = "uint8 as the method released it (bench's methods: round((x + 1) · 127.5))"


def label_distribution(labels: Tensor | None) -> str:
    """How the scored samples' labels are spread over the classes, in words."""
    if labels is None:
        return "unconditional (no labels)"
    counts = torch.bincount(labels.long())
    counts = counts[counts > 0]
    lo, hi = int(counts.min()), int(counts.max())
    return f"balanced: {lo} per class" if lo == hi else f"{len(counts)} classes, {lo}–{hi} per class"


def _timed_records(records: dict[str, dict[str, Any]], t0: float, about: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Stamp the seconds a group of metrics took, and what was scored, on each of its records."""
    seconds = round(time.perf_counter() - t0, 3)
    return {name: {**rec, **about, "seconds": seconds} for name, rec in records.items()}
