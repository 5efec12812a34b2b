"""What the two DP-SAD methods share (methods/dpsad.py, methods/dpsad_e2e.py): the configuration both extend, the
networks (student and teacher denoisers of either kind, the row-independent discriminator), the distillation loss,
the student's DP step (parameter or output clipping), the fit state, sampling, and the declarations of what is not
DP. No public code of the paper exists (see methods/dpsad.py), so for DP-SAD itself no repository is cited: the losses
below follow the paper's equations. What is reproduced from code: the σ-space denoiser, its EDM loss weighting and
label dropout are nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3 (denoiser.py `EDMDenoiser`,
score_losses.py `EDMLoss`, through bench.diffusion.edm, which lists that port's deviations); the DDPM path is the
ε-prediction loss of Ho et al. 2020 (bench.diffusion.ddpm). Deviations from the paper, each a config field recorded in
every run: denoiser "edm" (the paper's is DDPM), output clipping (`clip_target = "output"`, ours), the noise divisor
(`noise_divisor = "BT"`, the B·T reading of secondary reports: dpsad's option only, charged as σ/T),
`timesteps_per_example` K > 1 and `adversarial_loss`; the discriminator's architecture and input scaling are ours
(the paper does not give them).

The distillation loss of one example over its K draws (`timesteps_per_example`), for either denoiser:

    ℓ_i = mean_k [ w(s_k)·‖D_ψ(x_k) − D_θ(x_k)‖² + w(s_k)·‖D_θ(x_k) − target_k‖² + λ·L_adv(φ(x_k, D_θ(x_k), s_k, y)) ]

(‖·‖² a mean over pixels), with, for denoiser "ddpm" (the paper's), s = a timestep r ~ U{0..T−1},
x = sqrt(ᾱ_r)·x_0 + sqrt(1 − ᾱ_r)·ε, D = ε̂ (the network's ε-prediction), target ε and w = 1; for denoiser "edm"
(dpdm's), s = σ from the EDM training distribution ln σ ~ N(p_mean, p_std²), x = x_0 + σ·n, D = the preconditioned
denoiser c_skip·x + c_out·F(c_in·x, c_noise, y), target x_0 and w = λ(σ) = (σ² + σ_d²)/(σ·σ_d)², so the data term
is exactly dpdm's denoising loss and the distillation term its EDM-weighted match to the teacher. The discriminator
φ sees (x scaled to unit variance, D, the noise level's embedding, the true label) and is trained to tell the
teacher's output (1) from the student's (0). With label dropout (edm profiles, as dpdm) a dropped example's teacher,
student and data terms are all unconditional; the discriminator still sees its true label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from bench.methods.dpsad_teacher import (
    TEACHER_NOT_DP,
    TEACHER_OWN,
    DenoiserFields,
    DPSADTeacher,
    TeacherConfig,
    check_net,
)
from torch import Tensor, nn

from bench.config import at_least, choice, fraction
from bench.contract import ImageDataset, Progress, device_generator
from bench.diffusion import EMA, ConditionalDenoiser, make_network, q_sample
from bench.nets.unet import timestep_embedding
from bench.pixels import to_model_range
from bench.privacy.dpsgd import DPSGD, MODES, ChargedSteps, OutputGrad, clip_factors, output_surrogate, poisson_stream
from bench.training import FitState, dp_steps

__all__ = ["TEACHER_NOT_DP", "CommonConfig", "DPSADBase", "Draw", "OutputClipStep", "StudentFit", "disc_loss"]

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
class CommonConfig(DenoiserFields):
    # student, the released network (UNet for ddpm, NCSN++ for edm: dpdm's network fields)
    base_channels: int = 32  # width (paper: unknown; DPDM's FMNIST net has nf=32)
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (28 -> 14 -> 7)
    num_res_blocks: int = 2  # residual blocks per level
    attention_resolutions: tuple[int, ...] = (7,)  # edm: NCSN++ self-attention at these feature-map sides
    student_conditional: bool = True  # False: the student never sees labels (samples are unconditional)
    # teacher ε_ψ / D_ψ, "same kind of network" (methods/dpsad_teacher.py)
    teacher_base_channels: int = 32
    teacher_channel_mults: tuple[int, ...] = (1, 2, 2)
    teacher_num_res_blocks: int = 2
    teacher_attention_resolutions: tuple[int, ...] = (7,)
    teacher_batch_size: int = 128  # dpsad: shuffled minibatches; dpsad-e2e: expected Poisson batch
    teacher_epochs: float = 50.0  # passes over the private data
    teacher_lr: float = 2e-4  # Adam
    teacher_ema_decay: float = 0.999  # EMA of the teacher's iterates (the teacher is its EMA)
    # discriminator φ on (x, D)
    disc_channels: int = 32  # width after the input conv, doubled at each level
    disc_levels: int = 2  # stride-2 convolutions (28 -> 14 -> 7)
    disc_conditional: bool = True  # label embedding + projection head (paper: class-conditional)
    disc_timestep: bool = True  # the discriminator also sees the noise level (sinusoidal embedding)
    disc_lr: float = 2e-4  # Adam
    disc_steps: int = 1  # discriminator updates per student step
    # distillation
    timesteps_per_example: int = 1  # K draws of (noise level, noise) per example, averaged before clipping (paper: 1)
    lambda_adv: float = 1.0  # λ, weight of the adversarial term (paper: 1, its ablation's best)
    adversarial_loss: Literal["saturating", "non-saturating"] = "saturating"  # log(1 − D) (paper) or −log D
    # student training under DP
    batch_size: int = 4096  # expected batch size q·N under Poisson sampling (as DPDM)
    epochs: float = 300.0  # student steps = round(epochs / q) (as DPDM)
    lr: float = 3e-4  # Adam
    max_grad_norm: float = 1.0  # clipping bound C
    ema_decay: float = 0.999  # EMA of the student's DP iterates (post-processing), released
    dp_mode: str = "auto"  # per-example gradient implementation (bench.privacy.dpsgd)
    physical_batch_size: int = 512  # examples per chunk of a logical batch (memory only; same step)

    def __post_init__(self) -> None:
        self.check_denoiser()
        check_net(self)
        check_net(self, "teacher_")
        at_least(self, 1, "batch_size", "teacher_batch_size", "physical_batch_size", "timesteps_per_example")
        for key in ("epochs", "teacher_epochs", "lr", "teacher_lr", "disc_lr", "max_grad_norm"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not (math.isfinite(self.lambda_adv) and self.lambda_adv >= 0):
            raise ValueError(f"lambda_adv (λ) must be a finite number ≥ 0, got {self.lambda_adv}")
        if self.disc_steps < 0 or self.disc_levels < 0 or self.disc_channels < 1:
            raise ValueError("need disc_steps ≥ 0, disc_levels ≥ 0, disc_channels ≥ 1")
        fraction(self, "ema_decay", "teacher_ema_decay")
        choice("adversarial_loss", self.adversarial_loss, ("saturating", "non-saturating"))
        choice("dp_mode", self.dp_mode, MODES)
        if not self.student_conditional and self.guidance > 0:
            raise ValueError("guidance > 0 needs a class-conditional student (student_conditional = true)")

    def teacher_config(self) -> TeacherConfig:
        """The teacher's own config: the shared denoiser fields and the teacher_* fields without their prefix."""
        shared = {f.name: getattr(self, f.name) for f in fields(DenoiserFields)}
        return TeacherConfig(**shared, **{name: getattr(self, f"teacher_{name}") for name in TEACHER_OWN})


