"""DDPM (Ho et al. 2020) in the "eps" parameterization, DP-SAD's: the schedule, the forward process, the losses
(with DPDM's noise multiplicity), the DDPM and DDIM (Song et al. 2021) samplers, and the UNet that predicts ε.

Notation: β_t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, timesteps t ∈ {0..T−1}
(0-based). Images live in [−1, 1] inside the model and uint8 0..255 outside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bench.contract import device_generator
from bench.pixels import to_uint8

if TYPE_CHECKING:
    pass

EpsModel = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x_t, t, y) -> predicted ε


@dataclass(frozen=True)
class Schedule:
    """Linear β schedule (DDPM): β from beta_start to beta_end over T steps."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.T < 2:
            raise ValueError(f"T must be ≥ 2, got {self.T}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start ≤ beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def betas(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64, device=device)

    def alpha_bar(self, device: torch.device | str = "cpu") -> Tensor:
        """ᾱ_t, float32 [T]."""
        return torch.cumprod(1.0 - self.betas(device), dim=0).float()


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward process: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε. x0, noise [..., C, H, W], t [...]."""
    ab = alpha_bar[t].reshape(*t.shape, 1, 1, 1)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def draw_noise_multiplicity(
    n: int, K: int, shape: tuple[int, ...], T: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """K independent (timestep, noise) draws per example: t int64 [n, K], ε float [n, K, *shape]."""
    t = torch.randint(0, T, (n, K), generator=generator, device=device)
    noise = torch.randn((n, K, *shape), generator=generator, device=device)
    return t, noise


def denoising_loss(model: EpsModel, x0: Tensor, y: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """DDPM's ε-prediction loss, the mean over a batch of its K draws per example and pixels: x0 [B,C,H,W] in
    [−1,1], y [B] int64, t [B,K], noise [B,K,C,H,W] -> scalar. The model runs once on the B·K rows."""
    B, K = t.shape
    x_t = q_sample(x0.unsqueeze(1).expand(B, K, *x0.shape[1:]), t, noise, alpha_bar)
    return (model(x_t.flatten(0, 1), t.flatten(), y.repeat_interleave(K)) - noise.flatten(0, 1)).pow(2).mean()


def multiplicity_loss(model: EpsModel, x0: Tensor, y: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """`denoising_loss` of ONE example averaged over its K draws (DPDM's noise multiplicity): x0 [C,H,W], y [],
    t [K], noise [K,C,H,W] -> scalar. The average over K comes before any clipping, so K costs no privacy
    (Dockhorn et al. 2023, Sec. 3.2)."""
    return denoising_loss(model, x0[None], y[None], t[None], noise[None], alpha_bar)


@torch.no_grad()
def ddpm_sample(
    model: EpsModel,
    shape: tuple[int, ...],
    labels: Tensor | None,
    schedule: Schedule,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """Ancestral sampling (DDPM Alg. 2) with σ_t² = β_t. Returns float [N,C,H,W] in [−1,1] (clamped)."""
    betas = schedule.betas(device).float()
    alpha_bar = schedule.alpha_bar(device)
    x = torch.randn(shape, generator=generator, device=device)
    for t in reversed(range(schedule.T)):
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        eps = model(x, tt, labels)
        alpha_t = 1.0 - betas[t]
        mean = (x - betas[t] / (1.0 - alpha_bar[t]).sqrt() * eps) / alpha_t.sqrt()
        if t > 0:
            mean = mean + betas[t].sqrt() * torch.randn(shape, generator=generator, device=device)
        x = mean
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def ddim_sample(
    model: EpsModel,
    shape: tuple[int, ...],
    labels: Tensor | None,
    schedule: Schedule,
    generator: torch.Generator,
    device: torch.device,
    steps: int = 50,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) on `steps` evenly spaced timesteps; eta = 0 is deterministic."""
    if not 1 <= steps <= schedule.T:
        raise ValueError(f"DDIM steps must be in 1..{schedule.T}, got {steps}")
    alpha_bar = schedule.alpha_bar(device)
    ts = torch.linspace(schedule.T - 1, 0, steps, device=device).round().long().unique_consecutive()
    x = torch.randn(shape, generator=generator, device=device)
    for i, t in enumerate(ts.tolist()):
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        eps = model(x, torch.full((shape[0],), t, dtype=torch.long, device=device), labels)
        x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1.0, 1.0)
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # consistent with the clamped x0
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
    return x.clamp(-1.0, 1.0)


def sample_images(
    model: EpsModel,
    n: int,
    *,
    shape: tuple[int, int, int],
    labels: Tensor | None,
    schedule: Schedule,
    sampler: str,
    steps: int,
    generator: torch.Generator,
    device: torch.device,
    batch_size: int = 500,
) -> Tensor:
    """Generate n images in batches; returns uint8 [n, C, H, W] on the CPU."""
    generator = device_generator(generator, device)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        y = labels[start : start + m].to(device) if labels is not None else None
        if sampler == "ddpm":
            x = ddpm_sample(model, (m, *shape), y, schedule, generator, device)
        elif sampler == "ddim":
            x = ddim_sample(model, (m, *shape), y, schedule, generator, device, steps=steps)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
        out.append(to_uint8(x).cpu())
    return torch.cat(out) if out else torch.zeros((0, *shape), dtype=torch.uint8)


def make_unet(config: object, *, channels: int, num_classes: int) -> nn.Module:
    """The shared UNet from a method config that has base_channels/channel_mults/num_res_blocks/groups."""
    from bench.nets.unet import UNet, UNetConfig

    return UNet(
        UNetConfig(
            in_channels=channels,
            base_channels=config.base_channels,  # type: ignore[attr-defined]
            channel_mults=tuple(config.channel_mults),  # type: ignore[attr-defined]
            num_res_blocks=config.num_res_blocks,  # type: ignore[attr-defined]
            groups=config.groups,  # type: ignore[attr-defined]
            num_classes=num_classes,
        )
    )


def check_resolution(height: int, width: int, channel_mults: tuple[int, ...]) -> None:
    factor = 2 ** (len(channel_mults) - 1)
    if height % factor or width % factor:
        raise ValueError(f"image size {height}×{width} is not divisible by {factor} (channel_mults={channel_mults})")
