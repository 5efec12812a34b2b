"""DataLens specifics: the compressed votes' form and sensitivity, the noise drawn against the ledger, the count of
noisy releases, resume, bad settings; each on the running code."""

from __future__ import annotations

import math
from typing import Any

import bench.baselines.datalens as datalens
import pytest
import torch
from torch import Tensor

from bench import config
from bench.contract import NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import Budget, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny networks: one thread is faster and steady on a busy shared machine."""


def make(train, eps: float = 10.0, **sets: Any) -> tuple[datalens.DataLens, Budget]:
    cls = registry.get("datalens")
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile(TINY_PROFILE), method="datalens", dataset="synthetic", epsilon=eps,
        sets=sets,
    )  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: datalens.DataLens, train, budget: Budget, seed: int = 0, progress=None):
    return method.fit(
        train, budget=budget, generator=torch.Generator().manual_seed(seed), progress=progress or NullProgress()
    )


def samples(method: datalens.DataLens) -> Tensor:
    return method.sample(20, labels=torch.arange(20) % 10, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------- compression and sensitivity


@pytest.mark.parametrize("max_grad", [1e-5, None, 10.0])
def test_compressed_vectors_have_k_entries_of_plus_minus_one_at_the_largest_gradients(max_grad) -> None:
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(7, 5, 300, generator=g) * 1e-3
    grads[0, 0] = 0.0  # a zero gradient still gives k fair signs
    k = 25
    c = datalens.compress(grads, k, max_grad, torch.Generator().manual_seed(1))
    assert c.shape == grads.shape
    assert ((c == 0) | (c == 1) | (c == -1)).all(), "entries in {−1, 0, +1}"
    assert ((c != 0).sum(-1) == k).all(), "exactly k non-zeros per teacher and sample"
    assert torch.allclose(c.norm(dim=-1), torch.full(c.shape[:2], math.sqrt(k)))
    kept = grads.abs().topk(k, dim=-1).indices
    assert (c.gather(-1, kept) != 0).all(), "the kept coordinates are the k largest |g|"
    if max_grad == 1e-5:  # |g| ≫ b: the sign is the gradient's (the reference's regime)
        rows = grads[1:].abs().gather(-1, kept[1:]) > 1e-5
        assert (c[1:].gather(-1, kept[1:])[rows] == grads[1:].gather(-1, kept[1:]).sign()[rows]).all()


def test_stochastic_sign_is_unbiased_below_the_cap() -> None:
    """P(+1) = 1/2 + g/(2b): with b = max|g| = 1, E[sign] = g."""
    grads = torch.tensor([[1.0, 0.5, -0.25, 0.0, -1.0]]).expand(40_000, 5)
    c = datalens.compress(grads, 5, None, torch.Generator().manual_seed(2))
    torch.testing.assert_close(c.mean(0), grads[0], atol=0.02, rtol=0)


def test_one_teacher_moves_the_vote_sum_by_at_most_the_sensitivity() -> None:
    T, B, D, k = 6, 8, 200, 30
    bound = datalens.sensitivity(k)
    assert bound == pytest.approx(2 * math.sqrt(k))
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        grads = torch.randn(T, B, D, generator=gen) * 1e-3
        other = grads.clone()
        other[trial % T] = torch.randn(B, D, generator=gen) * 10 ** float(torch.empty(1).uniform_(-8, 0, generator=gen))
        a = datalens.vote_sum(grads, k, 1e-5, torch.Generator().manual_seed(trial))
        b = datalens.vote_sum(other, k, 1e-5, torch.Generator().manual_seed(trial))
        assert ((a - b).norm(dim=1) <= bound + 1e-9).all()
    # the worst case, attained: the changed teacher's gradients flipped (|g| > b: deterministic signs)
    grads = (torch.rand(T, B, D, generator=gen) + 1.0) * torch.where(torch.rand(T, B, D, generator=gen) < 0.5, -1, 1)
    other = grads.clone()
    other[2] = -grads[2]
    a = datalens.vote_sum(grads, k, 1e-5, torch.Generator().manual_seed(9))
    b = datalens.vote_sum(other, k, 1e-5, torch.Generator().manual_seed(9))
    torch.testing.assert_close((a - b).norm(dim=1), torch.full((B,), bound))


def test_the_fit_adds_noise_to_sums_of_compressed_votes(train, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a fit, what the noise is added to is the sum over T teachers of vectors of k ±1 entries."""
    method, budget = make(train, iterations=2)
    compressed: list[Tensor] = []
    released: list[Tensor] = []
    real_compress, real_release = datalens.compress, datalens.noisy_release

    def spy_compress(grads, *args):
        out = real_compress(grads, *args)
        compressed.append(out.clone())
        return out

    def spy_release(votes, *args):
        released.append(votes.clone())
        return real_release(votes, *args)

    monkeypatch.setattr(datalens, "compress", spy_compress)
    monkeypatch.setattr(datalens, "noisy_release", spy_release)
    fit(method, train, budget)
    cfg = method.config
    assert len(compressed) == len(released) == 2
    for c, v in zip(compressed, released, strict=True):
        assert c.shape[0] == cfg.teachers
        assert ((c != 0).sum(-1) == cfg.topk).all() and (c.abs() <= 1).all()
        assert torch.equal(c.sum(0), v)