class Discriminator(nn.Module):
    """φ(x, D, s, y) -> logit [B] (teacher = 1, student = 0); x, D float [B, C, H, W], s [B] (a timestep or c_noise);
    GroupNorm only."""

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


def disc_loss(model_call: Callable[..., Tensor], x: Tensor, e: Tensor, s: Tensor, y: Tensor, real: Tensor) -> Tensor:
    """Discriminator loss of ONE example on its rows (teacher and student outputs): BCE on logits.

    x, e [R, C, H, W], s [R], y [], real float [R] (1 = teacher, 0 = student) -> scalar."""
    logits = model_call(x, e, s, y.expand(s.shape[0]))
    return F.binary_cross_entropy_with_logits(logits, real, reduction="sum") / (s.shape[0] / 2)


@dataclass
class Draw:
    """One batch's random draws and what follows from them (B examples, K draws each): `y` labels after label
    dropout [B], `y_true` the labels [B], `level` [B, K] (ddpm: int timesteps; edm: σ), `x` the noised inputs
    [B, K, C, H, W], `target` of the data term [B, K, C, H, W] (ddpm: ε; edm: x_0)."""

    y: Tensor
    y_true: Tensor
    level: Tensor
    x: Tensor
    target: Tensor

    @property
    def B(self) -> int:
        return int(self.level.shape[0])

    @property
    def K(self) -> int:
        return int(self.level.shape[1])

    def part(self, rows: slice) -> Draw:
        """The draws of the examples `rows`."""
        return Draw(self.y[rows], self.y_true[rows], self.level[rows], self.x[rows], self.target[rows])

    def rows(self, t: Tensor) -> Tensor:
        """[B, K, ...] -> [B·K, ...] (row b·K + k)."""
        return t.flatten(0, 1)


