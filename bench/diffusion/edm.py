"""Diffusion in σ-space as DPDM runs it: preconditioned denoisers, training noise levels, the weighted
denoising loss with noise multiplicity, label dropout, classifier-free guidance and the samplers.

Reproduces nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:
- denoiser.py: `EDMDenoiser` (Karras et al. 2022, "Elucidating the design space of diffusion-based generative
  models", Table 1: c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ_d² + σ²), c_in = 1/√(σ_d² + σ²),
  c_noise = ¼·ln σ, with DPDM's σ_d = √(1/3), the standard deviation of data uniform on [−1, 1]) and
  `VDenoiser` (c_skip = 1/(σ² + 1), c_out = σ/√(1 + σ²), c_in = 1/√(1 + σ²), c_noise = (2/π)·arccos(1/√(1 + σ²))).
- score_losses.py: `EDMLoss` (ln σ ~ N(P_mean, P_std²), reference −1.2 and 1.2; weight (σ² + σ_d²)/(σ·σ_d)²) and
  `VLoss` (t ~ U[t(logsnr_max), t(logsnr_min)] with t(λ) = (2/π)·arccos(1/√(1 + e^(−λ))), σ = tan(πt/2),
  reference logsnr −9..13; weight (σ² + 1)/σ²); each example's loss is the mean over its K draws and its pixels of
  weight · (D(x + σn; σ, y) − x)²; `dropout_label_for_cfg_training`: each example's label is replaced by the
  "no label" class (index num_classes) with probability p (reference 0.1), once for all its K draws.
- samplers.py: `ddim_sampler` (σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, N levels, σ_max 80,
  σ_min 0.002, ρ 7; Euler steps of dx/dσ = (x − D)/σ between the levels, then one last denoising at σ_min: N
  network calls), `edm_sampler` (the same levels and σ = 0 appended; Heun's 2nd-order correction on every step
  but the last; with S_churn > 0, noise is added back on levels within [S_min, S_max]: γ = min(S_churn/N, 1),
  the reference's churn limit 1, not Karras et al.'s √2 − 1) and `guidance_wrapper`
  ((1 + w)·D(x; σ, y) − w·D(x; σ, ∅)).

Deviations (none changes a result): the draws (σ, noise, label dropout) come from the run's generator outside the
per-example loss, so that DP-SGD's per-example gradient modes see a deterministic loss; the reference draws them
inside its loss. The reference's stochastic DDIM variant (`stochastic: True`) is not built: no published config
uses it. The σ-space "ddim" sampler is the reference's deterministic Euler sampler; DDPM's own DDIM in timestep
space (bench.diffusion) serves the "eps" parameterization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Network = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (c_in·x, c_noise [B], y [B]) -> F
Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x, σ [B], y [B]) -> D(x; σ, y)

PARAMETERIZATIONS = ("edm", "v", "eps")
SIGMA_SAMPLERS = ("ddim", "edm-heun", "edm-stochastic")
SIGMA_DATA = math.sqrt(1.0 / 3.0)  # DPDM's σ_d: data uniform on [−1, 1]


def _col(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1]."""
    return v.reshape(-1, 1, 1, 1)


@dataclass(frozen=True)
class Preconditioning:
    """D(x; σ, y) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), y) of DPDM's EDM or V denoiser."""

    kind: str = "edm"  # "edm" | "v"
    sigma_data: float = SIGMA_DATA

    def __post_init__(self) -> None:
        if self.kind not in ("edm", "v"):
            raise ValueError(f"preconditioning must be 'edm' or 'v', got {self.kind!r}")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"sigma_data must be a finite number > 0, got {self.sigma_data}")

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each shaped like `sigma`."""
        if self.kind == "edm":
            sd2 = self.sigma_data**2
            c_skip = sd2 / (sigma**2 + sd2)
            c_out = sigma * self.sigma_data / (sd2 + sigma**2).sqrt()
            c_in = 1.0 / (sd2 + sigma**2).sqrt()
            c_noise = 0.25 * sigma.log()
        else:
            c_skip = 1.0 / (sigma**2 + 1.0)
            c_out = sigma / (1.0 + sigma**2).sqrt()
            c_in = 1.0 / (1.0 + sigma**2).sqrt()
            c_noise = 2.0 * torch.arccos(1.0 / (1.0 + sigma**2).sqrt()) / math.pi
        return c_skip, c_out, c_in, c_noise

    def weight(self, sigma: Tensor) -> Tensor:
        """The loss weight λ(σ) of the reference (EDMLoss / VLoss)."""
        if self.kind == "edm":
            return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (sigma**2 + 1.0) / sigma**2

    def denoise(self, net: Network, x: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        """D(x; σ, y) for x [B, C, H, W] and σ [B]."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return _col(c_skip) * x + _col(c_out) * net(_col(c_in) * x, c_noise, y)


@dataclass(frozen=True)
class NoiseLevels:
    """Training noise levels: EDM's log-normal (p_mean, p_std) or V's uniform-in-t between two log-SNRs."""

    kind: str = "edm"
    p_mean: float = -1.2
    p_std: float = 1.2
    logsnr_min: float = -9.0
    logsnr_max: float = 13.0

    def __post_init__(self) -> None:
        if self.kind not in ("edm", "v"):
            raise ValueError(f"noise levels must be 'edm' or 'v', got {self.kind!r}")
        if not self.p_std > 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {self.logsnr_min}, {self.logsnr_max}")

    @staticmethod
    def t_of_logsnr(logsnr: float) -> float:
        return 2.0 * math.acos(1.0 / math.sqrt(1.0 + math.exp(-logsnr))) / math.pi

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
        """σ of the given shape (float32), from `generator`."""
        if self.kind == "edm":
            return (self.p_mean + self.p_std * torch.randn(shape, generator=generator, device=device)).exp()
        lo, hi = self.t_of_logsnr(self.logsnr_max), self.t_of_logsnr(self.logsnr_min)
        t = lo + (hi - lo) * torch.rand(shape, generator=generator, device=device)
        return torch.tan(math.pi * t / 2.0)


