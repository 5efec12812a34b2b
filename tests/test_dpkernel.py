"""DP-Kernel: the release's sensitivity at the points it is read, the Gaussian-process noise actually drawn
against the ledger, one release a step on a Poisson batch, no silent noiseless step, resume."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from bench.baselines import dpkernel

from bench import config
from bench.contract import DataSpec, NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import Budget, calibrate, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")
BW = (1.0, 2.0, 4.0, 8.0, 16.0)
pytestmark = pytest.mark.usefixtures("one_thread")


def make(train, eps: float = 10.0, **sets: Any) -> tuple[dpkernel.DPKernel, Budget]:
    cls = registry.get("dpkernel")
    cfg, _ = config.resolve(cls.Config, profile=config.load_profile(TINY_PROFILE), method="dpkernel",
                            dataset="synthetic", epsilon=eps, sets=sets)  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: dpkernel.DPKernel, train, budget: Budget, progress=None, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed),
                      progress=progress or NullProgress())  # fmt: skip


def test_one_record_moves_the_release_at_any_points_by_at_most_the_sensitivity() -> None:
    """Adding x to the batch moves f = S/B̄ at the read points Y by δ = k(x, Y)/B̄; the Gaussian-process noise there
    is N(0, s²K_YY), so the privacy loss is that of a Gaussian mechanism of sensitivity √(δᵀK_YY⁻¹δ) over s: it
    must be at most Δ = √L/B̄, with equality when x is one of the points (its whole RKHS norm is seen)."""
    g = torch.Generator().manual_seed(0)
    batch = 60
    delta = math.sqrt(len(BW)) / batch
    for trial in range(6):
        y = torch.rand(25, 64, generator=g, dtype=torch.float64) * 2 - 1
        ly = torch.randint(0, 3, (25,), generator=g)
        x = torch.rand(1, 64, generator=g, dtype=torch.float64) * 2 - 1
        lx = torch.randint(0, 3, (1,), generator=g)
        if trial % 2:  # the worst case: the record is one of the read points
            y[0], ly[0] = x[0], lx[0]
        k_yy = dpkernel.kernel(y, y, ly, ly, BW) + 1e-10 * torch.eye(25, dtype=torch.float64)
        move = dpkernel.kernel(x, y, lx, ly, BW)[0] / batch
        seen = math.sqrt(float(move @ torch.linalg.solve(k_yy, move)))
        assert seen <= delta * (1 + 1e-6)
        if trial % 2:
            assert seen == pytest.approx(delta, rel=1e-4)
    assert float(dpkernel.kernel(x, x, lx, lx, BW)) == pytest.approx(len(BW))  # k(z, z) = L


def test_gp_noise_has_the_covariance_it_claims() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.rand(6, 10, generator=g) * 2 - 1
    ly = torch.tensor([0, 0, 1, 1, 1, 2])
    k = dpkernel.kernel(y, y, ly, ly, BW)
    draws = torch.stack([dpkernel.gp_noise(k, 0.3, g) for _ in range(20_000)])
    torch.testing.assert_close(draws.T.cov(), 0.09 * k, atol=0.09 * 0.06 * len(BW), rtol=0)
    assert float(draws[:, 0].std()) == pytest.approx(0.3 * math.sqrt(len(BW)), rel=0.03)


def test_a_singular_kernel_gets_more_noise_never_none() -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.zeros(4, 10)  # four identical points: K_YY = L·11ᵀ, rank one
    k = dpkernel.kernel(y, y, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), BW)
    draws = torch.stack([dpkernel.gp_noise(k, 1.0, g) for _ in range(2000)])
    assert float(draws.std()) == pytest.approx(math.sqrt(len(BW)), rel=0.05)  # the noise is there
    with pytest.raises(BenchError, match="refusing to go on without noise"):
        dpkernel.gp_noise(torch.full((3, 3), float("nan")), 1.0, g)


def test_each_step_adds_the_ledgers_noise_on_a_poisson_batch(train, monkeypatch) -> None:
    scales, sizes = [], []
    real_noise, real_step = dpkernel.gp_noise, dpkernel.DPKernel._step
    monkeypatch.setattr(dpkernel, "gp_noise", lambda k, s, gen: scales.append(s) or real_noise(k, s, gen))
    monkeypatch.setattr(
        dpkernel.DPKernel, "_step", lambda self, x, lx, *a: sizes.append(len(x)) or real_step(self, x, lx, *a)
    )
    method, budget = make(train, iterations=40)
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    cfg = method.config
    assert (stage.mechanism, stage.steps) == ("poisson_gaussian", cfg.iterations) == ("poisson_gaussian", len(scales))
    assert stage.sampling_rate == pytest.approx(cfg.batch_size / len(train))
    assert epsilon(ledger, budget.delta, budget.accountant) == pytest.approx(10.0, rel=1e-3)
    delta = math.sqrt(len(cfg.bandwidths)) / cfg.batch_size
    assert scales == [pytest.approx(stage.noise_multiplier * delta)] * cfg.iterations  # s = σΔ at every step
    assert len(set(sizes)) > 1  # Poisson batches: their sizes vary ...
    assert sum(sizes) / len(sizes) == pytest.approx(cfg.batch_size, rel=0.25)  # ... around the expected size
    # the reference's covariance σΔ·K: the noise scale √(σΔ), charged as the multiplier √(σ/Δ)
    ref, _ = make(train, iterations=40, noise_form="reference", noise_multiplier=stage.noise_multiplier)
    scales.clear()
    ref_ledger = fit(ref, train, budget)
    s = math.sqrt(stage.noise_multiplier * delta)
    assert scales[0] == pytest.approx(s)
    assert ref_ledger.stages[0].noise_multiplier == pytest.approx(s / delta)
    assert epsilon(ref_ledger, budget.delta, budget.accountant) < epsilon(ledger, budget.delta, budget.accountant)


def test_the_step_reads_the_noisy_function_at_generated_points_only(train, monkeypatch) -> None:
    """The release is evaluated at Y (the generated points) only: the loss's gradient does not change when the
    private batch's own kernel K_XX would (no mean f̃(X) term, no square of an estimate containing it)."""
    method, budget = make(train, iterations=1)
    fit(method, train, budget)
    shapes = []
    real_kernel = dpkernel.kernel
    monkeypatch.setattr(dpkernel, "kernel", lambda a, b, *r: shapes.append((len(a), len(b))) or real_kernel(a, b, *r))
    x = torch.rand(7, 256) * 2 - 1
    method._step(x, torch.arange(7) % 10, 0.1, torch.Generator().manual_seed(0))
    m = method.config.batch_size
    assert sorted(shapes) == sorted([(7, m), (m, m)])  # K_XY and K_YY; never K_XX


