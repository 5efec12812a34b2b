"""What the two DP-SAD methods share (methods/dpsad.py, methods/dpsad_e2e.py): the configuration both extend,
the networks (student and teacher UNets, the row-independent discriminator), the distillation loss and its
surrogate, the student's DP step (parameter clipping through bench.dpsgd, or output clipping), the fit state,
sampling, and the declarations of what is not DP. No public code of the paper exists (see methods/dpsad.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import at_least, choice, fraction
from bench.contract import ImageDataset, Progress, device_generator
from bench.diffusion import (
    EMA,
    ConditionalDenoiser,
    Schedule,
    draw_noise_multiplicity,
    make_unet,
    q_sample,
    sample_images,
    to_model_range,
)
from bench.dpsgd import DPSGD, MODES, ChargedSteps, clip_factors, poisson_stream
from bench.errors import BenchError
from bench.nets.unet import timestep_embedding
from bench.training import FitState, dp_steps

TEACHER_NOT_DP = "teacher trained on the private training set without DP; its output enters every student loss term"
DISC_NOT_DP = (
    "discriminator trained without DP on teacher and student outputs at private inputs x_r; "
    "its output enters every student loss term"
)
OUTPUT_CLIP_NOT_DP = (
    "clip_target='output': only the gradient w.r.t. the student's output is clipped and noised; "
    "backpropagating it through the student uses the private x_r, so it is not post-processing and "
    "per-example parameter updates are unbounded"
)


@dataclass(frozen=True, kw_only=True)
class CommonConfig:
    # student ε_θ, the released network (the shared UNet)
    base_channels: int = 32  # UNet width (paper: unknown; DPDM's FMNIST net has nf=32)
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (28 -> 14 -> 7)
    num_res_blocks: int = 2  # residual blocks per level
    groups: int = 8  # GroupNorm groups, all networks (never BatchNorm under DP-SGD)
    student_conditional: bool = True  # False: the student never sees labels (samples are unconditional)
    # teacher ε_ψ, "same kind of network"
    teacher_base_channels: int = 32
    teacher_channel_mults: tuple[int, ...] = (1, 2, 2)
    teacher_num_res_blocks: int = 2
    teacher_batch_size: int = 128  # dpsad: shuffled minibatches; dpsad-e2e: expected Poisson batch
    teacher_epochs: float = 50.0  # passes over the private data
    teacher_lr: float = 2e-4  # Adam
    # discriminator ε_φ on (x_r, ε̂)
    disc_channels: int = 32  # width after the input conv, doubled at each level
    disc_levels: int = 2  # stride-2 convolutions (28 -> 14 -> 7)
    disc_conditional: bool = True  # label embedding + projection head (paper: class-conditional)
    disc_timestep: bool = True  # the discriminator also sees r (sinusoidal embedding)
    disc_lr: float = 2e-4  # Adam
    disc_steps: int = 1  # discriminator updates per student step
    # diffusion and distillation
    T: int = 500  # diffusion steps, linear β schedule (paper: 500)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    timesteps_per_example: int = 1  # K draws of (r, ε) per example, averaged before clipping (paper: 1)
    lambda_adv: float = 1.0  # λ, weight of the adversarial term (paper: 1, its ablation's best)
    adversarial_loss: Literal["saturating", "non-saturating"] = "saturating"  # log(1 − D) (paper) or −log D
    # student training under DP
    batch_size: int = 4096  # expected batch size q·N under Poisson sampling (as DPDM)
    epochs: float = 300.0  # student steps = round(epochs / q) (as DPDM)
    lr: float = 3e-4  # Adam
    max_grad_norm: float = 1.0  # clipping bound C
    ema_decay: float = 0.999  # EMA of the student's DP iterates (post-processing), released
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # paper: the student's ancestral chain over T steps
    sample_steps: int = 50  # DDIM steps (ignored by ddpm)
    dp_mode: str = "auto"  # per-example gradient implementation (bench.dpsgd)
    physical_batch_size: int = 512  # examples per chunk of a logical batch (memory only; same step)

    def __post_init__(self) -> None:
        for key in ("batch_size", "teacher_batch_size", "physical_batch_size", "timesteps_per_example"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("epochs", "teacher_epochs", "lr", "teacher_lr", "disc_lr", "max_grad_norm"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not (math.isfinite(self.lambda_adv) and self.lambda_adv >= 0):
            raise ValueError(f"lambda_adv (λ) must be a finite number ≥ 0, got {self.lambda_adv}")
        if self.disc_steps < 0 or self.disc_levels < 0 or self.disc_channels < 1:
            raise ValueError("need disc_steps ≥ 0, disc_levels ≥ 0, disc_channels ≥ 1")
        widths = ("base_channels", "num_res_blocks", "groups", "teacher_base_channels", "teacher_num_res_blocks")
        at_least(self, 1, *widths, "sample_steps")
        for key in ("channel_mults", "teacher_channel_mults"):
            if not getattr(self, key) or min(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a non-empty list of integers ≥ 1, got {list(getattr(self, key))}")
        fraction(self, "ema_decay")
        choice("adversarial_loss", self.adversarial_loss, ("saturating", "non-saturating"))
        choice("sampler", self.sampler, ("ddpm", "ddim"))
        choice("dp_mode", self.dp_mode, MODES)
        Schedule(self.T, self.beta_start, self.beta_end)  # validates T ≥ 2 and β


class Discriminator(nn.Module):
    """ε_φ(x_r, ε̂, r, y) -> logit [B] (teacher = 1, student = 0); x_r, ε̂ float [B, C, H, W]; GroupNorm only."""

    def __init__(self, channels: int, width: int, levels: int, groups: int, num_classes: int, timestep: bool) -> None:
        super().__init__()
        self.width = width
        self.conv_in = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) if timestep else None
        self.label_emb = nn.Embedding(num_classes, width) if num_classes > 0 else None
        self.norms, self.convs = nn.ModuleList(), nn.ModuleList()
        c = width
        for _ in range(levels):
            self.norms.append(nn.GroupNorm(groups, c))
            self.convs.append(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1))
            c *= 2
        self.norm_out = nn.GroupNorm(groups, c)
        self.head = nn.Linear(c, 1)
        self.proj = nn.Embedding(num_classes, c) if num_classes > 0 else None  # projection discriminator

    def forward(self, x: Tensor, e: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h = self.conv_in(torch.cat([x, e], dim=1))
        if self.time_mlp is not None:
            h = h + self.time_mlp(timestep_embedding(t, self.width))[:, :, None, None]
        if self.label_emb is not None:
            h = h + self.label_emb(y)[:, :, None, None]
        for norm, conv in zip(self.norms, self.convs, strict=True):
            h = conv(F.silu(norm(h)))
        h = F.silu(self.norm_out(h)).mean((2, 3))  # [B, c]
        out = self.head(h).squeeze(1)
        if self.proj is not None:
            out = out + (self.proj(y) * h).sum(1)
        return out


@contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """A frozen module inside a loss: gradients flow through it, none accumulate on its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    if not any(flags):  # already frozen (also: inside torch.func transforms, where toggling is refused)
        yield
        return
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def surrogate_loss(model_call: Callable[..., Tensor], x_r: Tensor, r: Tensor, y: Tensor, o: Tensor) -> Tensor:
    """⟨ε_θ(x_r, r, y), o⟩ of ONE example: x_r, o [K, C, H, W], r [K], y [] -> scalar.

    With o = ∂ℓ/∂ε_θ held fixed its parameter gradient is exactly ∇θ ℓ (chain rule)."""
    return (model_call(x_r, r, y.expand(r.shape[0])) * o).sum()


