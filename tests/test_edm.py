"""σ-space diffusion as DPDM runs it (bench.diffusion.edm): preconditioning, training noise levels, loss, label dropout,
guidance, samplers on a Gaussian whose exact denoiser is known, the EMA warm-up and the sampler presets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bench.config import resolve
from bench.diffusion import EMA, edm
from bench.errors import BenchError

SD = math.sqrt(1.0 / 3.0)


def test_edm_coefficients_are_karras_table_1_with_dpdm_sigma_data() -> None:
    pre = edm.Preconditioning("edm")
    assert pre.sigma_data == pytest.approx(SD)
    sigma = torch.tensor([0.01, 0.3, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    for s, a, b, c, d in zip(sigma.tolist(), c_skip, c_out, c_in, c_noise, strict=True):
        assert float(a) == pytest.approx(SD**2 / (s**2 + SD**2))
        assert float(b) == pytest.approx(s * SD / math.sqrt(s**2 + SD**2))
        assert float(c) == pytest.approx(1 / math.sqrt(s**2 + SD**2))
        assert float(d) == pytest.approx(math.log(s) / 4)
    # Karras et al. Eq. 7-8: the network's input has unit variance, and λ(σ)·c_out(σ)² = 1 (effective weight 1)
    assert torch.allclose(c_in**2 * (SD**2 + sigma**2), torch.ones_like(sigma))
    assert torch.allclose(pre.weight(sigma) * c_out**2, torch.ones_like(sigma))


def test_v_coefficients_and_noise_conditioning_are_the_references() -> None:
    pre = edm.Preconditioning("v")
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    assert torch.allclose(c_skip, 1 / (sigma**2 + 1)) and torch.allclose(c_out, sigma / (1 + sigma**2).sqrt())
    assert torch.allclose(c_in, 1 / (1 + sigma**2).sqrt())
    assert torch.allclose(c_noise, torch.arctan(sigma) * 2 / math.pi)  # = t with σ = tan(πt/2)
    assert torch.allclose(pre.weight(sigma), (sigma**2 + 1) / sigma**2)


@pytest.mark.parametrize("kind", ["edm", "v"])
def test_at_sigma_to_zero_the_denoiser_returns_its_input(kind: str) -> None:
    pre = edm.Preconditioning(kind)
    x = torch.randn(4, 1, 5, 5)
    net = lambda a, c, y: torch.ones_like(a) * 7.0  # noqa: E731  # any bounded network output
    d = pre.denoise(net, x, torch.full((4,), 1e-6), None)
    assert torch.allclose(d, x, atol=1e-4)


def test_training_noise_levels_follow_the_reference_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    s = edm.NoiseLevels("edm").draw((100_000,), g, torch.device("cpu"))
    assert float(s.log().mean()) == pytest.approx(-1.2, abs=0.02)
    assert float(s.log().std()) == pytest.approx(1.2, rel=0.02)
    v = edm.NoiseLevels("v").draw((100_000,), g, torch.device("cpu"))
    logsnr = -2 * v.log()  # σ² = e^(−λ)
    assert float(logsnr.min()) >= -9 - 1e-3 and float(logsnr.max()) <= 13 + 1e-3
    assert float(logsnr.min()) < -8.5 and float(logsnr.max()) > 12  # the whole range is used


def test_multiplicity_loss_is_the_batch_loss_of_one_example() -> None:
    torch.manual_seed(0)
    pre, conv = edm.Preconditioning("edm"), torch.nn.Conv2d(1, 1, 3, padding=1)
    net = lambda a, c, y: conv(a) * (1 + c.reshape(-1, 1, 1, 1))  # noqa: E731
    x0, sigma, noise = torch.randn(1, 6, 6), torch.rand(4) * 3 + 0.1, torch.randn(4, 1, 6, 6)
    per_example = edm.multiplicity_loss(pre, net, x0, torch.tensor(2), sigma, noise)
    batch = edm.loss(pre, net, x0.expand(4, 1, 6, 6), torch.full((4,), 2), sigma[:, None], noise[:, None])
    assert torch.allclose(per_example, batch)
    d = pre.denoise(net, x0 + sigma[0] * noise[:1], sigma[:1], None)
    by_hand = torch.stack(
        [pre.weight(sigma[k]) * (pre.denoise(net, x0 + sigma[k] * noise[k : k + 1], sigma[k : k + 1], None) - x0)
         .pow(2).mean() for k in range(4)]
    ).mean()  # fmt: skip
    assert d.shape == (1, 1, 6, 6) and torch.allclose(per_example, by_hand)


def test_label_dropout_rate_is_observed_and_zero_draws_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (50_000,), generator=g)
    out = edm.drop_labels(y, 0.1, 10, g)
    dropped = (out == 10).float().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 50_000)  # within 4 binomial standard deviations
    assert torch.equal(out[out != 10], y[out != 10])
    state = g.get_state()
    assert edm.drop_labels(y, 0.0, 10, g) is y and torch.equal(g.get_state(), state)


def test_guidance_zero_is_the_conditional_denoiser_and_w_mixes_as_the_reference() -> None:
    calls: list[Tensor] = []

    def d(x: Tensor, s: Tensor, y: Tensor | None) -> Tensor:
        calls.append(y if y is not None else torch.tensor([]))
        return x * 0 + (y.float() if y is not None else torch.tensor(-1.0)).reshape(-1, 1, 1, 1)

    assert edm.guided(d, 0.0, 10) is d
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3])
    out = edm.guided(d, 0.5, 10)(x, torch.ones(3), y)
    expected = 1.5 * y.float() - 0.5 * 10.0  # (1 + w)·D(y) − w·D(∅), ∅ = class index 10
    assert torch.allclose(out[:, 0, 0, 0], expected)


def _gaussian_denoiser(mu: float, s: float) -> edm.Denoiser:
    """The exact E[x0 | x] for x0 ~ N(mu, s²) and x = x0 + σ·n."""

    def d(x: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        v = sigma.reshape(-1, 1, 1, 1) ** 2
        return (s**2 * x + v * mu) / (s**2 + v)

    return d


@pytest.mark.parametrize(
    "settings",
    [
        edm.SamplerSettings(sampler="ddim", steps=300),  # Euler: first order, needs more levels
        edm.SamplerSettings(sampler="edm-heun", steps=30),
        edm.SamplerSettings(sampler="edm-stochastic", steps=100, s_churn=20.0, s_min=0.01, s_max=50.0),
    ],
    ids=lambda s: s.sampler,
)
def test_each_sampler_draws_the_gaussian_its_exact_denoiser_describes(settings: edm.SamplerSettings) -> None:
    mu, s = 0.3, 0.5
    g = torch.Generator().manual_seed(2)
    x = edm.sample(_gaussian_denoiser(mu, s), (40_000, 1, 1, 1), None, settings, g, torch.device("cpu"))
    assert float(x.mean()) == pytest.approx(mu, abs=0.015)
    assert float(x.std()) == pytest.approx(s, rel=0.03)


def test_euler_and_heun_errors_shrink_at_their_orders() -> None:
    """The σ-space DDIM is Euler (error ∝ 1/N), edm-heun second order (∝ 1/N²): checked on the Gaussian."""

    def std_error(sampler: str, n: int) -> float:
        g = torch.Generator().manual_seed(3)
        x = edm.sample(_gaussian_denoiser(0.0, 0.5), (20_000, 1, 1, 1), None, edm.SamplerSettings(sampler=sampler,
                       steps=n), g, torch.device("cpu"))  # fmt: skip
        return abs(float(x.std()) - 0.5)

    assert 2.0 < std_error("ddim", 20) / std_error("ddim", 60) < 4.5
    assert std_error("edm-heun", 20) / std_error("edm-heun", 60) > 6.0


def test_sampler_levels_are_the_rho_schedule() -> None:
    lv = edm.SamplerSettings(steps=5).levels(torch.device("cpu")).double()
    i = torch.arange(5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(lv, expected, rtol=1e-5)


def test_ema_warm_up_is_the_references_schedule() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(net, 0.999, warmup=True)
    seen = []
    for _ in range(5):
        seen.append(ema.current_decay())
        ema.update(net)
    assert seen == pytest.approx([(1 + n) / (10 + n) for n in range(1, 6)]) and ema.updates == 5
    assert EMA(net, 0.999).current_decay() == 0.999
    ema.updates = 10**6
    assert ema.current_decay() == 0.999


def test_sampler_presets_expand_per_dataset_and_epsilon_and_set_values_win() -> None:
    from baselines.dpdm import Config

    cfg, _ = resolve(Config, profile={}, method="dpdm", dataset="fmnist", epsilon=10.0, sets={"sampler_preset": "fid"})
    assert (cfg.sampler, cfg.sample_steps, cfg.s_churn, cfg.s_min, cfg.s_max, cfg.guidance) == (
        "edm-stochastic", 1000, 50.0, 0.025, 50.0, 1.0
    )  # fmt: skip
    cfg, _ = resolve(Config, profile={"dpdm": {"sampler_preset": "acc"}}, method="dpdm", dataset="mnist",
                     epsilon=1.0, sets={"sample_steps": 100})  # fmt: skip
    assert (cfg.s_churn, cfg.s_min, cfg.sample_steps) == (10.0, 0.1, 100)
    with pytest.raises(BenchError, match="no published 'fid' sampler preset for fmnist at ε=0.2"):
        resolve(Config, profile={}, method="dpdm", dataset="fmnist", epsilon=0.2, sets={"sampler_preset": "fid"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"parameterization": "x0"}, "parameterization must be one of"),
        ({"sampler": "ddpm"}, "does not fit parameterization 'edm'"),
        ({"parameterization": "eps", "sampler": "edm-heun"}, "does not fit parameterization 'eps'"),
        ({"label_dropout": 1.0}, "label_dropout must be in"),
        ({"guidance": 1.0, "label_dropout": 0.0}, "guidance > 0 needs label_dropout > 0"),
        ({"sample_steps": 1}, "sample_steps must be >= 2"),
        ({"sampler_preset": "best"}, "sampler_preset must be one of"),
    ],
)
def test_bad_diffusion_fields_are_refused(fields: dict, message: str) -> None:
    from baselines.dpdm import Config

    with pytest.raises(ValueError, match=message):
        Config(**fields)
