"""Downstream classification utility: train classifiers on synthetic labelled images, test on real data.

Each accuracy metric belongs to one protocol (bench.metrics.protocols), which reproduces one reference
script: `dpdm` (nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:train_downstream_classifiers.py;
acc_logreg, acc_mlp, acc_cnn; the epoch is chosen on generated samples, no private data selects anything),
`datalens` (AI-secure/DataLens@72d0f2fe89aeee2e5a043c17b3de09e0023f94a6:evaluation/; acc_cnn_datalens:
best real test accuracy over epochs, test-selected and marked so), `sklearn`
(ParkLabML/DP-MERF@e4ae72dfba3941dec2ae3ffa7025afedeeb858cd:code_balanced/synth_data_benchmark.py) and
`dpimagebench` (2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:evaluation/evaluator.py;
computed only when named; its default mode selects on real validation records carved from `real_train`, the
run's real training split, with Laplace noise of scale 1/`epsilon`, the run's target ε).
This module checks the inputs, runs the
protocols once per classifier seed, pools the seeds, and caches the "real data" row (`real_reference`).

Every record depends only on its metric, the data, the protocol settings and the seed (initialisation,
minibatch order, dropout and sklearn's random_state all come from the seed; the global RNG is left as it
was), not on which other metrics are requested.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from bench.contract import ImageDataset
from bench.data import cache_root, file_stem
from bench.errors import BenchError
from bench.metrics import protocols
from bench.metrics.features import fingerprint

VERSION = 2  # bump when the real-reference cache layout changes (protocol versions are keyed separately)
CLASSIFIER_SEED_STRIDE = 100_003  # classifier seed j of a run: run seed + j · stride (j = 0: the run seed)
# the default: every accuracy metric but the on-request ones (dpimagebench's), which run only when named
ACCURACY_METRICS = tuple(m for m in protocols.METRIC_PROTOCOL if m not in protocols.ON_REQUEST)


def downstream_accuracy(
    images: Tensor,
    labels: Tensor,
    test: ImageDataset,
    *,
    dataset: str,
    seed: int,
    metrics: Collection[str] = ACCURACY_METRICS,
    settings: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    real_train: ImageDataset | None = None,
    epsilon: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the classifiers behind the accuracy `metrics` on uint8 `images` [N, C, H, W] with int64
    `labels` [N] under their protocols (`settings`: per protocol, default the reference's); score on the
    real `test` split. `real_train` (the real training split) and `epsilon` (the run's target ε, math.inf when
    non-private) reach the protocols that use them (dpimagebench's mode val). Returns {metric: record} in the
    order of `metrics` (see bench.metrics.protocols)."""
    names = _check_metrics(metrics)
    _check_inputs(images, labels, test)
    return protocols.evaluate(
        names, images, labels, test, dataset=dataset, seed=seed, settings=settings, device=torch.device(device),
        context=protocols.Context(real_train=real_train, epsilon=epsilon),
    )  # fmt: skip


def real_reference(
    train: ImageDataset,
    test: ImageDataset,
    *,
    dataset: str,
    seed: int,
    metrics: Collection[str] = ACCURACY_METRICS,
    settings: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """`downstream_accuracy` of the protocols trained on the real `train` split: the "real data" row.
    A protocol that validates on real records (dpimagebench's mode val) carves them out of `train` as well,
    without noise (ε = ∞: the row is not private), so they are among the records its classifiers train on.

    Each metric's record is cached as JSON in $BENCH_CACHE/downstream, keyed by dataset, the train and
    test fingerprints, the metric, its protocol's name, version and settings, the seed and VERSION; a
    cached record is returned as it was stored (with the seconds its training took).
    """
    names = _check_metrics(metrics)
    _check_inputs(train.images, train.labels, test)
    settings = protocols.default_settings() | dict(settings or {})
    data_key = f"{file_stem(dataset)}-{fingerprint(train)}-{fingerprint(test)}"
    folder = cache_root() / "downstream"
    paths = {}
    for name in names:
        protocol = protocols.PROTOCOLS[protocols.METRIC_PROTOCOL[name][0]]
        how = json.dumps([protocol.name, protocol.version, repr(settings[protocol.name])]).encode()
        paths[name] = folder / f"{data_key}-{name}-{hashlib.sha256(how).hexdigest()[:12]}-s{seed}-v{VERSION}.json"
    results = {name: _load(path) for name, path in paths.items()}
    missing = [name for name, record in results.items() if record is None]
    if missing:  # in one call: classifiers two metrics share (sklearn's LogReg and its mean) train once
        fresh = downstream_accuracy(train.images, train.labels, test, dataset=dataset, seed=seed, metrics=missing,
                                    settings=settings, device=device, real_train=train, epsilon=math.inf)  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        for name in missing:
            record = results[name] = fresh[name] | {"reference_data": "real train split"}
            tmp = paths[name].with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, paths[name])  # atomic: a concurrent reader never sees half a file
    return {name: record for name, record in results.items() if record is not None}


def classifier_seeds(run_seed: int, count: int) -> list[int]:
    """The classifier seeds of a run: its own seed first, then `count` - 1 more derived from it."""
    if count < 1:
        raise BenchError(f"classifier_seeds must be >= 1, got {count}")
    return [run_seed + CLASSIFIER_SEED_STRIDE * j for j in range(count)]


def over_seeds(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One record per metric from its records under several classifier seeds (same metrics each).

    value: the mean (None if a seed has none); per_seed: the values, in seed order (the report's mean ± std
    counts each one); per_class: the mean per class; curve and selected_epoch: lists, one entry per seed;
    seconds: the sum.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, first in per_seed[0].items():
        records = [r[name] for r in per_seed]
        values = [r["value"] for r in records]
        classes = zip(*(r["per_class"] for r in records), strict=True)
        out[name] = first | {
            "value": None if None in values else sum(values) / len(values),
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


def _check_metrics(metrics: Collection[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(dict.fromkeys(metrics))
    unknown = [n for n in names if n not in protocols.METRIC_PROTOCOL]
    if unknown or not names:
        raise BenchError(
            f"unknown accuracy metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"valid: {', '.join(protocols.METRIC_PROTOCOL)}"
        )
    return names


def _check_inputs(images: Tensor, labels: Tensor, test: ImageDataset) -> None:
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