# ---------------------------------------------------------------------------------- noise and the ledger


def test_noise_actually_drawn_in_fit_has_the_charged_sigma(train, monkeypatch: pytest.MonkeyPatch) -> None:
    method, budget = make(train, eps=5.0, iterations=3)
    residuals: list[Tensor] = []
    real = datalens.noisy_release

    def spy(votes, *args):
        out = real(votes, *args)
        residuals.append((out - votes).flatten())
        return out

    monkeypatch.setattr(datalens, "noisy_release", spy)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    cfg = method.config
    assert stage.mechanism == "gaussian" and stage.name == "votes"
    sigma = stage.noise_multiplier * datalens.sensitivity(cfg.topk)  # σ charged: multiplier × 2√k
    noise = torch.cat(residuals).double()
    assert noise.numel() == 3 * cfg.generator_batch_size * 256  # every entry of every release, 1×16×16
    assert abs(noise.std().item() / sigma - 1) < 0.03
    assert abs(noise.mean().item()) < 0.05 * sigma
    assert epsilon(ledger, budget.delta) <= 5.0


def test_ledger_counts_every_noisy_release(train, monkeypatch: pytest.MonkeyPatch) -> None:
    method, budget = make(train, iterations=5, generator_batch_size=7)
    rows: list[int] = []
    real = datalens.noisy_release

    def spy(votes, *args):
        rows.append(votes.shape[0])
        return real(votes, *args)

    monkeypatch.setattr(datalens, "noisy_release", spy)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    assert stage.count == sum(rows) == method.releases == 5 * 7  # a function of the config only


def test_calibrated_sigma_meets_the_budget_and_is_not_over_noised(train) -> None:
    method, budget = make(train, eps=2.0)
    sigma, iterations = method.noise_and_iterations(budget)
    cfg = method.config
    q = iterations * cfg.generator_batch_size
    assert iterations == cfg.iterations
    assert epsilon([datalens.votes_stage(sigma, cfg.topk, q)], budget.delta) <= 2.0
    assert epsilon([datalens.votes_stage(sigma * 0.99, cfg.topk, q)], budget.delta) > 2.0


def test_fixed_sigma_stops_when_the_budget_is_spent(train) -> None:
    method, budget = make(train, eps=1.0, sigma=300.0, iterations=50)
    ledger = fit(method, train, budget)
    per_it, k = method.config.generator_batch_size, method.config.topk
    assert 1 <= method.iteration < 50
    assert ledger.stages[0].count == method.iteration * per_it
    assert epsilon(ledger, budget.delta) <= 1.0
    assert epsilon([datalens.votes_stage(300.0, k, (method.iteration + 1) * per_it)], budget.delta) > 1.0


def test_teachers_are_never_released(train) -> None:
    method, budget = make(train, iterations=1)
    fit(method, train, budget)
    assert set(method.state_dict()) == {"generator"}


# ------------------------------------------------------------------------------------------------ resume


def test_resumed_fit_gives_bit_identical_samples_and_another_seed_differs(train) -> None:
    whole, budget = make(train)
    interrupted = InterruptAt(3)
    ledger = fit(whole, train, budget, progress=interrupted)
    assert interrupted.saved is not None
    resumed, _ = make(train)
    again = fit(resumed, train, budget, seed=7, progress=InterruptAt(0, interrupted.saved))
    assert again.stages == ledger.stages  # releases before the interruption counted once
    assert torch.equal(samples(whole), samples(resumed))
    other, _ = make(train)
    fit(other, train, budget, seed=7)
    assert not torch.equal(samples(other), samples(whole))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ({"teachers": 1}, "teachers"),
        ({"topk": 0}, "topk"),
        ({"topk": 257}, "topk 257 exceeds the 256 pixels"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -3.0}, "sigma"),
        ({"threshold": -0.1}, "threshold"),
        ({"max_grad": 0.0}, "max_grad"),
    ],
)
def test_bad_config_is_a_one_line_bench_error(train, sets: dict, match: str) -> None:
    with pytest.raises(BenchError, match=match) as info:
        make(train, **sets)
    assert "\n" not in str(info.value)


def test_more_teachers_than_records_fails_before_training(train, monkeypatch: pytest.MonkeyPatch) -> None:
    method, budget = make(train, teachers=len(train) + 1)
    monkeypatch.setattr(datalens.DataLens, "_prepare", lambda *a: pytest.fail("training started"))
    with pytest.raises(BenchError, match="2001 teachers exceed the 2000 training records"):
        fit(method, train, budget)


def test_a_sigma_too_small_for_one_iteration_is_refused(train) -> None:
    method, budget = make(train, eps=1.0, sigma=1.0)
    with pytest.raises(BenchError, match="raise sigma"):
        fit(method, train, budget)


def test_bad_input_is_a_one_line_cli_error() -> None:
    from tests.conftest import bench

    result = bench("run", "--methods", "datalens", "--dataset", "synthetic", "--set", "topk=0", "--dry-run")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "topk" in result.output
