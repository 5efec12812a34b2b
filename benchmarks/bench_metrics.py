"""Scoring speed on real Fashion-MNIST: domain FD + KID + precision/recall, first vs second scoring.

    .venv/bin/pytest benchmarks/bench_metrics.py --benchmark-only -q -s

10,000 samples against the 60,000 training images. "cold": an empty cache, so the domain extractor is
trained and the reference computed (features, statistics, k-NN radii, KID kernel sums); "reference only":
the extractor cached, the reference computed; "second": the same call again, which only extracts the
samples' features and computes their side and the cross terms. Also: the smoke classifier training, and
one epoch of DPDM's downstream CNN, ours against the reference script's DataLoader loop.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bench.data import cache_root, load
from bench.errors import BenchError
from bench.metrics.downstream import downstream_accuracy
from bench.metrics.features import domain_extractor, train_epoch
from bench.metrics.fidelity import domain_fidelity
from bench.metrics.protocols import dpdm_protocol as dpdm

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
    metrics = ("acc_logreg", "acc_mlp", "acc_cnn")  # the smoke profile's set: DPDM's protocol, 10 epochs, 2,000 samples
    settings = {"dpdm": dpdm.Settings(epochs=10)}
    out = benchmark.pedantic(
        lambda: downstream_accuracy(
            train.images[idx], train.labels[idx], test, dataset="fmnist", seed=0, metrics=metrics, settings=settings
        ),  # fmt: skip
        rounds=1,
        iterations=1,
    )
    print(f"\nsmoke classifiers {metrics} on 2,000 samples: {benchmark.stats.stats.min:.1f} s; "
          f"accuracy {[round(r['value'], 1) for r in out.values()]}")  # fmt: skip


def test_dpdm_cnn_epoch_ours_vs_reference_loop(benchmark: Any, fmnist: Any) -> None:
    """One training epoch of DPDM's CNN on 10,000 images: ours (uint8 in memory, channels-last) vs the
    reference script's loop (a DataLoader of float images without shuffle, x·2 − 1, NCHW), same network."""
    train, _ = fmnist
    images, labels = train.images[:10_000], train.labels[:10_000]

    def ours() -> None:
        model = dpdm.CNN((1, 28, 28), 10).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
        train_epoch(model, images, labels, optimizer, batch_size=128, generator=None, prepare=dpdm.prepare_cnn)

    floats = TensorDataset(images.float() / 255.0, labels)  # ToTensor-like [0, 1], as FolderDataset's x / 255

    def reference() -> None:
        model = dpdm.CNN((1, 28, 28), 10)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
        model.train()
        for x, y in DataLoader(floats, batch_size=128):  # train_model's loop
            optimizer.zero_grad()
            F.cross_entropy(model(x * 2.0 - 1.0), y).backward()
            optimizer.step()

    reference()  # warm-up
    t_ref = min(_timed(reference) for _ in range(3))
    benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=1)
    t_ours = benchmark.stats.stats.min
    benchmark.extra_info.update(reference_s=t_ref, ours_s=t_ours)
    print(f"\nDPDM CNN, one epoch of 10,000 images ({torch.get_num_threads()} threads): ours {t_ours:.2f} s, "
          f"reference loop {t_ref:.2f} s: {t_ref / t_ours:.2f}x")  # fmt: skip


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
