"""PATE-GAN specifics: one test per known bug of public PATE-GAN codes (Ganev et al. 2024), on the running code."""

from __future__ import annotations

import math
from typing import Any

import bench.baselines.pategan as pategan
import pytest
import torch
from scipy import stats
from torch import Tensor

from bench import config
from bench.contract import NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.nets.gan import Discriminator, TeacherBank, TeacherList
from bench.pixels import to_uint8
from bench.privacy import Budget, calibrate, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny networks: one thread is faster and steady on a busy shared machine."""


def make(train, eps: float = 10.0, **sets: Any) -> tuple[pategan.PATEGAN, Budget]:
    cls = registry.get("pategan")
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile(TINY_PROFILE), method="pategan", dataset="synthetic", epsilon=eps,
        sets=sets,
    )  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: pategan.PATEGAN, train, budget: Budget, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed), progress=NullProgress())


# ----------------------------------------------------------------------------------------- partitions


@pytest.mark.parametrize(("n", "k"), [(2000, 4), (2000, 100), (7, 7), (50, 3)])
def test_every_record_in_exactly_one_partition(n: int, k: int) -> None:
    p = pategan.draw_partition(n, k, torch.Generator().manual_seed(1))
    members = p.members[p.members >= 0]
    assert torch.equal(members.sort().values, torch.arange(n)), "each record once, none missing"
    assert int(p.sizes.sum()) == n
    for j in range(k):
        row = p.members[j, : p.sizes[j]]
        assert (p.teacher_of[row] == j).all()
        assert (p.members[j, p.sizes[j] :] == -1).all()


def test_partition_is_drawn_once_and_fixed_for_the_whole_run(train, monkeypatch: pytest.MonkeyPatch) -> None:
    method, budget = make(train)
    seen: list[pategan.Partition] = []
    real_step = pategan.PATEGAN._teacher_step

    def spy(self, partition):
        seen.append(partition)
        return real_step(self, partition)

    draws: list[int] = []
    real_draw = pategan.draw_partition

    def draw_spy(*args):
        draws.append(1)
        return real_draw(*args)

    monkeypatch.setattr(pategan.PATEGAN, "_teacher_step", spy)
    monkeypatch.setattr(pategan, "draw_partition", draw_spy)
    fit(method, train, budget)
    cfg = method.config
    assert len(draws) == 1, "partitions drawn once per run, never per iteration"
    assert len(seen) == cfg.iterations * cfg.teacher_steps
    assert all(p is method.partition for p in seen), "the same partition object in every iteration"
    # and the same run seed gives the same partition (drawn from the run's generator)
    again, _ = make(train)
    fit(again, train, budget)
    assert torch.equal(again.partition.teacher_of, method.partition.teacher_of)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_each_teacher_trains_only_on_its_own_partition(train, monkeypatch: pytest.MonkeyPatch, batching: str) -> None:
    method, budget = make(train, iterations=3, teacher_batching=batching)
    bank = TeacherBank if batching == "vmap" else TeacherList
    batches: list[Tensor] = []
    real_forward = bank.forward

    def spy(self, x, y):
        batches.append(x.detach().clone())
        return real_forward(self, x, y)

    monkeypatch.setattr(bank, "forward", spy)
    fit(method, train, budget)
    assert isinstance(method.teachers, bank)
    p, B = method.partition, method.config.batch_size
    assert batches
    for x in batches:  # [k, 2B, C, H, W]: B records, then B fakes
        for j in range(method.config.teachers):
            own = {bytes(img.numpy()) for img in train.images[p.members[j, : p.sizes[j]]]}
            seen = {bytes(img.numpy()) for img in to_uint8(x[j, :B])}  # exact: records are on the uint8 grid
            assert seen <= own, f"teacher {j} saw a record outside its partition"


# ------------------------------------------------------------------------------ votes and their noise


def test_votes_are_counted_from_teachers() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [1.0, -2.0, -0.5], [3.0, 1.0, -0.1], [0.2, -0.3, -4.0]])  # k=4, B=3
    counts = pategan.vote_counts(logits)
    assert counts.tolist() == [[0.0, 4.0], [3.0, 1.0], [3.0, 1.0]]  # (#fake, #real) per query


def test_noise_is_added_to_counts_and_labels_are_their_argmax() -> None:
    logits = torch.randn(5, 4000, generator=torch.Generator().manual_seed(0))
    counts = pategan.vote_counts(logits)
    for agg in ("laplace", "gnmax"):
        labels = pategan.aggregate(logits, aggregator=agg, scale=2.0, generator=torch.Generator().manual_seed(7))
        noisy = pategan.noisy_counts(counts, aggregator=agg, scale=2.0, generator=torch.Generator().manual_seed(7))
        assert torch.equal(labels, noisy.argmax(1))
        # the noise is on each of the two counts, not on the label: labels move with the vote margin
        margin = counts[:, 1] - counts[:, 0]
        assert labels[margin >= 3].float().mean() > labels[margin <= -3].float().mean() + 0.3
        assert ((noisy - counts).abs() > 0).all()


@pytest.mark.parametrize("agg", ["laplace", "gnmax"])
def test_noise_drawn_has_the_scale_of_its_distribution(agg: str) -> None:
    scale, n = 3.7, 100_000
    counts = torch.zeros(n // 2, 2)
    noise = (
        pategan.noisy_counts(counts, aggregator=agg, scale=scale, generator=torch.Generator().manual_seed(3))
    ).flatten()
    dist = stats.laplace(scale=scale) if agg == "laplace" else stats.norm(scale=scale)
    assert stats.kstest(noise.double().numpy(), dist.cdf).pvalue > 1e-3
    wrong = stats.laplace(scale=1 / scale) if agg == "laplace" else stats.norm(scale=scale / math.sqrt(2))
    assert stats.kstest(noise.double().numpy(), wrong.cdf).pvalue < 1e-6  # the test can tell λ from 1/λ


@pytest.mark.parametrize(("agg", "sets"), [("laplace", {}), ("laplace", {"lam": 0.05}), ("gnmax", {})])
def test_noise_actually_drawn_in_fit_has_the_charged_scale(train, monkeypatch, agg: str, sets: dict) -> None:
    method, budget = make(train, aggregator=agg, student_batch_size=256, **sets)  # 5,120 draws
    draws: list[tuple[Tensor, Tensor]] = []
    real = pategan.noisy_counts

    def spy(counts, **kwargs):
        out = real(counts, **kwargs)
        draws.append((counts.clone(), out.clone()))
        return out

    monkeypatch.setattr(pategan, "noisy_counts", spy)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    k = method.config.teachers
    counts = torch.cat([c for c, _ in draws])
    residual = torch.cat([o - c for c, o in draws]).flatten().double().numpy()
    # votes: integer counts from k teachers (not labels, not one-hot), one row per query
    assert torch.equal(counts, counts.round()) and (counts.sum(1) == k).all()
    if agg == "laplace":
        assert stage.mechanism == "laplace"
        b = stage.noise_multiplier * pategan.L1_SENSITIVITY  # scale charged: ledger parameter × L1 sensitivity 2
        if "lam" in sets:
            assert b == pytest.approx(1 / sets["lam"])  # scale 1/λ, never λ
        dist = stats.laplace(scale=b)
        assert abs(abs(residual).mean() / b - 1) < 0.1  # E|Lap(b)| = b
    else:
        assert stage.mechanism == "gaussian"
        sigma = stage.noise_multiplier * pategan.L2_SENSITIVITY
        dist = stats.norm(scale=sigma)
        assert abs(residual.std() / sigma - 1) < 0.1
    assert stats.kstest(residual, dist.cdf).pvalue > 1e-4


def test_ledger_counts_every_noisy_answer_computed(train, monkeypatch: pytest.MonkeyPatch) -> None:
    method, budget = make(train, student_steps=2)
    answers: list[int] = []
    real = pategan.noisy_counts

    def spy(counts, **kwargs):
        answers.append(counts.shape[0])
        return real(counts, **kwargs)

    monkeypatch.setattr(pategan, "noisy_counts", spy)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    cfg = method.config
    assert stage.count == sum(answers) == cfg.iterations * cfg.student_steps * cfg.student_batch_size
    assert method.queries == stage.count


# ------------------------------------------------------------------------------------------ calibration


def test_calibrated_noise_meets_the_budget_data_independently(train) -> None:
    method, budget = make(train, eps=3.0)
    scale, iterations = method.noise_and_iterations(budget)
    cfg = method.config
    q = cfg.iterations * cfg.queries_per_iteration
    assert iterations == cfg.iterations
    assert epsilon([pategan.votes_stage("laplace", scale, q)], budget.delta) <= 3.0
    assert epsilon([pategan.votes_stage("laplace", scale * 0.99, q)], budget.delta) > 3.0  # not over-noised
    s = calibrate(3.0, lambda s: [pategan.votes_stage("laplace", 2 * s, q)], budget.delta)
    assert scale == pytest.approx(2 * s)
    # one query of Laplace(1/λ) on counts of L1 sensitivity 2 is (2λ, 0)-DP: LaplaceDpEvent(1 / (2λ))
    assert pategan.votes_stage("laplace", 1 / 0.25, 1).noise_multiplier == pytest.approx(1 / (2 * 0.25))


def test_fixed_lambda_stops_when_the_budget_is_spent(train) -> None:
    method, budget = make(train, eps=10.0, lam=0.05, iterations=50)
    ledger = fit(method, train, budget)
    per_it = method.config.queries_per_iteration
    assert 1 <= method.iteration < 50
    assert ledger.stages[0].count == method.iteration * per_it
    assert epsilon(ledger, budget.delta) <= 10.0
    one_more = pategan.votes_stage("laplace", 20.0, (method.iteration + 1) * per_it)
    assert epsilon([one_more], budget.delta) > 10.0


# ---------------------------------------------------------------------------------------- teacher batching


def test_batched_teachers_equal_k_separate_models() -> None:
    torch.manual_seed(0)
    nets = [Discriminator(channels=1, num_classes=3, width_c=8, groups=4) for _ in range(3)]
    bank, loop = TeacherBank(nets), TeacherList([type(n)(channels=1, num_classes=3, width_c=8, groups=4) for n in nets])
    for a, b in zip(loop.nets, nets, strict=True):
        a.load_state_dict(b.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 6, 1, 16, 16, generator=g), torch.randint(0, 3, (3, 6), generator=g)
    torch.testing.assert_close(bank(x, y), loop(x, y))
    torch.testing.assert_close(bank.shared(x[0], y[0]), loop.shared(x[0], y[0]))
    for m in (bank, loop):  # one Adam step on the sum of the teachers' losses: each teacher its own gradient
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m(x, y).pow(2).mean(1).sum().backward()
        opt.step()
    for j in range(3):
        for name, p in loop.teacher(j).items():
            torch.testing.assert_close(bank.teacher(j)[name], p)


def test_teachers_are_never_released(train) -> None:
    method, budget = make(train, iterations=2)
    fit(method, train, budget)
    state = method.state_dict()
    assert set(state) == {"generator", "student"}


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ({"teachers": 1}, "teachers"),
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"teacher_steps": 0}, "teacher_steps"),
        ({"student_steps": 0}, "student_steps"),
        ({"aggregator": "gnmax", "gnmax_sigma": 0.0}, "gnmax_sigma"),
    ],
)
def test_bad_config_is_refused(sets: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pategan.Config(**sets)


def test_more_teachers_than_records_fails_before_training(train, monkeypatch: pytest.MonkeyPatch) -> None:
    method, budget = make(train, teachers=len(train) + 1)
    monkeypatch.setattr(pategan.PATEGAN, "_prepare", lambda *a: pytest.fail("training started"))
    with pytest.raises(BenchError, match="2001 teachers exceed the 2000 training records"):
        fit(method, train, budget)


def test_bad_input_is_a_one_line_cli_error(tmp_path) -> None:
    from tests.conftest import bench

    result = bench("run", "--methods", "pategan", "--dataset", "synthetic", "--set", "lam=0", "--dry-run")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "lam" in result.output


def test_resume_continues_the_same_run_without_spending_budget_twice(train) -> None:
    whole, budget = make(train, iterations=6)
    interrupted = InterruptAt(3)
    ledger = whole.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=interrupted)
    resumed, _ = make(train, iterations=6)
    again = resumed.fit(
        train, budget=budget, generator=torch.Generator().manual_seed(7), progress=InterruptAt(0, interrupted.saved)
    )
    assert again.stages == ledger.stages  # the queries answered before the interruption are counted once
    labels = torch.arange(10)
    a = whole.sample(10, labels=labels, generator=torch.Generator().manual_seed(1))
    b = resumed.sample(10, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