class DPSADBase(ConditionalDenoiser):
    """What both variants share: networks, the distillation loss, the student step, sampling."""

    conditional: ClassVar[bool] = True
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Any, *, spec: Any, device: torch.device) -> None:
        # an ablation may drop the student's labels: the instance then declares itself unconditional
        self.conditional = config.student_conditional  # type: ignore[misc]
        self.teacher_method = DPSADTeacher(config.teacher_config(), spec=spec, device=device)
        super().__init__(config, spec=spec, device=device)

    @property
    def teacher(self) -> nn.Module:
        return self.teacher_method.net

    @property
    def teacher_ema(self) -> EMA:
        return self.teacher_method.ema

    def _build(self) -> None:
        """The student (and its EMA) and the discriminator; the teacher is built by its own DPSADTeacher."""
        cfg, spec = self.config, self.spec
        classes = spec.num_classes if cfg.student_conditional else 0
        self.net = make_network(cfg, channels=spec.channels, image_size=spec.height, num_classes=classes)
        self.net = self.net.to(self.device)
        self.ema = EMA(self.net, cfg.ema_decay, warmup=cfg.ema_warmup)
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
        return super().sample(n, labels=labels if self.conditional else None, generator=generator)

    # ----------------------------------------------------------------------------- distillation loss

    def draw(self, x0: Tensor, y: Tensor, generator: torch.Generator) -> Draw:
        """K draws of (noise level, noise) per example of x0 [B, C, H, W] in [−1, 1], labels y [B]."""
        y_in, level, noise = self.training_draws(y, self.config.timesteps_per_example, generator)  # label dropout,
        return self.draws_from(x0, y, y_in, level, noise)  # then noise levels and noise

    def draws_from(self, x0: Tensor, y: Tensor, y_in: Tensor, level: Tensor, noise: Tensor) -> Draw:
        """The Draw of given draws: labels after dropout y_in [B], levels [B, K], noise [B, K, C, H, W]."""
        x0k = x0.unsqueeze(1).expand(x0.shape[0], level.shape[1], *x0.shape[1:])
        if self.parameterization == "eps":
            return Draw(y_in, y, level, q_sample(x0k, level, noise, self.alpha_bar), noise)
        return Draw(y_in, y, level, x0k + level[..., None, None, None] * noise, x0k)

    def net_inputs(self, d: Draw) -> tuple[Tensor, Tensor, Tensor]:
        """The network's inputs per example [B, K, ...]: (x_r, r, y) for ddpm; (c_in·x_σ, c_noise, y) for edm."""
        y = d.y[:, None].expand(d.B, d.K)
        if self.parameterization == "eps":
            return d.x, d.level, y
        _, _, c_in, c_noise = self.pre.coefficients(d.level)
        return c_in[..., None, None, None] * d.x, c_noise, y

    def assemble(self, out: Tensor, d: Draw) -> Tensor:
        """The denoiser's output D [B, K, C, H, W] from the network's raw output F: ddpm D = F (ε̂); edm
        D = c_skip·x + c_out·F (bench.diffusion.edm.Preconditioning)."""
        if self.parameterization == "eps":
            return out
        c_skip, c_out, _, _ = self.pre.coefficients(d.level)
        return c_skip[..., None, None, None] * d.x + c_out[..., None, None, None] * out

    @torch.no_grad()
    def outputs(self, net: nn.Module, d: Draw) -> Tensor:
        """A network's D on every row, no graph: [B, K, C, H, W]."""
        if d.B == 0:
            return torch.zeros_like(d.x)
        x, s, y = (d.rows(t) for t in self.net_inputs(d))
        return self.assemble(net(x, s, y).view_as(d.x), d)

    def disc_inputs(self, d: Draw) -> tuple[Tensor, Tensor]:
        """What the discriminator sees besides D: (x, noise-level embedding input) rows [B·K, ...]."""
        x, s, _ = self.net_inputs(d)  # edm: c_in·x_σ (unit variance) and c_noise = ¼·ln σ
        return d.rows(x), d.rows(s)

    def losses(self, out: Tensor, out_T: Tensor, d: Draw) -> Tensor:
        """Per-example student loss ℓ_i [B] (mean over its K rows) for student outputs D [B, K, C, H, W]."""
        w = 1.0 if self.parameterization == "eps" else self.pre.weight(d.level)  # [B, K]
        mse_teacher = w * (out - out_T).pow(2).flatten(2).mean(2)  # [B, K]
        mse_data = w * (out - d.target).pow(2).flatten(2).mean(2)
        loss = mse_teacher + mse_data
        if self.config.lambda_adv > 0:
            x, s = self.disc_inputs(d)
            with _no_param_grads(self.disc):
                logits = self.disc(x, d.rows(out), s, d.y_true.repeat_interleave(d.K)).view(d.B, d.K)
            saturating = self.config.adversarial_loss == "saturating"
            adv = -F.softplus(logits) if saturating else F.softplus(-logits)  # log(1 − D) or −log D, D = σ(logit)
            loss = loss + self.config.lambda_adv * adv
        return loss.mean(1)

    def output_grads(self, out_T: Tensor, d: Draw) -> OutputGrad:
        """The student step's `output_grad`: the network's raw outputs F [b, K, C, H, W] of the examples `rows` ->
        (∂ℓ_i/∂F_i, ℓ_i [b]), all of them in one batched backward (their rows are independent)."""

        def grad(f: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
            part = d.part(rows)  # a physical batch's examples
            if part.B == 0:
                return torch.zeros_like(f), f.new_zeros(0)
            with torch.enable_grad():
                f = f.detach().requires_grad_()
                losses = self.losses(self.assemble(f, part), out_T[rows], part)
                (o,) = torch.autograd.grad(losses.sum(), f)
            return o, losses.detach()

        return grad

    def distillation_step(self, optimizer: torch.optim.Optimizer, d: Draw, out_T: Tensor, divisor: float) -> None:
        """The non-private reference step: ∇ of Σ_i ℓ_i / divisor through student and discriminator."""
        x, s, y = (d.rows(t) for t in self.net_inputs(d))
        out = self.assemble(self.net(x, s, y).view_as(d.x), d)
        optimizer.zero_grad(set_to_none=True)
        (self.losses(out, out_T, d).sum() / divisor).backward()
        optimizer.step()

    def disc_plain_step(self, optimizer: torch.optim.Optimizer, d: Draw, out_T: Tensor, out_S: Tensor) -> None:
        """One non-private discriminator update on a batch of (teacher, student) output pairs."""
        if d.B == 0:
            return
        x, s = self.disc_inputs(d)
        logits = self.disc(
            x.repeat(2, 1, 1, 1), torch.cat([d.rows(out_T), d.rows(out_S)]), s.repeat(2),
            d.y_true.repeat_interleave(d.K).repeat(2),
        )  # fmt: skip
        real = torch.cat([torch.ones(d.B * d.K), torch.zeros(d.B * d.K)]).to(self.device)
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(logits, real).backward()
        optimizer.step()

    # -------------------------------------------------------------------------------------- pieces of fit

    def _dp(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: Callable[..., Tensor], *, sigma: float,
        C: float, q: float, n: int, gen: torch.Generator, physical: int | None = None,
    ) -> DPSGD:  # fmt: skip
        """A DP-SGD step on one of the networks, with the run's per-example mode and physical batch (or `physical`
        examples per backward)."""
        return DPSGD(model, optimizer, per_example_loss=loss, noise_multiplier=sigma, max_grad_norm=C, sample_rate=q,
                     num_records=n, generator=gen, mode=self.config.dp_mode,
                     max_physical_batch_size=physical or self.config.physical_batch_size)  # fmt: skip

    def _student_dp(
        self, optimizer: torch.optim.Optimizer, sigma_eff: float, q: float, n: int, gen: torch.Generator
    ) -> DPSGD:
        return self._dp(self.net, optimizer, output_surrogate, sigma=sigma_eff, C=self.config.max_grad_norm, q=q, n=n,
                        gen=gen)  # fmt: skip

    def _noise_gen(self, generator: torch.Generator) -> torch.Generator:
        return device_generator(generator, self.device)


class OutputClipStep(ChargedSteps):
    """clip_target = "output": clip each example's output gradient o_i = ∂ℓ_i/∂F_i (over its K rows) to C, add
    N(0, σ_eff²C²) to each, backpropagate Σ_i (ō_i + z_i) through the student, divide by q·N, step. Counts the steps.

    F is the student network's output (ddpm: ε̂; edm: the network inside the preconditioning). An empty Poisson batch
    has no output to put noise on: its step adds N(0, σ_eff²C² I) / (q·N) to every parameter's gradient, the noise of
    the poisson_gaussian stage the ledger charges for that step (as a DP-SGD step on an empty batch does), instead of
    a zero step."""

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

    def step_outputs(self, inputs: Sequence[Tensor], output_grad: OutputGrad) -> tuple[None, Tensor]:
        """One noisy step: inputs [B, K, ...] of the student network; returns (None, its outputs [B, K, ...] before
        the step, no graph). One forward and one backward of the student."""
        net, B = self.method.net, inputs[0].shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        out = torch.zeros(0, device=self.method.device)
        if B > 0:
            K = inputs[0].shape[1]
            out = net(*(x.flatten(0, 1) for x in inputs))
            out = out.view(B, K, *out.shape[1:])
            o, _ = output_grad(out.detach(), slice(0, B))
            factors = clip_factors(o.flatten(1).norm(dim=1), self.max_grad_norm)  # [B]
            o = o * factors.view(B, *(1,) * (o.dim() - 1))
            largest = o.flatten(1).norm(dim=1).max().item()
            if largest > self.max_grad_norm * (1 + 1e-5):  # a privacy invariant: raise, never assert
                raise RuntimeError(f"clipped output gradient norm {largest} exceeds C = {self.max_grad_norm}")
            if self.noise_multiplier > 0:
                std = self.noise_multiplier * self.max_grad_norm
                o = o + std * torch.randn(o.shape, generator=self.generator, device=o.device)
            ((out * o).sum() / self.expected_batch_size).backward()
        std = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
        for p in net.parameters():
            if p.grad is None:  # an empty batch: the charged Gaussian noise alone (see the class docstring)
                p.grad = std * torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
        self.optimizer.step()
        self.steps += 1
        return None, out.detach()


DiscUpdate = Callable[[Draw, Tensor, Tensor], None]  # (draws, teacher outputs D_ψ, student outputs D_θ)


class StudentFit(FitState):
    """The state of one `fit` shared by both variants: data, generators, optimizers, and what is checkpointed.
    `counters` (DP step counters, by name) and `values` (teacher step, permutation, pool) are filled by each
    variant before `resume()`; `teacher` (dpsad-e2e: trained in the run) adds the teacher and its optimizer."""

    def __init__(
        self, method: DPSADBase, train: ImageDataset, generator: torch.Generator, progress: Progress, *, teacher: bool
    ) -> None:
        cfg = method.config
        self.method, self.n = method, len(train)
        self.x = to_model_range(train.images).to(method.device)
        self.y = train.labels.to(method.device)
        self.opt_t = torch.optim.Adam(method.teacher.parameters(), lr=cfg.teacher_lr)
        self.opt_d = torch.optim.Adam(method.disc.parameters(), lr=cfg.disc_lr)
        self.opt_s = torch.optim.Adam(method.net.parameters(), lr=cfg.lr)
        self.counters: dict[str, Any] = {}
        parts: dict[str, Any] = {"student": method, "disc": method.disc, "optimizers": [self.opt_d, self.opt_s],
                                 "counters": self.counters}  # fmt: skip
        if teacher:
            parts |= {"teacher": method.teacher_method, "teacher_optimizer": self.opt_t}
        # noise levels, noise and DP noise are drawn where the parameters live
        super().__init__(progress, generator, method._noise_gen(generator), parts)

    def student_phase(
        self, student: Any, steps: int, q: float, disc_update: Callable[[Draw, Tensor, Tensor], None]
    ) -> None:
        """Poisson batches; per batch: the draws, the teacher's outputs, one noisy student step (its outputs come
        from the same forward as its gradients), then the discriminator update(s) on this step's (teacher, student)
        outputs, and the EMA. The discriminator is updated after the student's step (the student steps against the
        discriminator of the previous step): updating it first would need a second forward of the student."""
        m = self.method

        def step(idx: Tensor) -> None:
            d = m.draw(self.x[idx], self.y[idx], self.noise_gen)
            out_T = m.outputs(m.teacher_ema.model, d)  # frozen teacher: outside the per-example gradients
            _, out_S = student.step_outputs(m.net_inputs(d), m.output_grads(out_T, d))
            if m.config.lambda_adv > 0 and d.B > 0:  # with λ = 0 the discriminator never enters the student's loss
                disc_update(d, out_T, m.assemble(out_S, d))
            m.ema.update(m.net)

        dp_steps(self, student, steps, poisson_stream(self.n, q, self.generator), m.device, step)