def test_resume_is_the_uninterrupted_run(train) -> None:
    whole, budget = make(train)
    ledger = fit(whole, train, budget)
    part, _ = make(train)
    interrupted = InterruptAt(3)
    fit(part, train, budget, interrupted)
    assert interrupted.saved is not None and interrupted.saved["step"] == 3
    resumed, _ = make(train)
    again = fit(resumed, train, budget, InterruptAt(0, interrupted.saved), seed=7)  # another seed: the checkpoint rules
    assert again.stages == ledger.stages
    labels = torch.arange(20) % 10
    a = whole.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    b = resumed.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    other, _ = make(train)
    fit(other, train, budget, seed=7)  # a fresh run at that seed differs: the test can tell
    assert not torch.equal(a, other.sample(20, labels=labels, generator=torch.Generator().manual_seed(1)))


def test_the_generator_is_the_references_on_32_pixels() -> None:
    gen = dpkernel.CondDecoder(
        DataSpec(channels=1, height=32, width=32, num_classes=10, num_train=100), latent_dim=10, ngf=64
    )
    convs = [m for m in gen.main if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (10, 256, 4), (256, 128, 4), (128, 64, 4), (64, 1, 4)
    ]  # fmt: skip
    out = gen(torch.randn(3, 10), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 32, 32)
    assert dpkernel.upsamplings(28) == (2, 7)
    gen28 = dpkernel.CondDecoder(
        DataSpec(channels=1, height=28, width=28, num_classes=10, num_train=100), latent_dim=10, ngf=64
    )
    assert gen28(torch.randn(2, 10), torch.tensor([0, 1])).shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"ngf": 7}, "ngf must be even"),
        ({"bandwidths": [1.0, -2.0]}, "bandwidths must be finite numbers > 0"),
        ({"bandwidths": []}, "bandwidths must be finite numbers > 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number > 0"),
        ({"noise_form": "loose"}, "noise_form"),
    ],
)
def test_bad_config_is_a_one_line_error(train, sets, message) -> None:
    with pytest.raises(BenchError, match=message) as e:
        make(train, **sets)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("eps", "readme_sigma"), [(10.0, 0.60), (1.0, 1.95)])
def test_calibration_matches_the_references_privacy_statement(eps: float, readme_sigma: float) -> None:
    """The README's noise for n = 60,000, batch 60, 200,000 steps, δ = 1e-5 (TF-Privacy's DP-SGD statement):
    0.60 for ε = 10 and 1.95 for ε = 1. Ours, the same Poisson-subsampled Gaussian, recomputed: within 1%."""
    q = 60 / 60_000
    sigma = calibrate(eps, lambda s: [dpkernel.step_stage(s, q, 200_000, 60)], 1e-5, "rdp")
    assert sigma == pytest.approx(readme_sigma, rel=0.01)
