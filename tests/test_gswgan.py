"""GS-WGAN: the sanitiser's sensitivity, a record changing only its own discriminator, the noise actually added
against the ledger, the count of charged steps, the reference's own analysis, resume, bad settings."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from bench.baselines import gswgan

from bench import config
from bench.contract import ImageDataset, NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import Budget, Stage, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def make(train, eps: float = 10.0, **sets: Any) -> tuple[gswgan.GSWGAN, Budget]:
    cls = registry.get("gswgan")
    cfg, _ = config.resolve(cls.Config, profile=config.load_profile(TINY_PROFILE), method="gswgan",
                            dataset="synthetic", epsilon=eps, sets=sets)  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: gswgan.GSWGAN, train, budget: Budget, progress=None, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed),
                      progress=progress or NullProgress())  # fmt: skip


class Spy:
    """Wraps gswgan.sanitize: keeps each step's clipped gradients (before noise) and the noise added."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clipped: list[torch.Tensor] = []
        self.noise: list[torch.Tensor] = []
        real = gswgan.sanitize

        def spy(grad: torch.Tensor, *, clip: float, noise_std: float, generator: torch.Generator) -> torch.Tensor:
            flat = grad.flatten(1)
            clipped = flat * (clip / (flat.norm(dim=1) + 1e-10)).clamp(max=1.0).unsqueeze(1)
            out = real(grad, clip=clip, noise_std=noise_std, generator=generator)
            self.clipped.append(clipped.detach().clone())
            self.noise.append((out.flatten(1) - clipped).detach().clone())
            return out

        monkeypatch.setattr(gswgan, "sanitize", spy)


def test_sanitised_gradients_move_by_at_most_2c_over_root_b() -> None:
    """Each row clipped to C/B; two arbitrary batches of B gradients differ by ≤ 2(C/B)√B, exactly in the worst case."""
    g = torch.Generator().manual_seed(0)
    B, clip = 8, 1.0 / 8
    quiet = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 1e3):
        a = torch.randn(B, 1, 4, 4, generator=g) * scale
        b = torch.randn(B, 1, 4, 4, generator=g) * scale
        sa = gswgan.sanitize(a, clip=clip, noise_std=0.0, generator=quiet).flatten(1)
        sb = gswgan.sanitize(b, clip=clip, noise_std=0.0, generator=quiet).flatten(1)
        assert float(sa.norm(dim=1).max()) <= clip * (1 + 1e-6)
        assert float((sa - sb).norm()) <= 2 * clip * math.sqrt(B) * (1 + 1e-6)
    worst = torch.randn(B, 1, 4, 4, generator=g) * 5  # every row beyond C/B, and its opposite
    diff = gswgan.sanitize(worst, clip=clip, noise_std=0.0, generator=quiet) - gswgan.sanitize(
        -worst, clip=clip, noise_std=0.0, generator=quiet
    )
    assert float(diff.norm()) == pytest.approx(2 * clip * math.sqrt(B), rel=1e-6)


def test_a_record_changes_only_its_own_discriminator(train, monkeypatch) -> None:
    """Adding one record: the partition of the others and every other discriminator's warm start are unchanged, the
    generator steps before x's discriminator first serves are bit-identical, and that step moves by ≤ 2C/√B."""
    base = train.subset(torch.arange(300))
    x = ImageDataset(torch.full((1, 1, 16, 16), 255, dtype=torch.uint8), torch.tensor([3]), 10)
    more = ImageDataset(torch.cat([base.images, x.images]), torch.cat([base.labels, x.labels]), 10)
    runs = []
    for data in (base, more):
        spy = Spy(monkeypatch)
        method, budget = make(data, noise_multiplier=2.0)
        progress = InterruptAt(method.config.discriminators)  # the state right after the warm start
        fit(method, data, budget, progress)
        runs.append((method, spy, progress.saved))
    (a, spy_a, warm_a), (b, spy_b, warm_b) = runs
    j_star = int(b.partition.teacher_of[-1])
    assert torch.equal(b.partition.teacher_of[:-1], a.partition.teacher_of)
    assert torch.equal(a.schedule, b.schedule)  # the schedule never reads the data
    for j in range(a.config.discriminators):
        same = all(torch.equal(warm_a["critics"][j][k], v) for k, v in warm_b["critics"][j].items())
        assert same == (j != j_star), j
    first = int((a.schedule == j_star).nonzero()[0])
    for s in range(first):
        assert torch.equal(spy_a.clipped[s], spy_b.clipped[s]), s
    change = float((spy_a.clipped[first] - spy_b.clipped[first]).norm())
    B, C = a.config.batch_size, a.config.clip_bound
    assert 0 < change <= 2 * (C / B) * math.sqrt(B) * (1 + 1e-6)


