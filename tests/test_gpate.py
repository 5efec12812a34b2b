"""G-PATE specifics: the vote histograms' sensitivity, the noise drawn against the ledger, the number of noisy
answers, resume, and bad config values (on the running code)."""

from __future__ import annotations

import math
from typing import Any

import bench.baselines.gpate as gpate
import pytest
import torch
from torch import Tensor

from bench import config
from bench.contract import NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import Budget, calibrate, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny networks: one thread is faster and steady on a busy shared machine."""


def make(train, eps: float = 10.0, **sets: Any) -> tuple[gpate.GPATE, Budget]:
    cls = registry.get("gpate")
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile(TINY_PROFILE), method="gpate", dataset="synthetic", epsilon=eps,
        sets=sets,
    )  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: gpate.GPATE, train, budget: Budget, seed: int = 0, progress=None):
    return method.fit(
        train, budget=budget, generator=torch.Generator().manual_seed(seed), progress=progress or NullProgress()
    )


def samples(method: gpate.GPATE) -> Tensor:
    return method.sample(20, labels=torch.arange(20) % 10, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- sensitivity


def test_one_record_moves_one_teacher_and_every_histogram_by_at_most_sqrt2() -> None:
    """Add one record to D (i.i.d. teacher indices): only its teacher's partition changes, so only that teacher's
    projected gradients change (whatever they become), and every vote histogram moves by ≤ √2 in L2 (its max by ≤ 1)."""
    k, n, B, d, bins, c = 7, 300, 5, 6, 10, 1e-3
    g = torch.Generator().manual_seed(0)
    teacher_of = torch.randint(0, k, (n,), generator=g)
    for new_teacher in range(k):
        p = gpate.partition_of(teacher_of, k)
        q = gpate.partition_of(torch.cat([teacher_of, torch.tensor([new_teacher])]), k)  # D ∪ {x}, x is record n
        for j in range(k):
            a, b = p.members[j, : p.sizes[j]], q.members[j, : q.sizes[j]]
            if j == new_teacher:
                assert torch.equal(b, torch.cat([a, torch.tensor([n])]))
            else:
                assert torch.equal(a, b), "a record added to one teacher moved another teacher's records"

        def teacher_outputs(part) -> Tensor:  # each teacher's output: any function of its own records only
            out = torch.empty(k, B, d)
            for j in range(k):
                seed = int(part.members[j, : part.sizes[j]].sum()) * 1_000 + int(part.sizes[j])
                out[j] = (torch.rand(B, d, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * 1.5 * c
            return out

        h0 = gpate.vote_histograms(teacher_outputs(p), step_size=c, bins=bins)
        h1 = gpate.vote_histograms(teacher_outputs(q), step_size=c, bins=bins)
        l2 = (h1 - h0).pow(2).sum(-1).sqrt()  # [B, d]: one number per histogram
        assert (l2 <= math.sqrt(2) + 1e-6).all()
        assert ((h1.amax(-1) - h0.amax(-1)).abs() <= 1).all()
        assert (h0.sum(-1) == k).all() and (h1.sum(-1) == k).all()
        assert (l2 > 0).any(), "the changed teacher must be able to move a vote (else the test proves nothing)"


def test_worst_case_moves_a_histogram_by_exactly_sqrt2() -> None:
    c, bins = 1e-4, 10
    before = torch.full((5, 1, 1), -c)  # 5 teachers all in the lowest bin
    after = before.clone()
    after[2] = c  # one teacher (one record's partition) moves to the top bin
    h0, h1 = (gpate.vote_histograms(v, step_size=c, bins=bins) for v in (before, after))
    assert h0[0, 0].tolist() == [5.0] + [0.0] * 9 and h1[0, 0, -1] == 1.0  # top edge counted in the last bin
    assert float((h1 - h0).pow(2).sum().sqrt()) == pytest.approx(math.sqrt(2), abs=1e-7)
    assert float(h0.amax() - h1.amax()) == 1.0
    assert pytest.approx(math.sqrt(2)) == gpate.L2_SENSITIVITY and gpate.THRESHOLD_SENSITIVITY == 1.0


# ------------------------------------------------------------------------------------ the noise, counted


class NoiseSpy:
    """Records every call of gpate.add_noise during a fit: (input, output, σ asked for)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[Tensor, Tensor, float]] = []
        real = gpate.add_noise

        def spy(values, sigma, generator):
            out = real(values, sigma, generator)
            self.calls.append((values.clone(), out.clone(), sigma))
            return out

        monkeypatch.setattr(gpate, "add_noise", spy)


@pytest.mark.parametrize("sets", [{}, {"sigma": 3.0, "sigma_thresh": 5.0, "iterations": 4}])
def test_noise_actually_drawn_has_the_ledgers_sigma(train, monkeypatch, sets: dict) -> None:
    method, budget = make(train, eps=1000.0, generator_batch_size=64, proj_dim=8, **sets)  # 5,120 per it
    spy = NoiseSpy(monkeypatch)
    ledger = fit(method, train, budget)
    threshold, votes = ledger.stages
    assert (threshold.name, votes.name) == ("threshold", "votes")
    sigma_t = threshold.noise_multiplier * gpate.THRESHOLD_SENSITIVITY  # what the ledger says was added
    sigma = votes.noise_multiplier * gpate.L2_SENSITIVITY
    thr = [(o - i).flatten() for i, o, s in spy.calls[0::2]]  # per query: the check first, then the argmax
    arg = [(o - i).flatten() for i, o, s in spy.calls[1::2]]
    assert all(i.dim() == 2 for i, _, _ in spy.calls[0::2]) and all(i.dim() == 3 for i, _, _ in spy.calls[1::2])
    for drawn, charged in ((torch.cat(thr), sigma_t), (torch.cat(arg), sigma)):
        assert drawn.numel() >= 4 * 512
        assert abs(drawn.double().std().item() / charged - 1) < 0.04
        assert abs(drawn.double().mean().item()) < 0.1 * charged
    if sets:
        assert sigma == pytest.approx(3.0) and sigma_t == pytest.approx(5.0)
    else:  # calibrated: σ_t = thresh_ratio · σ
        assert sigma_t == pytest.approx(method.config.thresh_ratio * sigma)


