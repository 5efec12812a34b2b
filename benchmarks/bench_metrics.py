"""Scoring speed on real Fashion-MNIST: domain FD + KID + precision/recall, first vs second scoring.

    .venv/bin/pytest benchmarks/bench_metrics.py --benchmark-only -q -s

"first": 10,000 samples against the 60,000 training images with no cached reference (its features,
statistics, k-NN radii and KID kernel sums are computed); "second": the same call again, which must only
extract the samples' features and compute the fake side and cross terms. The domain extractor itself is
trained (or copied from the user's cache) before timing. Also: the smoke profile's classifier training.
"""

from __future__ import annotations

import shutil
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
def scoring(fmnist: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    train, _ = fmnist
    mp = pytest.MonkeyPatch()
    user_extractors = cache_root() / "extractors"
    cache = tmp_path_factory.mktemp("cache")
    if user_extractors.is_dir():
        shutil.copytree(user_extractors, cache / "extractors")
    mp.setenv("BENCH_CACHE", str(cache))
    yield domain_extractor(train, dataset="fmnist", epochs=2)
    mp.undo()


def test_domain_fidelity_first_vs_second(benchmark: Any, fmnist: Any, scoring: Any) -> None:
    train, test = fmnist
    fake = test.images[:N_FAKE]
    t0 = time.perf_counter()
    first = domain_fidelity(fake, train, extractor=scoring)
    first_s = time.perf_counter() - t0
    second = benchmark.pedantic(lambda: domain_fidelity(fake, train, extractor=scoring), rounds=3, iterations=1)
    second_s = benchmark.stats.stats.min
    assert {k: v["value"] for k, v in second.items()} == pytest.approx({k: v["value"] for k, v in first.items()})
    benchmark.extra_info.update(first_s=first_s, second_s=second_s, speedup=first_s / second_s)
    print(
        f"\ndomain FD+KID+PRC, {N_FAKE} samples vs {len(train)} fmnist ({torch.get_num_threads()} threads): "
        f"first {first_s:.2f} s, second {second_s:.2f} s (min of 3), {first_s / second_s:.1f}x"
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
