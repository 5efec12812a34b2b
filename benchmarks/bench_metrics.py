"""Scoring speed on real Fashion-MNIST: domain FD + KID + precision/recall, first vs second scoring.

    .venv/bin/pytest benchmarks/bench_metrics.py --benchmark-only -q -s

10,000 samples against the 60,000 training images. "cold": an empty cache, so the domain extractor is
trained and the reference computed (features, statistics, k-NN radii, KID kernel sums); "reference only":
the extractor cached, the reference computed; "second": the same call again, which only extracts the
samples' features and computes their side and the cross terms. Also: the smoke classifier training.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from bench.data import cache_root, load
from bench.errors import BenchError
from bench.metrics.downstream import downstream_accuracy
from bench.metrics.features import domain_extractor
from bench.metrics.fidelity import domain_fidelity

N_FAKE = 10_000


@pytest.fixture(scope="module")
def fmnist() -> tuple[Any, Any]:
    try:
        return load("fmnist", "train"), load("fmnist", "test")
    except BenchError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def test_domain_fidelity_first_vs_second(benchmark: Any, fmnist: Any, empty_cache: Any) -> None:
    train, test = fmnist
    fake = test.images[:N_FAKE]
    t0 = time.perf_counter()
    extractor = domain_extractor(train, dataset="fmnist", epochs=2)  # the smoke profile's extractor
    first = domain_fidelity(fake, train, extractor=extractor)
    cold_s = time.perf_counter() - t0
    for f in (cache_root() / "fidelity").glob("*realside*"):
        f.unlink()  # the reference again, with the extractor already trained
    t0 = time.perf_counter()
    domain_fidelity(fake, train, extractor=extractor)
    first_s = time.perf_counter() - t0
    second = benchmark.pedantic(lambda: domain_fidelity(fake, train, extractor=extractor), rounds=3, iterations=1)
    second_s = benchmark.stats.stats.min
    assert {k: v["value"] for k, v in second.items()} == pytest.approx({k: v["value"] for k, v in first.items()})
    benchmark.extra_info.update(cold_s=cold_s, first_s=first_s, second_s=second_s)
    print(
        f"\ndomain FD+KID+PRC, {N_FAKE} samples vs {len(train)} fmnist ({torch.get_num_threads()} threads): "
        f"cold cache (extractor trained, reference computed) {cold_s:.2f} s = {cold_s / second_s:.1f}x the second; "
        f"reference only {first_s:.2f} s = {first_s / second_s:.1f}x; second {second_s:.2f} s (min of 3)"
    )


def test_smoke_classifiers(benchmark: Any, fmnist: Any) -> None:
    train, test = fmnist
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:2000]
    classifiers = ("logreg", "mlp", "cnn")  # the smoke profile's set, 10 epochs on 2,000 samples
    out = benchmark.pedantic(
        lambda: downstream_accuracy(
            train.images[idx], train.labels[idx], test, seed=0, classifiers=classifiers, epochs=10
        ),
        rounds=1,
        iterations=1,
    )
    print(f"\nsmoke classifiers {classifiers} on 2,000 samples: {benchmark.stats.stats.min:.1f} s; "
          f"accuracy {[round(r['value'], 1) for r in out.values()]}")  # fmt: skip