def test_the_noise_actually_added_is_the_ledgers(train, monkeypatch) -> None:
    spy = Spy(monkeypatch)
    method, budget = make(train)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    cfg = method.config
    assert stage.mechanism == "gaussian"
    assert epsilon(ledger, budget.delta, budget.accountant) == pytest.approx(10.0, rel=1e-3)
    noise = torch.cat(spy.noise)  # B × pixels × steps draws
    sensitivity = 2 * (cfg.clip_bound / cfg.batch_size) * math.sqrt(cfg.batch_size)
    assert float(noise.std()) == pytest.approx(stage.noise_multiplier * sensitivity, rel=0.02)
    assert abs(float(noise.mean())) < 0.02 * stage.noise_multiplier * sensitivity
    assert stage.noise_multiplier == pytest.approx(method.sigma / math.sqrt(cfg.batch_size))
    assert ledger.assumptions == [gswgan.COVERED] and ledger.non_private == []


@pytest.mark.parametrize("schedule", ["balanced", "iid"])
def test_the_ledger_counts_the_steps_the_busiest_discriminator_serves(train, monkeypatch, schedule) -> None:
    spy = Spy(monkeypatch)
    method, budget = make(train, schedule=schedule, iterations=10, discriminators=3)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    assert len(spy.noise) == 10 == int(method.served.sum())  # one sanitised release per generator step
    served = torch.bincount(method.schedule, minlength=3)
    assert torch.equal(method.served, served)
    assert stage.count == int(served.max())
    if schedule == "balanced":
        assert stage.count == math.ceil(10 / 3) and int(served.min()) == 10 // 3


def test_a_fixed_noise_stops_when_the_budget_is_spent(train) -> None:
    method, budget = make(train, eps=4.0, noise_multiplier=6.0, iterations=40)
    ledger = fit(method, train, budget)
    assert method.step == method.steps < 40
    assert epsilon(ledger, budget.delta, budget.accountant) <= 4.0
    longer = Stage(**{**ledger.stages[0].to_dict(), "count": ledger.stages[0].count + 1})
    assert epsilon([longer], budget.delta, budget.accountant) > 4.0
    with pytest.raises(BenchError, match="spends more than"):
        tiny, b = make(train, eps=0.01, noise_multiplier=0.5)
        fit(tiny, train, b)


def test_the_reference_analysis_and_ours_for_its_defaults() -> None:
    """The docstring's figures: the reference's own analysis of σ = 1.07 (ε ≈ 9.2: its ε = 10) against ours (390)."""
    cfg = gswgan.Config()
    assert gswgan.reference_epsilon(1.07, cfg, 20000, 1e-5) == pytest.approx(9.24, abs=0.01)
    ours = gswgan.step_stage(1.07 / math.sqrt(32), 20, cfg)
    assert epsilon([ours], 1e-5) == pytest.approx(390.3, rel=1e-3)


def test_resume_gives_the_uninterrupted_fit(train) -> None:
    whole, budget = make(train)
    fit(whole, train, budget)
    labels = torch.arange(20) % 10
    expected = whole.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    for at in (2, 7):  # in the warm start, in the main phase
        interrupted = InterruptAt(at)
        fit(make(train)[0], train, budget, interrupted)
        resumed, _ = make(train)
        fit(resumed, train, budget, InterruptAt(0, interrupted.saved), seed=7)  # another seed: the checkpoint rules
        assert torch.equal(resumed.sample(20, labels=labels, generator=torch.Generator().manual_seed(1)), expected)
    other, _ = make(train)
    fit(other, train, budget, seed=7)
    assert not torch.equal(other.sample(20, labels=labels, generator=torch.Generator().manual_seed(1)), expected)


def test_no_discriminator_is_released(train) -> None:
    method, budget = make(train, iterations=2)
    fit(method, train, budget)
    assert set(method.state_dict()) == {"generator", "generator_ema"}
    assert method.released_model() is method.G_ema


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"discriminators": 1}, "discriminators"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"schedule": "random"}, "schedule"),
        ({"gen_arch": "dcgan"}, "28×28"),
        ({"ema": 1.0}, r"ema must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_a_one_line_error(train, sets, message) -> None:
    with pytest.raises(BenchError, match=message) as e:
        make(train, **sets)
    assert "\n" not in str(e.value)


def test_more_discriminators_than_records_fails_before_training(train) -> None:
    method, budget = make(train, discriminators=500)
    with pytest.raises(BenchError, match="exceed the 300"):
        fit(method, train.subset(torch.arange(300)), budget)
