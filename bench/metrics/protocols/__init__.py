"""Downstream-classification protocols: one module per reference script, each a named, versioned object.

    dpdm      nv-tlabs/DPDM train_downstream_classifiers.py      acc_logreg, acc_mlp, acc_cnn
    datalens  AI-secure/DataLens evaluation/train-classifier-*   acc_cnn_datalens (test-selected ‡)
    sklearn   ParkLabML/DP-MERF code_balanced/synth_data_benchmark.py   acc_logreg_sklearn, acc_mlp_sklearn,
                                                                         acc_mean_sklearn
    dpimagebench  2019ChenGong/DPImageBench evaluation/evaluator.py   acc_resnet_dpimagebench, acc_wrn_dpimagebench,
                  (on request only: hours of GPU per run)            acc_resnext_dpimagebench, acc_max_dpimagebench,
                                                                     acc_mean_dpimagebench (mode val, the default:
                                                                     real validation records select, ∗ noise-free)

Every record names its protocol, version and reference (repository@commit:path), the classifier's
parameter count, optimiser, epochs, sample counts, the selection rule, the deviations from the reference,
and `shortened` ({setting: [reference, used]}) when a profile or the run's sample count made it cheaper
than the reference. A published cell (bench/reference/published_results.csv) names its protocol too:
`bench paper` sets ours beside it only when the two protocols are the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from bench import config as cfgmod
from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.metrics.protocols import datalens_protocol, dpdm_protocol, dpimagebench_protocol, sklearn_protocol
from bench.metrics.protocols.base import Context, Protocol, Record, resolve_settings

__all__ = [
    "METRIC_PROTOCOL",
    "ON_REQUEST",
    "ON_REQUEST_PROTOCOLS",
    "PROTOCOLS",
    "Context",
    "Protocol",
    "default_settings",
    "evaluate",
    "parse_settings",
]

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        dpdm_protocol.PROTOCOL,
        datalens_protocol.PROTOCOL,
        sklearn_protocol.PROTOCOL,
        dpimagebench_protocol.PROTOCOL,
    )
}
# our metric -> (protocol, classifier)
METRIC_PROTOCOL: dict[str, tuple[str, str]] = {
    metric: (p.name, classifier) for p in PROTOCOLS.values() for classifier, metric in p.metrics.items()
}
# metrics computed only when named (--metrics, a profile's `metrics`), never as part of "all": DPImageBench's
# ResNet-110/WRN-40-4/ResNeXt-29 × 50 epochs (CIFAR: 164/28-10/28 × 200) cost GPU-hours per run
ON_REQUEST_PROTOCOLS: frozenset[str] = frozenset({dpimagebench_protocol.PROTOCOL.name})
ON_REQUEST: frozenset[str] = frozenset(m for name in ON_REQUEST_PROTOCOLS for m in PROTOCOLS[name].metrics.values())


def default_settings() -> dict[str, Any]:
    """Every protocol at its reference settings."""
    return {name: p.Settings() for name, p in PROTOCOLS.items()}


def parse_settings(tables: Mapping[str, Any], where: str = "eval") -> dict[str, Any]:
    """Settings per protocol from profile tables ({"dpdm": {"epochs": 10}, ...}); unknown names are errors."""
    out = default_settings()
    for name, table in tables.items():
        if name not in PROTOCOLS:
            raise BenchError(f"{where}: unknown protocol {name!r}; protocols: {', '.join(PROTOCOLS)}")
        if isinstance(table, PROTOCOLS[name].Settings):
            out[name] = table
        elif isinstance(table, Mapping):
            out[name] = cfgmod.build_dataclass(PROTOCOLS[name].Settings, dict(table), f"{where}.{name}")
        else:
            raise BenchError(f"{where}.{name}: expected a table of settings, got {table!r}")
    return out


def evaluate(
    metrics: Collection[str],
    images: Tensor,
    labels: Tensor,
    test: ImageDataset,
    *,
    dataset: str,
    seed: int,
    settings: Mapping[str, Any] | None = None,
    device: torch.device,
    context: Context | None = None,
) -> dict[str, Record]:
    """Records of the accuracy `metrics` (names in METRIC_PROTOCOL) for uint8 `images` [N, C, H, W] with
    int64 `labels` [N], trained by their protocols under `settings` (default: the reference's) and tested
    on the real `test` split; `context` (the run's real training split and target ε) goes to the protocols
    that use it (dpimagebench's mode val). A record depends only on its metric, the data, the settings, the
    context and `seed`."""
    settings = default_settings() | dict(settings or {})
    train = ImageDataset(images=images, labels=labels, num_classes=test.num_classes)
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    out: dict[str, Record] = {}
    for name, classifiers in _by_protocol(metrics).items():
        p = PROTOCOLS[name]
        resolved, shortened = resolve_settings(p, settings[name], dataset=dataset, shape=shape,
                                               num_classes=test.num_classes)  # fmt: skip
        deviations = [*p.deviations, *p.dataset_deviations(dataset, shape, test.num_classes)]
        records = p.run(classifiers, train, test, settings=resolved, seed=seed, device=device,
                        context=context or Context())  # fmt: skip
        for classifier, rec in records.items():
            relevant = p.settings_of(classifier)
            short = {k: v for k, v in shortened.items() if relevant is None or k in relevant}
            rec["shortened"] = short | rec.get("shortened", {})
            rec["deviations"] = deviations
            rec["settings"] = resolved
            out[p.metrics[classifier]] = rec
    return {m: out[m] for m in metrics}


def check_resources(
    metrics: Collection[str], *, dataset: str, shape: tuple[int, int, int], num_classes: int,
    settings: Mapping[str, Any] | None = None, device: torch.device,
) -> None:  # fmt: skip
    """BenchError when a classifier behind the accuracy `metrics` cannot train on `device` under `settings` (resolved
    as `evaluate` resolves them): asked before a run's fit."""
    settings = default_settings() | dict(settings or {})
    for name, classifiers in _by_protocol(metrics).items():
        p = PROTOCOLS[name]
        resolved, _ = resolve_settings(p, settings[name], dataset=dataset, shape=shape, num_classes=num_classes)
        p.check_resources(classifiers, shape, num_classes, settings=resolved, device=device)


def _by_protocol(metrics: Collection[str]) -> dict[str, list[str]]:
    """{protocol: its classifiers} behind the accuracy `metrics`, in their order."""
    wanted: dict[str, list[str]] = {}
    for m in metrics:
        protocol, classifier = METRIC_PROTOCOL[m]
        wanted.setdefault(protocol, []).append(classifier)
    return wanted


def published_metric(published: str, protocol: str) -> str | None:
    """Our metric for a published metric name under one of our protocols (None: the protocol has none)."""
    return PROTOCOLS[protocol].published.get(published) if protocol in PROTOCOLS else None
