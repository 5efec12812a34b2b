"""DP-GAN specifics: the ledger charges exactly the noisy discriminator steps taken, the whole per-example
discriminator loss is clipped, and the generator's update never reads real data."""

from __future__ import annotations

from typing import Any

import bench.baselines.dpgan as dpgan
import pytest
import torch
from torch import Tensor

import bench.privacy.dpsgd as dpsgd
from bench import config
from bench.contract import NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.nets.gan import Discriminator, Generator
from bench.privacy import Budget, calibrate_sigma, epsilon
from bench.privacy.dpsgd import DPSGD
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny networks: one thread is faster and steady on a busy shared machine."""


def make(train, eps: float = 10.0, **sets: Any) -> tuple[dpgan.DPGAN, Budget]:
    cls = registry.get("dpgan")
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method="dpgan",
        dataset="synthetic",
        epsilon=eps,
        sets=sets,
    )
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: dpgan.DPGAN, train, budget: Budget):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress())


@pytest.mark.parametrize("loss", ["ns", "wgan-gp"])
def test_ledger_steps_equal_the_noisy_steps_taken(train, monkeypatch: pytest.MonkeyPatch, loss: str) -> None:
    method, budget = make(train, eps=3.0, loss=loss)
    noise_draws: list[float] = []
    real_add_noise = dpsgd.add_noise

    def spy(sums, *, noise_std, generator):
        noise_draws.append(noise_std)
        return real_add_noise(sums, noise_std=noise_std, generator=generator)

    monkeypatch.setattr(dpsgd, "add_noise", spy)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages  # one stage: each discriminator step charged once, not per real/fake pass
    cfg = method.config
    q = cfg.batch_size / len(train)
    assert stage.mechanism == "poisson_gaussian" and stage.sampling_rate == pytest.approx(q)
    assert stage.steps == len(noise_draws) == cfg.d_steps * round(cfg.epochs / (q * cfg.d_steps))
    assert stage.noise_multiplier == calibrate_sigma(3.0, sample_rate=q, steps=stage.steps, delta=budget.delta)
    assert all(std == pytest.approx(stage.noise_multiplier * cfg.max_grad_norm) for std in noise_draws)
    assert epsilon(ledger, budget.delta) <= 3.0


def test_generator_update_reads_no_real_data(train, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every discriminator forward outside a DP step is on the generator's latest output, nothing else."""
    method, budget = make(train)
    in_dp_step, last_fake, outside = [False], [None], []
    real_step, real_d, real_g = DPSGD.step, Discriminator.forward, Generator.forward

    def step_spy(self, *batch):
        in_dp_step[0] = True
        try:
            return real_step(self, *batch)
        finally:
            in_dp_step[0] = False

    def g_spy(self, z, y):
        out = real_g(self, z, y)
        if not in_dp_step[0] and torch.is_grad_enabled():
            last_fake[0] = out
        return out

    def d_spy(self, x, y):
        if not in_dp_step[0]:
            outside.append(x is last_fake[0])
        return real_d(self, x, y)

    monkeypatch.setattr(DPSGD, "step", step_spy)
    monkeypatch.setattr(Generator, "forward", g_spy)
    monkeypatch.setattr(Discriminator, "forward", d_spy)
    g_before = [p.detach().clone() for p in method.G.parameters()]
    fit(method, train, budget)
    cfg = method.config
    assert len(outside) == round(cfg.epochs / (cfg.batch_size / len(train) * cfg.d_steps)), "one per generator step"
    assert all(outside), "the generator's loss saw a discriminator input that is not a fresh generated batch"
    assert any(not torch.equal(a, b) for a, b in zip(g_before, method.G.parameters(), strict=True))


def _reference_grads(method: dpgan.DPGAN, batch: tuple[Tensor, ...]) -> list[list[Tensor]]:
    """Slow per-example gradients: autograd on each example alone (double backward for the penalty)."""
    params = list(method.D.parameters())
    out = []
    for i in range(batch[0].shape[0]):
        loss = method._d_loss(method.D, *(b[i] for b in batch))
        out.append([g.detach() for g in torch.autograd.grad(loss, params, allow_unused=False)])
    return out


@pytest.mark.parametrize(("loss", "mode"), [("ns", "folded"), ("ns", "functorch"), ("wgan-gp", "functorch")])
def test_per_example_gradient_is_of_the_whole_pair_loss(train, loss: str, mode: str) -> None:
    """The clipped object is ∇ of real term + fake term (+ gradient penalty) of ONE example."""
    method, _ = make(train, loss=loss)
    g = torch.Generator().manual_seed(2)
    B = 5
    x = torch.rand(B, 1, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=g)
    with torch.no_grad():
        fake = method.G(torch.randn(B, method.config.latent_dim, generator=g), y)
    batch = (x, y, fake, torch.rand(B, generator=g))
    dp = DPSGD(
        method.D,
        torch.optim.SGD(method.D.parameters(), lr=0.0),
        per_example_loss=method._d_loss,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        num_records=10,
        generator=torch.Generator(),
        mode=mode,
    )
    grads, _ = dp._per_example_grads(*batch)
    reference = _reference_grads(method, batch)
    for i in range(B):
        for got, want in zip((gr[i] for gr in grads), reference[i], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ({"d_steps": 0}, "d_steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"loss": "wgan-gp", "dp_mode": "folded"}, "wgan-gp"),
        ({"width": 12, "groups": 8}, "groups"),
    ],
)
def test_bad_config_is_refused(sets: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dpgan.Config(**sets)


def test_batch_larger_than_dataset_is_refused(train) -> None:
    method, budget = make(train, batch_size=5000)
    with pytest.raises(BenchError, match="exceeds the 2000 training records"):
        fit(method, train, budget)


def test_bad_input_is_a_one_line_cli_error() -> None:
    from tests.conftest import bench

    result = bench("run", "--methods", "dpgan", "--dataset", "synthetic", "--set", "d_steps=0", "--dry-run")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "d_steps" in result.output


def test_resume_continues_the_same_run_without_spending_budget_twice(train) -> None:
    whole, budget = make(train)
    interrupted = InterruptAt(7)  # mid-way between two generator steps
    ledger = fit_with(whole, train, budget, interrupted)
    resumed, _ = make(train)
    again = fit_with(resumed, train, budget, InterruptAt(0, interrupted.saved), seed=7)  # the checkpoint rules
    assert again.stages == ledger.stages
    labels = torch.arange(10)
    a = whole.sample(10, labels=labels, generator=torch.Generator().manual_seed(1))
    b = resumed.sample(10, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def fit_with(method: dpgan.DPGAN, train, budget: Budget, progress, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed), progress=progress)