def test_ledger_counts_every_noisy_answer_computed(train, monkeypatch) -> None:
    method, budget = make(train)
    spy = NoiseSpy(monkeypatch)
    ledger = fit(method, train, budget)
    cfg = method.config
    checks = sum(i.numel() for i, _, _ in spy.calls[0::2])  # one noisy max per histogram
    argmaxes = sum(i[..., 0].numel() for i, _, _ in spy.calls[1::2])  # one noisy argmax per histogram
    expected = cfg.iterations * cfg.generator_batch_size * cfg.proj_dim
    assert [s.count for s in ledger.stages] == [checks, argmaxes] == [expected, expected]
    assert len(spy.calls) == 2 * cfg.iterations
    assert method.answered < method.queries, "some checks fail, and the failed ones are charged all the same"


def test_without_threshold_only_the_argmax_is_drawn_and_charged(train, monkeypatch) -> None:
    method, budget = make(train, threshold=0.0)
    spy = NoiseSpy(monkeypatch)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    assert stage.name == "votes" and stage.count == sum(i[..., 0].numel() for i, _, _ in spy.calls)
    assert method.answered == method.queries


def test_failed_checks_answer_zero_and_the_argmax_is_the_noisy_one() -> None:
    counts = torch.tensor([[[0.0, 9.0, 1.0], [4.0, 3.0, 3.0]]])  # B=1, d=2, 3 bins, k=10
    idx, ok = gpate.aggregate(
        counts, sigma=1e-3, sigma_thresh=1e-3, threshold_count=5.0, generator=torch.Generator().manual_seed(0)
    )
    assert idx.tolist() == [[1, 0]] and ok.tolist() == [[True, False]]


# ------------------------------------------------------------------------------------------ calibration


def test_calibrated_noise_meets_the_budget_data_independently(train) -> None:
    method, budget = make(train, eps=3.0)
    sigma, sigma_t, iterations = method.noise_and_iterations(budget)
    cfg = method.config
    q = cfg.iterations * cfg.queries_per_iteration
    assert iterations == cfg.iterations and sigma_t == pytest.approx(cfg.thresh_ratio * sigma)
    assert epsilon(gpate.query_stages(cfg, sigma, sigma_t, q), budget.delta) <= 3.0
    assert epsilon(gpate.query_stages(cfg, 0.99 * sigma, 0.99 * sigma_t, q), budget.delta) > 3.0
    s = calibrate(3.0, lambda s: gpate.query_stages(cfg, s, cfg.thresh_ratio * s, q), budget.delta)
    assert sigma == pytest.approx(s, rel=1e-3)


def test_fixed_sigma_stops_when_the_budget_is_spent(train) -> None:
    method, budget = make(train, eps=1.0, sigma=300.0, sigma_thresh=900.0, iterations=100)
    ledger = fit(method, train, budget)
    cfg = method.config
    assert 1 <= method.iteration < 100
    assert ledger.stages[0].count == method.iteration * cfg.queries_per_iteration
    assert epsilon(ledger, budget.delta) <= 1.0
    more = gpate.query_stages(cfg, 300.0, 900.0, (method.iteration + 1) * cfg.queries_per_iteration)
    assert epsilon(more, budget.delta) > 1.0


def test_teachers_are_never_released(train) -> None:
    method, budget = make(train, iterations=2)
    fit(method, train, budget)
    assert set(method.state_dict()) == {"generator"}


# ------------------------------------------------------------------------------------------------ resume


def test_resume_gives_bit_identical_samples_and_another_seed_differs(train) -> None:
    whole, budget = make(train, iterations=6)
    interrupted = InterruptAt(3)
    ledger = fit(whole, train, budget, seed=0, progress=interrupted)
    resumed, _ = make(train, iterations=6)
    again = fit(resumed, train, budget, seed=7, progress=InterruptAt(0, interrupted.saved))
    assert again.stages == ledger.stages  # the answers computed before the interruption are charged once
    assert torch.equal(samples(whole), samples(resumed))
    other, _ = make(train, iterations=6)
    fit(other, train, budget, seed=7)
    assert not torch.equal(samples(whole), samples(other))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ({"teachers": 1}, "teachers"),
        ({"bins": 1}, "bins"),
        ({"sigma": 0.0, "sigma_thresh": 1.0}, "sigma"),
        ({"sigma": 1.0, "sigma_thresh": -2.0}, "sigma_thresh"),
        ({"sigma": 1.0}, "sigma_thresh"),
        ({"step_size": 0.0}, "step_size"),
        ({"threshold": 1.5}, "threshold"),
        ({"proj_dim": 0}, "proj_dim"),
    ],
)
def test_bad_config_is_a_one_line_bench_error(train, sets: dict, match: str) -> None:
    with pytest.raises(BenchError, match=match) as err:
        make(train, **sets)
    assert "\n" not in str(err.value)


def test_more_teachers_than_records_fails_before_training(train, monkeypatch) -> None:
    method, budget = make(train, teachers=len(train) + 1)
    monkeypatch.setattr(gpate.GPATE, "_prepare", lambda *a: pytest.fail("training started"))
    with pytest.raises(BenchError, match="teachers exceed"):
        fit(method, train, budget)