def disc_loss(model_call: Callable[..., Tensor], x_r: Tensor, e: Tensor, r: Tensor, y: Tensor, real: Tensor) -> Tensor:
    """Discriminator loss of ONE example on its rows (teacher and student outputs): BCE on logits.

    x_r, e [R, C, H, W], r [R], y [], real float [R] (1 = teacher, 0 = student) -> scalar."""
    logits = model_call(x_r, e, r, y.expand(r.shape[0]))
    return F.binary_cross_entropy_with_logits(logits, real, reduction="sum") / (r.shape[0] / 2)


class DPSADBase(ConditionalDenoiser):
    """What both variants share: networks, the distillation loss, the student step, sampling."""

    conditional: ClassVar[bool] = True
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Any, *, spec: Any, device: torch.device) -> None:
        # an ablation may drop the student's labels: the instance then declares itself unconditional
        self.conditional = config.student_conditional  # type: ignore[misc]
        super().__init__(config, spec=spec, device=device)

    def _build(self) -> None:
        cfg, spec = self.config, self.spec
        classes = spec.num_classes if cfg.student_conditional else 0
        self.net = make_unet(cfg, channels=spec.channels, num_classes=classes).to(self.device)
        self.ema = EMA(self.net, cfg.ema_decay)
        teacher_cfg = SimpleNamespace(
            base_channels=cfg.teacher_base_channels,
            channel_mults=cfg.teacher_channel_mults,
            num_res_blocks=cfg.teacher_num_res_blocks,
            groups=cfg.groups,
        )
        self.teacher = make_unet(teacher_cfg, channels=spec.channels, num_classes=spec.num_classes).to(self.device)
        self.teacher_ema = EMA(self.teacher, cfg.ema_decay)
        self.disc = Discriminator(
            spec.channels,
            cfg.disc_channels,
            cfg.disc_levels,
            cfg.groups,
            spec.num_classes if cfg.disc_conditional else 0,
            cfg.disc_timestep,
        ).to(self.device)

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] from the student's EMA; int64 `labels` [n] unless the student is unconditional."""
        if labels is None and self.conditional:
            raise BenchError(f"{self.name} is class-conditional: sample() needs labels")
        cfg = self.config
        return sample_images(
            self.ema.model,
            n,
            shape=(self.spec.channels, self.spec.height, self.spec.width),
            labels=labels if self.conditional else None,
            schedule=self.schedule,
            sampler=cfg.sampler,
            steps=cfg.sample_steps,
            generator=generator,
            device=self.device,
        )

    # ----------------------------------------------------------------------------- distillation loss

    def draw(self, x0: Tensor, noise_gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Stochastic distillation: r int64 [B, K], ε and x_r float [B, K, C, H, W] (forward process)."""
        B, K = x0.shape[0], self.config.timesteps_per_example
        r, eps = draw_noise_multiplicity(B, K, tuple(x0.shape[1:]), self.config.T, noise_gen, self.device)
        return r, eps, q_sample(x0.unsqueeze(1).expand(B, K, *x0.shape[1:]), r, eps, self.alpha_bar)

    @torch.no_grad()
    def outputs(self, net: nn.Module, x_r: Tensor, r: Tensor, y: Tensor) -> Tensor:
        """A network's ε̂ on every row, no graph: x_r [B, K, C, H, W], r [B, K], y [B] -> [B, K, C, H, W]."""
        B, K = r.shape
        if B == 0:
            return torch.zeros_like(x_r)
        out = net(x_r.flatten(0, 1), r.flatten(), y.repeat_interleave(K))
        return out.view_as(x_r)

    def losses(self, e: Tensor, e_T: Tensor, eps: Tensor, x_r: Tensor, r: Tensor, y: Tensor) -> Tensor:
        """Per-example student loss ℓ_i [B] (mean over its K rows) for student outputs e [B, K, C, H, W]."""
        B, K = r.shape
        mse_teacher = (e - e_T).pow(2).flatten(2).mean(2)  # [B, K]
        mse_noise = (e - eps).pow(2).flatten(2).mean(2)
        with _no_param_grads(self.disc):
            logits = self.disc(x_r.flatten(0, 1), e.flatten(0, 1), r.flatten(), y.repeat_interleave(K)).view(B, K)
        saturating = self.config.adversarial_loss == "saturating"
        adv = -F.softplus(logits) if saturating else F.softplus(-logits)  # log(1 − D) or −log D, D = σ(logit)
        return (mse_teacher + mse_noise + self.config.lambda_adv * adv).mean(1)

    def output_grads(self, e_S: Tensor, e_T: Tensor, eps: Tensor, x_r: Tensor, r: Tensor, y: Tensor) -> Tensor:
        """o_i = ∂ℓ_i/∂ε_θ(x_r,i) [B, K, C, H, W], all examples in one batched backward (rows independent)."""
        if r.shape[0] == 0:
            return torch.zeros_like(e_S)
        e = e_S.detach().requires_grad_()
        (o,) = torch.autograd.grad(self.losses(e, e_T, eps, x_r, r, y).sum(), e)
        return o

    def distillation_step(
        self, optimizer: torch.optim.Optimizer, x_r: Tensor, r: Tensor, y: Tensor, eps: Tensor, divisor: float
    ) -> None:
        """The non-private reference step: ∇ of Σ_i ℓ_i / divisor through student and discriminator."""
        B, K = r.shape
        e = self.net(x_r.flatten(0, 1), r.flatten(), y.repeat_interleave(K)).view_as(x_r)
        e_T = self.outputs(self.teacher_ema.model, x_r, r, y)
        optimizer.zero_grad(set_to_none=True)
        (self.losses(e, e_T, eps, x_r, r, y).sum() / divisor).backward()
        optimizer.step()

    def disc_plain_step(
        self, optimizer: torch.optim.Optimizer, x_r: Tensor, r: Tensor, y: Tensor, e_T: Tensor, e_S: Tensor
    ) -> None:
        """One non-private discriminator update on a batch of (teacher, student) output pairs."""
        if r.shape[0] == 0:
            return
        K = r.shape[1]
        rows = (x_r.flatten(0, 1).repeat(2, 1, 1, 1), torch.cat([e_T.flatten(0, 1), e_S.flatten(0, 1)]))
        logits = self.disc(*rows, r.flatten().repeat(2), y.repeat_interleave(K).repeat(2))
        real = torch.cat([torch.ones(r.numel()), torch.zeros(r.numel())]).to(self.device)
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(logits, real).backward()
        optimizer.step()

    # -------------------------------------------------------------------------------------- pieces of fit

    def _dp(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: Callable[..., Tensor], *, sigma: float,
        C: float, q: float, n: int, gen: torch.Generator,
    ) -> DPSGD:  # fmt: skip
        """A DP-SGD step on one of the networks, with the run's per-example mode and physical batch."""
        return DPSGD(model, optimizer, per_example_loss=loss, noise_multiplier=sigma, max_grad_norm=C, sample_rate=q,
                     num_records=n, generator=gen, mode=self.config.dp_mode,
                     max_physical_batch_size=self.config.physical_batch_size)  # fmt: skip

    def _student_dp(
        self, optimizer: torch.optim.Optimizer, sigma_eff: float, q: float, n: int, gen: torch.Generator
    ) -> DPSGD:
        return self._dp(self.net, optimizer, surrogate_loss, sigma=sigma_eff, C=self.config.max_grad_norm, q=q, n=n,
                        gen=gen)  # fmt: skip

    def _noise_gen(self, generator: torch.Generator) -> torch.Generator:
        return device_generator(generator, self.device)


class OutputClipStep(ChargedSteps):
    """clip_target = "output": clip each example's output gradient o_i to C, add N(0, σ_eff²C²) to each,
    backpropagate Σ_i (ō_i + z_i) through the student, divide by q·N, step. Counts the steps taken.

    An empty Poisson batch has no output to put noise on: its step adds N(0, σ_eff²C² I) / (q·N) to every
    parameter's gradient, the noise of the poisson_gaussian stage the ledger charges for that step (as a DP-SGD
    step on an empty batch does), instead of a zero step."""

    def __init__(
        self,
        method: DPSADBase,
        optimizer: torch.optim.Optimizer,
        *,
        sigma_eff: float,
        C: float,
        q: float,
        n: int,
        generator: torch.Generator,
    ) -> None:
        self.method, self.optimizer, self.generator = method, optimizer, generator
        self.noise_multiplier, self.max_grad_norm = sigma_eff, C
        self.sample_rate, self.expected_batch_size = q, q * n
        self.steps = 0

    def step(self, x_r: Tensor, r: Tensor, y: Tensor, o: Tensor) -> None:
        net, B, K = self.method.net, r.shape[0], r.shape[1]
        self.optimizer.zero_grad(set_to_none=True)
        if B > 0:
            factors = clip_factors(o.flatten(1).norm(dim=1), self.max_grad_norm)  # [B]
            o = o * factors.view(B, 1, 1, 1, 1)
            largest = o.flatten(1).norm(dim=1).max().item()
            if largest > self.max_grad_norm * (1 + 1e-5):  # a privacy invariant: raise, never assert
                raise RuntimeError(f"clipped output gradient norm {largest} exceeds C = {self.max_grad_norm}")
            if self.noise_multiplier > 0:
                std = self.noise_multiplier * self.max_grad_norm
                o = o + std * torch.randn(o.shape, generator=self.generator, device=o.device)
            e = net(x_r.flatten(0, 1), r.flatten(), y.repeat_interleave(K))
            ((e * o.flatten(0, 1)).sum() / self.expected_batch_size).backward()
        std = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
        for p in net.parameters():
            if p.grad is None:  # an empty batch: the charged Gaussian noise alone (see the class docstring)
                p.grad = std * torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
        self.optimizer.step()
        self.steps += 1


class StudentFit(FitState):
    """The state of one `fit` shared by both variants: data, generators, optimizers, and what is checkpointed.
    `counters` (DP step counters, by name) and `values` (teacher step, permutation, pool) are filled by each
    variant before `resume()`."""

    def __init__(self, method: DPSADBase, train: ImageDataset, generator: torch.Generator, progress: Progress) -> None:
        cfg = method.config
        self.method, self.n = method, len(train)
        self.x = to_model_range(train.images).to(method.device)
        self.y = train.labels.to(method.device)
        self.opt_t = torch.optim.Adam(method.teacher.parameters(), lr=cfg.teacher_lr)
        self.opt_d = torch.optim.Adam(method.disc.parameters(), lr=cfg.disc_lr)
        self.opt_s = torch.optim.Adam(method.net.parameters(), lr=cfg.lr)
        self.counters: dict[str, Any] = {}
        parts = {
            "student": method,
            "teacher": method.teacher,
            "teacher_ema": method.teacher_ema.model,
            "disc": method.disc,
            "optimizers": [self.opt_t, self.opt_d, self.opt_s],
            "counters": self.counters,
        }
        # timesteps, ε and DP noise are drawn where the parameters live
        super().__init__(progress, generator, method._noise_gen(generator), parts)

    def student_phase(self, student: Any, steps: int, q: float, disc_update: Callable[..., None]) -> None:
        """Poisson batches; per batch: draw (r, ε), teacher and student outputs, discriminator update(s),
        output gradients with the updated discriminator, one noisy student step, EMA."""
        m = self.method

        def step(idx: Tensor) -> None:
            x0, y = self.x[idx], self.y[idx]
            r, eps, x_r = m.draw(x0, self.noise_gen)
            e_T = m.outputs(m.teacher_ema.model, x_r, r, y)  # frozen teacher: outside the per-example grads
            e_S = m.outputs(m.net, x_r, r, y)
            if m.config.lambda_adv > 0:  # with λ = 0 the discriminator never enters the student's loss
                disc_update(x_r, r, y, e_T, e_S)
            student.step(x_r, r, y, m.output_grads(e_S, e_T, eps, x_r, r, y))
            m.ema.update(m.net)

        dp_steps(self, student, steps, poisson_stream(self.n, q, self.generator), m.device, step)
