"""DP-MERF: the sensitivity of the released embedding, the noise actually added, post-processing, resume."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from bench.baselines import dpmerf

from bench import config
from bench.contract import ImageDataset, NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import N_DIVIDES_THE_RELEASE, Budget, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def make(train, eps: float = 10.0, **sets: Any) -> tuple[dpmerf.DPMERF, Budget]:
    cls = registry.get("dpmerf")
    cfg, _ = config.resolve(cls.Config, profile=config.load_profile(TINY_PROFILE), method="dpmerf",
                            dataset="synthetic", epsilon=eps, sets=sets)  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: dpmerf.DPMERF, train, budget: Budget, progress=None, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed),
                      progress=progress or NullProgress())  # fmt: skip


def test_adding_or_removing_one_record_moves_the_sum_by_exactly_one(train) -> None:
    """Δ₂S = 1 under add/remove, for any record: black, white, noise, any label, narrow or wide kernel."""
    g = torch.Generator().manual_seed(3)
    extremes = torch.stack([torch.zeros(1, 16, 16), torch.full((1, 16, 16), 255.0)]).to(torch.uint8)
    records = torch.cat([extremes, torch.randint(0, 256, (30, 1, 16, 16), generator=g, dtype=torch.uint8)])
    base = train.subset(torch.arange(200))
    for sigma2 in (0.01, 20.0, 127.0):
        w = torch.randn(300, 256, generator=g) / math.sqrt(sigma2)
        s = dpmerf.sum_embedding(base, w, CPU)
        for i, x in enumerate(records):
            y = torch.tensor([i % 10])
            more = ImageDataset(torch.cat([base.images, x[None]]), torch.cat([base.labels, y]), 10)
            change = torch.linalg.matrix_norm(dpmerf.sum_embedding(more, w, CPU) - s)
            assert float(change) == pytest.approx(1.0, abs=1e-4), (sigma2, i)


def test_the_noise_actually_added_is_the_ledgers(train) -> None:
    method, budget = make(train, d_rff=4000)  # 4000 × 10 draws: the std is known to about 1%
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    assert (stage.mechanism, stage.count) == ("gaussian", 1)
    assert ledger.assumptions == [N_DIVIDES_THE_RELEASE]  # N divides the release: the card says so
    assert "add/remove" in stage.to_dict()["sensitivity"]  # the card says which adjacency σ is calibrated for
    assert epsilon(ledger, budget.delta, budget.accountant) == pytest.approx(10.0, rel=1e-3)
    exact = dpmerf.sum_embedding(train, method.w, CPU)
    noise = method.noisy_mean * len(train) - exact  # what fit released, minus the exact sum
    assert float(noise.std()) == pytest.approx(stage.noise_multiplier, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * stage.noise_multiplier
    # a fixed σ is used as given (and charged as given)
    fixed, _ = make(train, noise_multiplier=3.0)
    assert fit(fixed, train, budget).stages[0].noise_multiplier == 3.0
    # the reference's replace-one noise: twice σ(ε) on the sum, charged as such (ε below the target)
    ro, _ = make(train, d_rff=4000, adjacency="replace-one")
    ro_ledger = fit(ro, train, budget)
    assert ro_ledger.stages[0].noise_multiplier == pytest.approx(2 * stage.noise_multiplier)
    assert epsilon(ro_ledger, budget.delta, budget.accountant) < 0.6 * 10.0
    ro_noise = ro.noisy_mean * len(train) - dpmerf.sum_embedding(train, ro.w, CPU)
    assert float(ro_noise.std()) == pytest.approx(2 * stage.noise_multiplier, rel=0.03)


def test_training_reads_the_private_data_once_through_the_release(train, monkeypatch) -> None:
    calls = []
    real = dpmerf.sum_embedding
    monkeypatch.setattr(
        dpmerf, "sum_embedding", lambda data, w, device: calls.append(len(data)) or real(data, w, device)
    )

    class Touched(ImageDataset):
        reads = 0

        def __getattribute__(self, name: str) -> Any:
            if name in ("images", "labels"):
                type(self).reads += 1
            return super().__getattribute__(name)

    spy = Touched(train.images, train.labels, train.num_classes)
    method, budget = make(train)
    Touched.reads = 0
    fit(method, spy, budget)
    assert calls == [len(train)]  # one embedding pass over all the records
    steps = method.config.epochs * (len(train) // method.config.batch_size)
    assert Touched.reads <= 10 < steps  # a handful of reads for the pass, none per generator step


def test_resume_continues_from_the_checkpoint_without_a_second_release(train, monkeypatch) -> None:
    whole, budget = make(train)
    interrupted = InterruptAt(40)
    ledger = fit(whole, train, budget, interrupted)
    assert interrupted.saved is not None and interrupted.saved["step"] == 40
    releases = []
    real = dpmerf.sum_embedding
    monkeypatch.setattr(dpmerf, "sum_embedding", lambda *a: releases.append(1) or real(*a))
    resumed, _ = make(train)
    again = fit(resumed, train, budget, InterruptAt(0, interrupted.saved), seed=7)  # another seed: the checkpoint rules
    assert releases == []  # the noisy embedding came from the checkpoint, not from a new draw
    assert again.stages == ledger.stages
    assert torch.equal(resumed.noisy_mean, whole.noisy_mean)
    labels = torch.arange(20) % 10
    a = whole.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    b = resumed.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"d_rff": 301}, "d_rff must be an even number >= 2"),
        ({"d_rff": 0}, "d_rff must be an even number"),
        ({"rff_sigma2": 0.0}, "rff_sigma2 must be a finite number > 0"),
        ({"rff_sigma2": -127.0}, "rff_sigma2 must be a finite number > 0"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
    ],
)
def test_bad_config_is_a_one_line_error(train, sets, message) -> None:
    with pytest.raises(BenchError, match=message) as e:
        make(train, **sets)
    assert "\n" not in str(e.value)


def test_missing_kernel_width_names_the_authors_values(train) -> None:
    cls = registry.get("dpmerf")
    method = cls(cls.Config(), spec=train.spec, device=CPU)
    with pytest.raises(BenchError, match="rff_sigma2 is not set .*105 for MNIST and 127 for Fashion-MNIST"):
        fit(method, train, Budget.for_records(1.0, len(train)))
    bad = ImageDataset(torch.zeros(4, 1, 18, 18, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), 10)
    with pytest.raises(BenchError, match="sides divisible by 4, got 18×18"):
        cls(cls.Config(), spec=bad.spec, device=CPU)