def drop_labels(y: Tensor, p: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Each label replaced by the "no label" class `num_classes` with probability p (classifier-free guidance
    training); y int64 [B]. p = 0 draws nothing."""
    if p <= 0:
        return y
    drop = (torch.rand(y.shape, generator=generator, device=generator.device) < p).to(y.device)
    return torch.where(drop, torch.full_like(y, num_classes), y)


def loss(pre: Preconditioning, net: Network, x0: Tensor, y: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """The weighted denoising loss, the mean over a batch of its K draws per example and pixels of
    λ(σ)·(D(x0 + σ·n; σ, y) − x0)²: x0 [B, C, H, W] in [−1, 1], y [B] int64 (already label-dropped), σ [B, K],
    noise [B, K, C, H, W] -> scalar. The network runs once on the B·K rows."""
    B, K = sigma.shape
    x = x0.unsqueeze(1).expand(B, K, *x0.shape[1:]).flatten(0, 1)
    s = sigma.flatten()
    d = pre.denoise(net, x + _col(s) * noise.flatten(0, 1), s, y.repeat_interleave(K))
    return (_col(pre.weight(s)) * (d - x) ** 2).mean()


def multiplicity_loss(
    pre: Preconditioning, net: Network, x0: Tensor, y: Tensor, sigma: Tensor, noise: Tensor
) -> Tensor:
    """`loss` of ONE example averaged over its K draws (DPDM's noise multiplicity, before clipping): x0 [C, H, W],
    y [], σ [K], noise [K, C, H, W] -> scalar."""
    return loss(pre, net, x0[None], y[None], sigma[None], noise[None])


def guided(denoiser: Denoiser, weight: float, num_classes: int) -> Denoiser:
    """Classifier-free guidance: (1 + w)·D(x; σ, y) − w·D(x; σ, ∅); w = 0 is the conditional denoiser itself.
    Any (x, noise level, y) callable works the same way: an ε-predictor (x, t, y) gives DDPM's guided ε."""
    if weight == 0:
        return denoiser

    def d(x: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            return denoiser(x, sigma, None)
        null = torch.full_like(y, num_classes)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return (1.0 + weight) * cond - weight * uncond

    return d


@dataclass(frozen=True)
class SamplerSettings:
    """A σ-space sampler of the reference (samplers.py) and its settings."""

    sampler: str = "ddim"  # "ddim" | "edm-heun" | "edm-stochastic"
    steps: int = 50  # noise levels N
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0  # edm-stochastic only
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.sampler not in SIGMA_SAMPLERS:
            raise ValueError(f"unknown σ-space sampler {self.sampler!r}; choose one of {', '.join(SIGMA_SAMPLERS)}")
        if self.steps < 2:
            raise ValueError(f"sample_steps must be >= 2, got {self.steps}")
        if not 0 < self.sigma_min < self.sigma_max or self.rho <= 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {self.sigma_min}, {self.sigma_max}")
        if self.s_churn < 0 or self.s_noise < 0:
            raise ValueError(f"need s_churn >= 0 and s_noise >= 0, got {self.s_churn}, {self.s_noise}")

    def levels(self, device: torch.device) -> Tensor:
        """σ_0 = σ_max > … > σ_{N−1} = σ_min (Karras et al. Eq. 5), float32 [N]."""
        lo, hi = self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)
        return torch.linspace(hi, lo, self.steps, device=device) ** self.rho


@torch.no_grad()
def sample(
    denoiser: Denoiser, shape: tuple[int, ...], y: Tensor | None, settings: SamplerSettings,
    generator: torch.Generator, device: torch.device,
) -> Tensor:  # fmt: skip
    """Samples from noise σ_max·N(0, I) with the chosen sampler: float [B, C, H, W] (not clamped)."""
    levels = settings.levels(device)
    x = torch.randn(shape, generator=generator, device=device) * levels[0]
    ones = torch.ones(shape[0], device=device)
    if settings.sampler == "ddim":
        for s0, s1 in zip(levels[:-1], levels[1:], strict=True):
            x = x + (s1 - s0) * (x - denoiser(x, s0 * ones, y)) / s0
        return denoiser(x, levels[-1] * ones, y)
    levels = torch.cat([levels, levels.new_zeros(1)])
    n = settings.steps
    churn = settings.s_churn if settings.sampler == "edm-stochastic" else 0.0
    for i, (s0, s1) in enumerate(zip(levels[:-1], levels[1:], strict=True)):
        gamma = min(churn / n, 1.0) if settings.s_min <= float(s0) <= settings.s_max else 0.0
        s_hat = s0 + gamma * s0
        if gamma > 0:
            x = x + settings.s_noise * (s_hat**2 - s0**2).sqrt() * torch.randn(
                shape, generator=generator, device=device
            )
        d = denoiser(x, s_hat * ones, y)
        slope = (x - d) / s_hat
        x_next = x + (s1 - s_hat) * slope
        if i < n - 1:  # Heun's correction; the last step (to σ = 0) is Euler and returns D
            slope2 = (x_next - denoiser(x_next, s1 * ones, y)) / s1
            x_next = x + (s1 - s_hat) * (0.5 * slope + 0.5 * slope2)
        x = x_next
    return x
