"""DP-SAD: stochastic adversarial distillation of diffusion models (Liu, Wang, Ge, ECCV 2024, arXiv 2408.14738).

Two registered methods share this file (see shared/METHODS.md, "DP-SAD"):

`dpsad` — the paper's mechanism. A class-conditional DDPM teacher ε_ψ (linear β, T = 500) is trained on
the private data WITHOUT DP. A student ε_θ of the same kind is distilled from it: each Poisson-sampled
example draws one timestep r and noise ε, x_r = sqrt(ᾱ_r)·x_0 + sqrt(1 − ᾱ_r)·ε, and its loss is

    ℓ_i(θ) = ‖ε_ψ(x_r, r, y) − ε_θ(x_r, r, y)‖² + ‖ε − ε_θ(x_r, r, y)‖² + λ · L_adv(ε_φ(x_r, ε_θ(x_r, r, y), y))

(squared norms as means over pixels; L_adv = log(1 − D), the paper's form, or −log D). The
class-conditional discriminator ε_φ sees (x_r, teacher or student output) and is trained, without DP,
to tell teacher (label 1) from student (label 0). The student's updates are clipped and noised:

- clip_target = "params": DP-SGD (bench.dpsgd.DPSGD) on ℓ_i: per-example parameter gradients ḡ_i clipped
  to C, g̃ = (Σ ḡ_i + z) / (q·N).
- clip_target = "output" (what secondary reports say the paper does): the gradient of ℓ_i with respect
  to the student's OUTPUT, o_i = ∂ℓ_i/∂ε_θ(x_r,i) [K, C, H, W], is clipped to C, each example's clipped
  o_i gets its own N(0, σ_eff²C²) noise, and the noisy output gradients are backpropagated through the
  student: g̃ = Σ_i J_i^T (ō_i + z_i) / (q·N). The paper calls the backward pass post-processing; it is
  not, since J_i depends on the private x_r, so the parameter update of one example is unbounded. The
  ledger charges the Gaussian mechanism on the output gradients and declares this under `non_private`.
- noise_divisor = "B": z ~ N(0, σ²C²) is added to the clipped sum and the whole is divided by q·N
  (DP-SGD). noise_divisor = "BT" (secondary reports): the noise alone is divided by B·T while the sum
  is divided by B, i.e. g̃ = (Σ ḡ_i + z/T) / (q·N). The clipped sum has L2 sensitivity C under
  add/remove-one, and z/T ~ N(0, (σ/T)²C²), so the Gaussian mechanism actually executed has noise
  multiplier σ_eff = σ/T (the final division by q·N is post-processing). **The ledger's student stage
  charges σ_eff = σ/T**, and the code adds exactly σ_eff·C (DPSGD is built with noise_multiplier σ_eff);
  the ε the harness recomputes is therefore far above the target and such a run is refused as over
  budget, which is the point. σ itself is calibrated the way the paper's analysis does: Poisson
  subsampled Gaussian with multiplier σ over the student's steps, teacher and discriminator ignored;
  that analysis' ε (of σ, not σ_eff) is the card's `claimed_epsilon`.

Its ledger lists the teacher and the discriminator under `non_private`: every student loss term depends
on networks trained on all private records, so one record changes every example's gradient and the
clipping bound no longer bounds the sensitivity. Guarantee "partial".

`dpsad-e2e` — the same algorithm made end-to-end DP: the teacher is trained with DP-SGD (Poisson
sampling, noise multiplicity K, as DPDM); the discriminator either with DP-SGD on its own Poisson
samples (each example's loss on its (teacher, student) output pair clipped as a whole, as DP-GAN) or only
on images the DP teacher generated (post-processing, no charge); the student with per-example clipping
of its whole loss (clip_target "params", divisor q·N). Teacher and discriminator are DP outputs when
they enter the student's loss, so that loss is a function of the example and of DP outputs only.
`budget_split` (teacher, discriminator, student) sets each stage's σ as if it alone spent its share of
ε; all σ are then scaled by one common factor so that the composed ledger meets ε (composition is
tighter than adding the shares). One ledger, three stages, guarantee "end-to-end".

Speed: the teacher's output and the output gradient o_i (which runs the discriminator) are computed
batched, outside the per-example gradient. The per-example gradient of ℓ_i equals that of the surrogate
⟨ε_θ(x_r, r, y), o_i⟩ (chain rule, o_i held fixed), a loss with one student call and nothing else, which
bench.dpsgd's fast "folded" mode handles. This needs a discriminator that treats rows independently
(GroupNorm, never BatchNorm), which tests/test_dpsad.py checks.

Choices the paper leaves open (UNet sizes, batch size, learning rates, C, iterations) are config fields
with a comment each; δ follows the harness rule.
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

from bench.contract import ImageDataset, Progress, device_generator
from bench.diffusion import (
    EMA,
    ConditionalDenoiser,
    Schedule,
    draw_noise_multiplicity,
    make_unet,
    multiplicity_loss,
    q_sample,
    sample_images,
    to_model_range,
)
from bench.dpsgd import DPSGD, MODES, ChargedSteps, clip_factors, poisson_stream
from bench.errors import BenchError
from bench.nets import seeded_init
from bench.nets.unet import timestep_embedding
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate, calibrate_sigma, epsilon

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
        _choice("adversarial_loss", self.adversarial_loss, ("saturating", "non-saturating"))
        _choice("sampler", self.sampler, ("ddpm", "ddim"))
        _choice("dp_mode", self.dp_mode, MODES)
        Schedule(self.T, self.beta_start, self.beta_end)  # validates T ≥ 2 and β


def _choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Config(CommonConfig):
    clip_target: Literal["params", "output"] = "params"  # what is clipped: see the module docstring
    noise_divisor: Literal["B", "BT"] = "B"  # "BT" adds noise σC/T: charged as σ/T (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("clip_target", self.clip_target, ("params", "output"))
        _choice("noise_divisor", self.noise_divisor, ("B", "BT"))


@dataclass(frozen=True, kw_only=True)
class E2EConfig(CommonConfig):
    budget_split: tuple[float, ...] = (0.4, 0.2, 0.4)  # shares of ε: (teacher, discriminator, student)
    teacher_batch_size: int = 4096  # expected Poisson batch of the DP teacher (as DPDM)
    teacher_epochs: float = 300.0  # DP teacher steps = round(teacher_epochs / q_teacher) (as DPDM)
    teacher_lr: float = 3e-4
    teacher_noise_multiplicity: int = 32  # K of the DP teacher's loss (DPDM: 32)
    teacher_max_grad_norm: float = 1.0  # C of the teacher
    disc_training: Literal["dpsgd", "teacher-samples"] = "dpsgd"  # DP-SGD, or on DP teacher samples only
    disc_batch_size: int = 1024  # dpsgd: expected Poisson batch; teacher-samples: minibatch of the pool
    disc_max_grad_norm: float = 1.0  # C of the discriminator (dpsgd)
    pool_size: int = 2000  # teacher-samples: images generated by the DP teacher (post-processing)
    pool_sample_steps: int = 50  # DDIM steps for the pool

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("disc_training", self.disc_training, ("dpsgd", "teacher-samples"))
        split = self.budget_split
        if len(split) != 3 or any(not (math.isfinite(s) and s >= 0) for s in split):
            raise ValueError(f"budget_split must be 3 shares ≥ 0 (teacher, discriminator, student), got {list(split)}")
        if abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"budget_split must sum to 1, got {list(split)} (sum {sum(split):g})")
        if split[0] <= 0 or split[2] <= 0:
            raise ValueError(f"budget_split: teacher and student shares must be > 0, got {list(split)}")
        if (split[1] > 0) != (self.disc_training == "dpsgd"):
            raise ValueError(
                f"budget_split: the discriminator share must be > 0 with disc_training='dpsgd' and 0 with "
                f"'teacher-samples', got {list(split)} with {self.disc_training!r}"
            )
        for key in ("teacher_noise_multiplicity", "disc_batch_size", "pool_size", "pool_sample_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("teacher_max_grad_norm", "disc_max_grad_norm"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")


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


class _DPSADBase(ConditionalDenoiser):
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

    def _student_dp(
        self, optimizer: torch.optim.Optimizer, sigma_eff: float, q: float, n: int, gen: torch.Generator
    ) -> DPSGD:
        return DPSGD(
            self.net,
            optimizer,
            per_example_loss=surrogate_loss,
            noise_multiplier=sigma_eff,
            max_grad_norm=self.config.max_grad_norm,
            sample_rate=q,
            num_records=n,
            generator=gen,
            mode=self.config.dp_mode,
            max_physical_batch_size=self.config.physical_batch_size,
        )

    def _noise_gen(self, generator: torch.Generator) -> torch.Generator:
        return device_generator(generator, self.device)


def _rate(name: str, batch: int, n: int) -> float:
    if batch > n:
        raise BenchError(f"{name} {batch} exceeds the {n} training records")
    return batch / n


class OutputClipStep(ChargedSteps):
    """clip_target = "output": clip each example's output gradient o_i to C, add N(0, σ_eff²C²) to each,
    backpropagate Σ_i (ō_i + z_i) through the student, divide by q·N, step. Counts the steps taken."""

    def __init__(
        self,
        method: _DPSADBase,
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
        for p in net.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # an empty batch still takes the (zero) step
        self.optimizer.step()
        self.steps += 1


class _Fit:
    """The state of one `fit` shared by both variants: data, generators, optimizers, checkpoints."""

    def __init__(self, method: _DPSADBase, train: ImageDataset, generator: torch.Generator) -> None:
        cfg = method.config
        self.method, self.n, self.generator = method, len(train), generator
        self.noise_gen = method._noise_gen(generator)  # timesteps, ε and DP noise, where the parameters live
        self.x = to_model_range(train.images).to(method.device)
        self.y = train.labels.to(method.device)
        self.opt_t = torch.optim.Adam(method.teacher.parameters(), lr=cfg.teacher_lr)
        self.opt_d = torch.optim.Adam(method.disc.parameters(), lr=cfg.disc_lr)
        self.opt_s = torch.optim.Adam(method.net.parameters(), lr=cfg.lr)
        self.counters: dict[str, Any] = {}  # objects with state_dict/load_state_dict (DP step counters)
        self.extra: dict[str, Any] = {}  # plain values to checkpoint (teacher step, permutation, pool)

    def state(self) -> dict[str, Any]:
        m = self.method
        return {
            "student": m.state_dict(),
            "teacher": m.teacher.state_dict(),
            "teacher_ema": m.teacher_ema.model.state_dict(),
            "disc": m.disc.state_dict(),
            "optimizers": [o.state_dict() for o in (self.opt_t, self.opt_d, self.opt_s)],
            "counters": {k: c.state_dict() for k, c in self.counters.items()},
            "extra": dict(self.extra),
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_gen.get_state(),
        }

    def resume(self, progress: Progress) -> None:
        if (state := progress.resume()) is None:
            return
        m = self.method
        m.load_state_dict(state["student"])
        m.teacher.load_state_dict(state["teacher"])
        m.teacher_ema.model.load_state_dict(state["teacher_ema"])
        m.disc.load_state_dict(state["disc"])
        for opt, s in zip((self.opt_t, self.opt_d, self.opt_s), state["optimizers"], strict=True):
            opt.load_state_dict(s)
        for k, c in self.counters.items():
            c.load_state_dict(state["counters"][k])
        self.extra.update(state["extra"])
        self.generator.set_state(state["generator"])
        self.noise_gen.set_state(state["noise_generator"])

    def checkpoint(self, progress: Progress) -> None:
        progress.advance()
        progress.checkpoint(self.state)

    def student_phase(
        self, progress: Progress, student: Any, steps: int, q: float, disc_update: Callable[..., None]
    ) -> None:
        """Poisson batches; per batch: draw (r, ε), teacher and student outputs, discriminator update(s),
        output gradients with the updated discriminator, one noisy student step, EMA."""
        m = self.method
        batches = poisson_stream(self.n, q, self.generator)
        while student.steps < steps:
            idx = next(batches).to(m.device)
            x0, y = self.x[idx], self.y[idx]
            r, eps, x_r = m.draw(x0, self.noise_gen)
            e_T = m.outputs(m.teacher_ema.model, x_r, r, y)  # frozen teacher: outside the per-example grads
            e_S = m.outputs(m.net, x_r, r, y)
            if m.config.lambda_adv > 0:  # with λ = 0 the discriminator never enters the student's loss
                disc_update(x_r, r, y, e_T, e_S)
            student.step(x_r, r, y, m.output_grads(e_S, e_T, eps, x_r, r, y))
            m.ema.update(m.net)
            self.checkpoint(progress)


class DPSAD(_DPSADBase):
    """The paper's DP-SAD: non-private teacher and discriminator, DP student (guarantee "partial")."""

    name: ClassVar[str] = "dpsad"
    Config: ClassVar[type] = Config
    guarantee: ClassVar[str] = "partial"

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        q = _rate("dpsad: batch_size", cfg.batch_size, n)
        steps = max(1, round(cfg.epochs / q))
        # σ as the paper's analysis sets it: the student's subsampled Gaussian alone
        sigma = calibrate_sigma(
            budget.epsilon, sample_rate=q, steps=steps, delta=budget.delta, accountant=budget.accountant
        )
        sigma_eff = sigma / cfg.T if cfg.noise_divisor == "BT" else sigma  # what the code adds (docstring)
        fit = _Fit(self, train, generator)
        if cfg.clip_target == "params":
            student: DPSGD | OutputClipStep = self._student_dp(fit.opt_s, sigma_eff, q, n, fit.noise_gen)
        else:
            student = OutputClipStep(
                self, fit.opt_s, sigma_eff=sigma_eff, C=cfg.max_grad_norm, q=q, n=n, generator=fit.noise_gen
            )
        fit.counters["student"] = student
        bs, per_epoch, teacher_steps = self._teacher_schedule(n)
        fit.extra.update(teacher_step=0, perm=torch.arange(n))
        fit.resume(progress)
        progress.start(teacher_steps + steps, f"dpsad teacher (non-private) + student σ_eff={sigma_eff:.4g}")
        progress.advance(fit.extra["teacher_step"] + student.steps)

        shape = (self.spec.channels, self.spec.height, self.spec.width)
        while (k := fit.extra["teacher_step"]) < teacher_steps:  # the teacher, without DP
            if k % per_epoch == 0:
                fit.extra["perm"] = torch.randperm(n, generator=generator)
            idx = fit.extra["perm"][(k % per_epoch) * bs : (k % per_epoch + 1) * bs].to(self.device)
            t, noise = draw_noise_multiplicity(len(idx), 1, shape, cfg.T, fit.noise_gen, self.device)
            loss = multiplicity_loss_batch(self.teacher, fit.x[idx], fit.y[idx], t, noise, self.alpha_bar)
            fit.opt_t.zero_grad(set_to_none=True)
            loss.backward()
            fit.opt_t.step()
            self.teacher_ema.update(self.teacher)
            fit.extra["teacher_step"] = k + 1
            fit.checkpoint(progress)

        def disc_update(x_r: Tensor, r: Tensor, y: Tensor, e_T: Tensor, e_S: Tensor) -> None:
            for _ in range(cfg.disc_steps):  # on the student's own batch, without DP
                self.disc_plain_step(fit.opt_d, x_r, r, y, e_T, e_S)

        fit.student_phase(progress, student, steps, q, disc_update)

        ledger = PrivacyLedger()
        ledger.add(student.stage("student"))
        ledger.mark_non_private(TEACHER_NOT_DP)
        if cfg.lambda_adv > 0:
            ledger.mark_non_private(DISC_NOT_DP)
        if cfg.clip_target == "output":
            ledger.mark_non_private(OUTPUT_CLIP_NOT_DP)
        claimed = Stage(
            name="student", mechanism="poisson_gaussian", noise_multiplier=sigma, sampling_rate=q, steps=steps
        )
        ledger.claimed_epsilon = epsilon([claimed], budget.delta, budget.accountant)
        return ledger

    def _teacher_schedule(self, n: int) -> tuple[int, int, int]:
        """Shuffled minibatches: (batch size, steps per epoch, steps)."""
        bs = min(self.config.teacher_batch_size, n)
        per_epoch = max(1, n // bs)
        return bs, per_epoch, max(1, round(self.config.teacher_epochs * per_epoch))


def multiplicity_loss_batch(
    model: nn.Module, x0: Tensor, y: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor
) -> Tensor:
    """Mean denoising loss of a batch with K draws each: x0 [B, C, H, W], y [B], t [B, K], noise [B, K, C, H, W]."""
    B, K = t.shape
    x_t = q_sample(x0.unsqueeze(1).expand(B, K, *x0.shape[1:]), t, noise, alpha_bar)
    return (model(x_t.flatten(0, 1), t.flatten(), y.repeat_interleave(K)) - noise.flatten(0, 1)).pow(2).mean()


class DPSADE2E(_DPSADBase):
    """DP-SAD made end-to-end DP: DP teacher, DP (or post-processing) discriminator, DP student."""

    name: ClassVar[str] = "dpsad-e2e"
    Config: ClassVar[type] = E2EConfig
    guarantee: ClassVar[str] = "end-to-end"

    def _teacher_loss(self, model: Any, x0: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return multiplicity_loss(model, x0, y, t, noise, self.alpha_bar)

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):
            self._build()
        q_t = _rate("dpsad-e2e: teacher_batch_size", cfg.teacher_batch_size, n)
        q_s = _rate("dpsad-e2e: batch_size", cfg.batch_size, n)
        teacher_steps, steps = max(1, round(cfg.teacher_epochs / q_t)), max(1, round(cfg.epochs / q_s))
        plan = [("teacher", q_t, teacher_steps, cfg.budget_split[0])]
        dp_disc = cfg.disc_training == "dpsgd" and cfg.disc_steps > 0 and cfg.lambda_adv > 0
        if dp_disc:
            q_d = _rate("dpsad-e2e: disc_batch_size", cfg.disc_batch_size, n)
            plan.append(("discriminator", q_d, steps * cfg.disc_steps, cfg.budget_split[1]))
        plan.append(("student", q_s, steps, cfg.budget_split[2]))
        sigmas = split_budget(budget, plan)

        fit = _Fit(self, train, generator)
        dp = {
            "teacher": DPSGD(
                self.teacher,
                fit.opt_t,
                per_example_loss=self._teacher_loss,
                noise_multiplier=sigmas["teacher"],
                max_grad_norm=cfg.teacher_max_grad_norm,
                sample_rate=q_t,
                num_records=n,
                generator=fit.noise_gen,
                mode=cfg.dp_mode,
                max_physical_batch_size=cfg.physical_batch_size,
            ),
            "student": self._student_dp(fit.opt_s, sigmas["student"], q_s, n, fit.noise_gen),
        }
        if dp_disc:
            dp["discriminator"] = DPSGD(
                self.disc,
                fit.opt_d,
                per_example_loss=disc_loss,
                noise_multiplier=sigmas["discriminator"],
                max_grad_norm=cfg.disc_max_grad_norm,
                sample_rate=q_d,
                num_records=n,
                generator=fit.noise_gen,
                mode=cfg.dp_mode,
                max_physical_batch_size=cfg.physical_batch_size,
            )
        fit.counters.update(dp)
        fit.extra.update(pool=None, pool_labels=None)
        fit.resume(progress)
        desc = ", ".join(f"{k} σ={s:.3f}" for k, s in sigmas.items())
        progress.start(teacher_steps + steps, f"dpsad-e2e {desc}")
        progress.advance(dp["teacher"].steps + dp["student"].steps)

        shape = (self.spec.channels, self.spec.height, self.spec.width)
        batches = poisson_stream(n, q_t, generator)
        while dp["teacher"].steps < teacher_steps:  # the teacher, with DP-SGD (as DPDM)
            idx = next(batches).to(self.device)
            t, noise = draw_noise_multiplicity(
                len(idx), cfg.teacher_noise_multiplicity, shape, cfg.T, fit.noise_gen, self.device
            )
            dp["teacher"].step(fit.x[idx], fit.y[idx], t, noise)
            self.teacher_ema.update(self.teacher)
            fit.checkpoint(progress)

        if dp_disc:
            d_batches = poisson_stream(n, q_d, generator)

            def disc_update(*_: Tensor) -> None:  # its own Poisson samples: a stage of its own
                for _step in range(cfg.disc_steps):
                    idx = next(d_batches).to(self.device)
                    y = fit.y[idx]
                    r, _eps, x_r = self.draw(fit.x[idx], fit.noise_gen)
                    e_T, e_S = self.outputs(self.teacher_ema.model, x_r, r, y), self.outputs(self.net, x_r, r, y)
                    real = torch.cat([torch.ones_like(r), torch.zeros_like(r)], 1).float()
                    dp["discriminator"].step(
                        torch.cat([x_r, x_r], 1), torch.cat([e_T, e_S], 1), torch.cat([r, r], 1), y, real
                    )
        else:
            if fit.extra["pool"] is None:  # images from the DP teacher: post-processing, no charge
                labels = torch.arange(cfg.pool_size) % self.spec.num_classes
                pool = sample_images(
                    self.teacher_ema.model,
                    cfg.pool_size,
                    shape=shape,
                    labels=labels,
                    schedule=self.schedule,
                    sampler="ddim",
                    steps=cfg.pool_sample_steps,
                    generator=generator,
                    device=self.device,
                )
                fit.extra.update(pool=pool, pool_labels=labels)
            pool_x = to_model_range(fit.extra["pool"]).to(self.device)
            pool_y = fit.extra["pool_labels"].to(self.device)

            def disc_update(*_: Tensor) -> None:
                for _step in range(cfg.disc_steps):
                    idx = torch.randint(0, cfg.pool_size, (cfg.disc_batch_size,), generator=generator).to(self.device)
                    y = pool_y[idx]
                    r, _eps, x_r = self.draw(pool_x[idx], fit.noise_gen)
                    e_T, e_S = self.outputs(self.teacher_ema.model, x_r, r, y), self.outputs(self.net, x_r, r, y)
                    self.disc_plain_step(fit.opt_d, x_r, r, y, e_T, e_S)

        fit.student_phase(progress, dp["student"], steps, q_s, disc_update)

        ledger = PrivacyLedger()
        for name in ("teacher", "discriminator", "student"):
            if name in dp:
                ledger.add(dp[name].stage(name))
        return ledger


def split_budget(budget: Budget, plan: list[tuple[str, float, int, float]]) -> dict[str, float]:
    """σ per stage for plan [(name, q, steps, share of ε)]: each stage calibrated alone to share·ε, then all
    σ scaled by one common factor s so that the composition meets ε (calibrate keeps ε(s) ≤ ε)."""
    # the shares only set the ratios between the σ: a coarse search is enough (the common scale is exact)
    base = {
        name: calibrate_sigma(
            share * budget.epsilon,
            sample_rate=q,
            steps=steps,
            delta=budget.delta,
            accountant=budget.accountant,
            rtol=1e-2,
        )
        for name, q, steps, share in plan
    }

    def stages(s: float) -> list[Stage]:
        return [
            Stage(
                name=name, mechanism="poisson_gaussian", noise_multiplier=s * base[name], sampling_rate=q, steps=steps
            )
            for name, q, steps, _ in plan
        ]

    s = calibrate(budget.epsilon, stages, budget.delta, budget.accountant, bracket=(0.5, 1.0))
    return {name: s * sigma for name, sigma in base.items()}
