"""GS-WGAN (Chen, Orekondy, Fritz, "GS-WGAN: A Gradient-Sanitized Approach for Learning Differentially Private
Generators", NeurIPS 2020): a Wasserstein GAN whose generator only ever sees the gradient that flows from a
discriminator into the generated images, clipped and noised, with many discriminators on disjoint subsets of the
private data. Accounted here by a sound argument of our own, because the reference's is not one.

Reproduces DingfanChen/GS-WGAN@62e77b36d658b1ffdd3d454d25a7bbf8e89c57a1:source/main.py (the main phase), with
source/pretrain.py (the discriminators' warm start), source/models.py (`GeneratorResNet`, `GeneratorDCGAN`,
`DiscriminatorDCGAN`, the gradient penalty), source/ops.py (spectral norm, pixel norm, the generator's moving
average), source/config.py (defaults) and evaluation/privacy_analysis.py (its accounting). DPImageBench's port,
2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:models/gs_wgan.py with
configs/GS-WGAN/{mnist,fmnist}_28_eps{1.0,10.0}.yaml, was read too (its accounting below).

What the reference does, read from the code:

- K = 1,000 discriminators (`DiscriminatorDCGAN`: three 5×5 stride-2 convolutions 1→64→128→256, a linear output
  and a projection-conditioning embedding, all spectral-normalised), each on an EQUAL split of a shuffled index list
  (60 records each on MNIST). Warm start (pretrain.py, non-private): each discriminator trains 2,001 iterations
  against a FRESH non-private generator of its own (5 critic steps, WGAN-GP λ = 10, drift penalty 0.001·D(x)², Adam
  1e-4, β = (0.5, 0.9), batch 32); those generators are discarded.
- Main phase, 20,001 iterations: a discriminator index j uniform at random; D_j takes 5 critic steps on its split
  against the current generator (fakes conditioned on the real batch's labels); then the generator step: B = 32
  fakes with labels uniform, loss −mean D_j(G(z, y)), z ~ Bernoulli(½)^10. A backward hook on D_j's first
  convolution replaces the gradient w.r.t. each fake image by clip(g_i, C/B) + N(0, (2σC/B)²) (C = 1, SENSITIVITY
  = 2, σ the `noise_multiplier`, 1.07 by default); the generator (`GeneratorResNet`: linear to 4×4×256, three
  upsampling residual blocks with pixel norm, a 3×3 convolution, sigmoid, cropped to 28×28) takes an Adam step on
  it. Samples come from an exponential moving average of the generator (0.999).
- Accounting (evaluation/privacy_analysis.py): iterations × B compositions of a Gaussian of multiplier σ, each
  subsampled at rate 1/K (autodp's sampled-without-replacement RDP): as if each of a step's B per-image gradients
  picked its own discriminator independently. Our RDP gives ε = 9.24 at δ = 1e-5 for the defaults
  (dp_accounting, SampledWithoutReplacement, replace-one; `reference_epsilon`). DPImageBench's port calibrates σ
  with opacus for `iterations` subsampled Gaussians at rate 1/K (not × B): σ = 0.47 for ε = 10, 0.96 for ε = 1.

Why that accounting does not hold for the mechanism that runs:

1. All B gradients of a step come from the SAME discriminator: if a record's discriminator is picked, all B
   noisy gradients depend on it at once. Released jointly (each clipped to C/B), a discriminator that changes
   arbitrarily moves them by up to 2C/√B in L2, so one step is one Gaussian of multiplier σ/√B, not B Gaussians
   of multiplier σ with independent sampling.
2. The discriminators are trained (critic steps) only when picked, so D_j's state depends on the secret history
   of picks: given the released gradients, that history's posterior differs between neighbouring data sets, and
   the steps that do NOT use the record's discriminator are no longer identically distributed for both. The
   subsampling argument (each step a fresh mixture over the picked discriminator) needs them to be.
3. An equal split of a shuffled list: adding one record moves other records to other discriminators.

Our mechanism and its analysis (sound; deviations from the reference):

- Partition by an independent uniform discriminator index per record (as our pategan), drawn from the run's seed.
- A schedule fixed in advance from the run's seed, independent of the data: `schedule = "balanced"` (default)
  goes through a fresh random permutation of the K discriminators every K steps, so each serves ⌈T/K⌉ steps at
  most; `schedule = "iid"` picks uniformly at every step as the reference does, and serves max_j (steps of j).
- Every random number of a step (minibatch slots, latents, labels, penalty weights, noise) is drawn in numbers
  that do not depend on the data. Then, for any fixed values of the data-independent randomness, D_j is a
  function of its own partition and the released gradients only (its warm start included): adding or removing a
  record x changes only x's discriminator j*, and only the steps that j* serves differ in distribution, each a
  Gaussian mechanism on the B clipped gradients with L2 sensitivity 2C/√B (on the mean-scaled gradients).
  Adaptive composition over those steps, then a mixture over j* and the randomness: ε is that of `count` =
  (the most steps one discriminator serves) Gaussians of multiplier σ/√B: parallel composition over disjoint
  partitions, no amplification by subsampling claimed. The warm start and the critic steps read only a
  discriminator's own partition and are never released: covered by this argument (stated in the card's
  assumptions), not charged separately.
- For the reference's defaults (σ = 1.07, B = 32, T = 20,000, K = 1,000) this gives ε = 390 at δ = 1e-5 (RDP);
  for DPImageBench's σ, 1,707 (its ε = 10) and 470 (its ε = 1). At ε = 10 our calibration asks for σ = 13.4 in the
  reference's units (σ/√B = 2.37), at ε = 1 for σ = 102. The card's `claimed_epsilon` holds the reference's
  analysis of the σ that ran.

Other deviations: minibatches drawn uniformly with replacement from the partition (the reference: epochs of a
shuffled loader); spectral norm by torch's parametrisation (one power iteration per forward in training mode;
the reference's wrapper iterates in every forward); the moving average is over the weights, its spectral-norm
vectors copied from the live generator, and it samples in evaluation mode; the networks at the dataset's own size
and channels (the ResNet generator starts at ⌈(H + 2)/8⌉ and crops, exactly the reference's 4×4 → 30 → 28 on
28×28; the DCGAN generator is 28×28 only); a fresh Adam for each discriminator at the main phase, as the
reference; random numbers from the run's torch generator; an empty partition's discriminator sees fakes only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from bench.baselines.pategan import Partition, PartitionedTeachers, largest_that_fits
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from bench.contract import DataSpec, ImageDataset, Progress, device_generator
from bench.errors import BenchError
from bench.nets import BuiltOnce, seeded_init
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate, epsilon
from bench.privacy.accountants import RDP_ORDERS

REFERENCE = "DingfanChen/GS-WGAN@62e77b36d658b1ffdd3d454d25a7bbf8e89c57a1:source/main.py"
SENSITIVITY = 2.0  # the reference's: a clipped per-image gradient moves by at most 2C
COVERED = (
    "GS-WGAN's discriminators (their non-private warm start on their own partition and their critic steps) read "
    "only their own partition of an i.i.d. per-record partition and are never released; the partition and the "
    "schedule of which discriminator serves which generator step are drawn from the seed, not from the data, so a "
    "record changes one discriminator and only the generator steps it serves (parallel composition, counted)"
)


@dataclass(frozen=True, kw_only=True)
class Config:
    discriminators: int = 1000  # K, on disjoint i.i.d. partitions
    gen_arch: Literal["resnet", "dcgan"] = "resnet"  # the reference's GeneratorResNet / GeneratorDCGAN (28×28 only)
    model_dim: int = 64  # the reference's model_dim (generator 4·md channels; discriminator md, 2md, 4md)
    z_dim: int = 10
    latent: Literal["bernoulli", "normal"] = "bernoulli"  # z ~ Bernoulli(½) (the reference's default) or N(0, I)
    batch_size: int = 32  # B: per critic step real records and fakes; fakes per generator step
    critic_iters: int = 5  # critic steps of the serving discriminator before each generator step
    lambda_gp: float = 10.0  # WGAN-GP weight
    lambda_drift: float = 0.001  # the reference's L_epsilon: drift penalty on D(real)²
    iterations: int = 20000  # T, generator steps of the main phase (the reference runs 20,001)
    pretrain_iterations: int = 2000  # warm start of each discriminator against its own generator (the reference: 2,001)
    lr: float = 1e-4  # Adam, every network
    beta1: float = 0.5
    beta2: float = 0.9
    clip_bound: float = 1.0  # C: each per-image gradient of the mean loss is clipped to C/B
    noise_multiplier: float | None = None  # the reference's σ (noise 2σC/B per coordinate); None: calibrated
    ema: float = 0.999  # moving average of the generator (released, sampled)
    schedule: Literal["balanced", "iid"] = "balanced"  # which discriminator serves each step (a deviation; see above)

    def __post_init__(self) -> None:
        if self.discriminators < 2:
            raise ValueError(f"discriminators (K) must be ≥ 2, got {self.discriminators}")
        for key in ("model_dim", "z_dim", "batch_size", "critic_iters", "iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.pretrain_iterations < 0:
            raise ValueError(f"pretrain_iterations must be ≥ 0, got {self.pretrain_iterations}")
        for key in ("lr", "clip_bound"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("lambda_gp", "lambda_drift"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"{key} must be ≥ 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2", "ema"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ValueError(f"noise_multiplier must be > 0 (or unset: calibrated), got {self.noise_multiplier}")
        if self.gen_arch not in ("resnet", "dcgan"):
            raise ValueError(f"gen_arch must be 'resnet' or 'dcgan', got {self.gen_arch!r}")
        if self.latent not in ("bernoulli", "normal"):
            raise ValueError(f"latent must be 'bernoulli' or 'normal', got {self.latent!r}")
        if self.schedule not in ("balanced", "iid"):
            raise ValueError(f"schedule must be 'balanced' or 'iid', got {self.schedule!r}")


# ----------------------------------------------------------------------------------------- networks


def pixel_norm(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + eps)


def _sn(module: nn.Module) -> nn.Module:
    return spectral_norm(module)


class GBlock(nn.Module):
    """The reference's residual upsampling block (pixel norm, ×2 nearest upsampling, two 3×3 convolutions)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _sn(nn.Conv2d(channels, channels, 3, padding=1))
        self.conv2 = _sn(nn.Conv2d(channels, channels, 3, padding=1))
        self.conv_sc = _sn(nn.Conv2d(channels, channels, 1))  # learnable shortcut (upsampling)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(pixel_norm(x), scale_factor=2)
        x = F.interpolate(x, scale_factor=2)
        h = self.conv2(F.relu(pixel_norm(self.conv1(h))))
        return h + self.conv_sc(x)


class GeneratorResNet(nn.Module):
    """forward(z [B, z_dim], y int64 [B]) -> [B, C, H, W] in (0, 1)."""

    def __init__(self, spec: DataSpec, *, z_dim: int, model_dim: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes, self.c0 = z_dim, spec.num_classes, 4 * model_dim
        self.out_shape = (spec.channels, spec.height, spec.width)
        self.h0, self.w0 = math.ceil((spec.height + 2) / 8), math.ceil((spec.width + 2) / 8)
        self.fc = _sn(nn.Linear(z_dim + spec.num_classes, self.c0 * self.h0 * self.w0))
        self.blocks = nn.Sequential(*(GBlock(self.c0) for _ in range(3)))
        self.output = _sn(nn.Conv2d(self.c0, spec.channels, 3))

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)).view(-1, self.c0, self.h0, self.w0)
        h = self.blocks(pixel_norm(F.relu(h)))
        _, height, width = self.out_shape
        return torch.sigmoid(self.output(h))[:, :, :height, :width]


class GeneratorDCGAN(nn.Module):
    """The reference's GeneratorDCGAN, 28×28 only: forward(z, y) -> [B, C, 28, 28] in (0, 1)."""

    def __init__(self, spec: DataSpec, *, z_dim: int, model_dim: int) -> None:
        super().__init__()
        if (spec.height, spec.width) != (28, 28):
            raise ValueError(f"gen_arch 'dcgan' is the reference's 28×28 generator; got {spec.height}×{spec.width}")
        self.z_dim, self.num_classes, self.md = z_dim, spec.num_classes, model_dim
        self.fc = nn.Linear(z_dim + spec.num_classes, 4 * 4 * 4 * model_dim)
        self.deconv1 = nn.ConvTranspose2d(4 * model_dim, 2 * model_dim, 5)
        self.deconv2 = nn.ConvTranspose2d(2 * model_dim, model_dim, 5)
        self.deconv3 = nn.ConvTranspose2d(model_dim, spec.channels, 8, stride=2)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)).view(-1, 4 * self.md, 4, 4)
        h = self.deconv1(pixel_norm(F.relu(h)))[:, :, :7, :7]
        h = self.deconv2(pixel_norm(F.relu(h)))
        return torch.sigmoid(self.deconv3(pixel_norm(F.relu(h))))


class Critic(nn.Module):
    """The reference's DiscriminatorDCGAN at any size: forward(x [B, C, H, W] in [0, 1], y) -> scores [B]."""

    def __init__(self, spec: DataSpec, *, model_dim: int) -> None:
        super().__init__()
        md, c = model_dim, spec.channels
        self.conv1 = _sn(nn.Conv2d(c, md, 5, stride=2, padding=2))
        self.conv2 = _sn(nn.Conv2d(md, 2 * md, 5, stride=2, padding=2))
        self.conv3 = _sn(nn.Conv2d(2 * md, 4 * md, 5, stride=2, padding=2))
        h, w = spec.height, spec.width
        for _ in range(3):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.features = 4 * md * h * w
        self.linear = _sn(nn.Linear(self.features, 1))
        self.linear_y = _sn(nn.Embedding(spec.num_classes, self.features))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))).flatten(1)
        return (self.linear(h) + (self.linear_y(y) * h).sum(1, keepdim=True)).view(-1)


def build_generator(spec: DataSpec, cfg: Config) -> nn.Module:
    cls = GeneratorResNet if cfg.gen_arch == "resnet" else GeneratorDCGAN
    return cls(spec, z_dim=cfg.z_dim, model_dim=cfg.model_dim)


# ---------------------------------------------------------------------------------------- the mechanism


def sanitize(grad: Tensor, *, clip: float, noise_std: float, generator: torch.Generator) -> Tensor:
    """The reference's `dp_conv_hook`: each row (one image's gradient, flattened) clipped to norm `clip`, then
    N(0, noise_std²) on every entry. grad float [B, ...] -> same shape."""
    flat = grad.flatten(1)
    coef = (clip / (flat.norm(dim=1) + 1e-10)).clamp(max=1.0)
    noise = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
    return (flat * coef.unsqueeze(1) + noise_std * noise).view_as(grad)


def step_stage(multiplier: float, count: int, cfg: Config) -> Stage:
    """`count` generator steps served by one discriminator: Gaussians of `multiplier` = σ/√B over the L2
    sensitivity 2C/√B of a step's B clipped (mean-scaled) gradients."""
    return Stage(
        name="generator",
        mechanism="gaussian",
        noise_multiplier=multiplier,
        count=count,
        max_grad_norm=cfg.clip_bound,
        sensitivity="a step's B per-image gradients jointly, each clipped to C/B: 2C/√B when the serving "
        "discriminator's partition gains or loses a record; count = the most steps one discriminator serves",
    )


def draw_schedule(cfg: Config, steps: int, generator: torch.Generator) -> Tensor:
    """int64 [steps]: the discriminator serving each generator step, from `generator` only (never the data)."""
    k = cfg.discriminators
    if cfg.schedule == "iid":
        return torch.randint(0, k, (steps,), generator=generator)
    cycles = math.ceil(steps / k)
    return torch.cat([torch.randperm(k, generator=generator) for _ in range(cycles)])[:steps]


def max_served(schedule: Tensor, k: int) -> int:
    return int(torch.bincount(schedule, minlength=k).max()) if len(schedule) else 0


def reference_epsilon(sigma: float, cfg: Config, steps: int, delta: float) -> float:
    """The reference's analysis (evaluation/privacy_analysis.py): steps × B Gaussians of multiplier σ, each
    sampled without replacement at rate 1/K, composed; dp_accounting's RDP under replace-one (autodp's)."""
    acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), NeighboringRelation.REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(cfg.discriminators, 1, dp_event.GaussianDpEvent(sigma))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps * cfg.batch_size))
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------------------------------------- the method


class GSWGAN(PartitionedTeachers, BuiltOnce):
    name: ClassVar[str] = "gswgan"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None:
        self.config: Config = config
        self.spec, self.device = spec, device
        try:
            self.check_networks()  # built for real once: in fit, under the run's seed (bench.nets.BuiltOnce)
        except ValueError as e:
            raise BenchError(f"gswgan: {e}") from None

    def released_model(self) -> nn.Module:
        return self.G_ema

    def _networks(self) -> None:
        self.G = build_generator(self.spec, self.config).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)

    def _critics(self) -> list[nn.Module]:
        cfg = self.config
        return [Critic(self.spec, model_dim=cfg.model_dim).to(self.device) for _ in range(cfg.discriminators)]

    # ------------------------------------------------------------------------------------ calibration

    def noise_and_steps(self, budget: Budget, schedule: Tensor) -> tuple[float, int]:
        """(σ in the reference's units, generator steps) for the budget under `schedule` (drawn from the seed)."""
        cfg, k, root_b = self.config, self.config.discriminators, math.sqrt(self.config.batch_size)
        if cfg.noise_multiplier is None:
            if budget.is_unlimited:
                raise BenchError("gswgan: an unlimited budget needs an explicit noise_multiplier")
            count = max_served(schedule, k)
            s = calibrate(budget.epsilon, lambda m: [step_stage(m, count, cfg)], budget.delta, budget.accountant)
            return s * root_b, cfg.iterations
        sigma = cfg.noise_multiplier
        if budget.is_unlimited:
            return sigma, cfg.iterations

        def fits(steps: int) -> bool:
            stage = step_stage(sigma / root_b, max_served(schedule[:steps], k), cfg)
            return epsilon([stage], budget.delta, budget.accountant) <= budget.epsilon

        if not fits(1):
            raise BenchError(
                f"gswgan: noise_multiplier {sigma:g} spends more than ε = {budget.epsilon:g} on one generator step "
                f"(B = {cfg.batch_size} gradients from one discriminator); raise it, or leave it unset to calibrate"
            )
        return sigma, largest_that_fits(fits, cfg.iterations)  # the count grows with the steps

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"iterations": config.discriminators * config.pretrain_iterations + config.iterations}

    # -------------------------------------------------------------------------------------------- fit

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n, k = self.config, len(train), self.config.discriminators
        if k > n:
            raise BenchError(f"gswgan: {k} discriminators exceed the {n} training records")
        self._prepare(train, generator)
        self.sigma, self.steps = self.noise_and_steps(budget, self.schedule)
        if (state := progress.resume()) is not None:
            self._load_training_state(state)
        warm = k * cfg.pretrain_iterations  # one unit: an iteration (critic steps and a generator step), warm or main
        progress.start(warm + self.steps, f"gswgan σ={self.sigma:.3g} K={k}: warm start, then generator steps")
        progress.advance(self.warmed * cfg.pretrain_iterations + self.step)
        while self.warmed < k:
            self._warm_start(self.warmed, progress)
            self.warmed += 1
            progress.checkpoint(self._training_state)  # between discriminators: their generators are discarded
        if not self._main_optimizers:
            self._start_main()
        while self.step < self.steps:
            self._main_step()
            progress.advance()
            progress.checkpoint(self._training_state)
        return self.ledger(budget)

    def ledger(self, budget: Budget) -> PrivacyLedger:
        """What the fit charged: one Gaussian per step served by the busiest discriminator (see the docstring)."""
        cfg, root_b = self.config, math.sqrt(self.config.batch_size)
        ledger = PrivacyLedger()
        ledger.add(step_stage(self.sigma / root_b, int(self.served.max()), cfg))
        ledger.assume(COVERED)
        ledger.claimed_epsilon = reference_epsilon(self.sigma, cfg, self.step, budget.delta)
        return ledger

    def _prepare(self, train: ImageDataset, generator: torch.Generator) -> None:
        """Networks, the partition and the schedule (each drawn once, from generators of their own seeded by one
        draw each, so that how many numbers they take does not shift the run's stream)."""
        cfg, dev = self.config, self.device
        with seeded_init(generator):
            self._networks()
            self.critics = self._critics()
        self._draw_partition(train, cfg.discriminators, generator)
        sched_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
        self.schedule = draw_schedule(cfg, cfg.iterations, sched_gen)
        self.generator = generator
        self.noise_gen = device_generator(generator, dev)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self._main_optimizers: list[torch.optim.Optimizer] = []
        self.served = torch.zeros(cfg.discriminators, dtype=torch.long)
        self.warmed = self.step = 0

    def _use_partition(self, partition: Partition) -> None:
        super()._use_partition(partition)
        self._sizes = partition.sizes.tolist()  # read per critic step: no device sync

    def _optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=self.config.lr, betas=(self.config.beta1, self.config.beta2))

    def _latent(self, n: int) -> Tensor:
        z = torch.rand(n, self.config.z_dim, generator=self.noise_gen, device=self.device)
        if self.config.latent == "bernoulli":
            return (z < 0.5).float()
        return torch.randn(n, self.config.z_dim, generator=self.noise_gen, device=self.device)

    def _critic_step(self, j: int, gen: nn.Module, opt: torch.optim.Optimizer) -> None:
        """One WGAN-GP step of discriminator j on B of its own records (uniform, with replacement) vs B fakes of
        `gen` conditioned on their labels. The same count of random numbers whatever the partition holds."""
        cfg, dev, D, B = self.config, self.device, self.critics[j], self.config.batch_size
        u = torch.rand(B, generator=self.noise_gen, device=dev)
        alpha = torch.rand(B, 1, 1, 1, generator=self.noise_gen, device=dev)
        z = self._latent(B)
        size = self._sizes[j]
        slot = (u * max(size, 1)).long()
        real = self._part_x[j, slot].float() / 255.0  # [B, C, H, W] in [0, 1], partition j only
        y = self._part_y[j, slot]
        if size == 0:  # an empty partition: labels uniform (from u), fakes only
            y = (u * self.spec.num_classes).long()
        with torch.no_grad():
            fake = gen(z, y)
        d_fake = D(fake, y).mean()
        if size == 0:
            loss = d_fake
        else:
            d_real = D(real, y)
            mix = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(D(mix, y).sum(), mix, create_graph=True)
            penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean() * cfg.lambda_gp
            loss = d_fake - d_real.mean() + penalty + cfg.lambda_drift * (d_real**2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _warm_start(self, j: int, progress: Progress) -> None:
        """pretrain.py for discriminator j: against a fresh non-private generator of its own, then discarded."""
        cfg = self.config
        if cfg.pretrain_iterations == 0:
            return
        with seeded_init(self.noise_gen):  # one draw: its initial weights follow from the run's seed
            gen = build_generator(self.spec, cfg).to(self.device)
        opt_d, opt_g = self._optimizer(self.critics[j]), self._optimizer(gen)
        for _ in range(cfg.pretrain_iterations):
            for _ in range(cfg.critic_iters):
                self._critic_step(j, gen, opt_d)
            z = self._latent(cfg.batch_size)
            y = torch.randint(0, self.spec.num_classes, (cfg.batch_size,), generator=self.noise_gen, device=self.device)
            loss = -self.critics[j](gen(z, y), y).mean()
            opt_g.zero_grad(set_to_none=True)
            grads = torch.autograd.grad(loss, list(gen.parameters()))
            for p, g in zip(gen.parameters(), grads, strict=True):
                p.grad = g
            opt_g.step()
            progress.advance()

    def _start_main(self) -> None:
        """The main phase's fresh Adam for every discriminator (main.py builds new optimizers)."""
        self._main_optimizers = [self._optimizer(D) for D in self.critics]

    def _main_step(self) -> None:
        """main.py's iteration: critic steps of the serving discriminator, then the sanitised generator step."""
        j = int(self.schedule[self.step])
        for _ in range(self.config.critic_iters):
            self._critic_step(j, self.G, self._main_optimizers[j])
        self._generator_step(j)
        self.served[j] += 1
        self.step += 1
        self._update_ema()

    def _generator_step(self, j: int, *, private: bool = True) -> None:
        """B fakes against discriminator j; the gradient w.r.t. each image clipped and noised (`private`; False: as
        is, the non-private step that benchmarks/bench_gan.py times it against), then an Adam step of G."""
        cfg, dev, B = self.config, self.device, self.config.batch_size
        z = self._latent(B)
        y = torch.randint(0, self.spec.num_classes, (B,), generator=self.noise_gen, device=dev)
        fake = self.G(z, y)
        x = fake.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(-self.critics[j](x, y).mean(), x)  # only x: D's parameters get nothing
        if private:
            clip = cfg.clip_bound / B
            grad = sanitize(grad, clip=clip, noise_std=SENSITIVITY * self.sigma * clip, generator=self.noise_gen)
        self.opt_g.zero_grad(set_to_none=True)
        fake.backward(grad)
        self.opt_g.step()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ops.exp_mov_avg: rate min(1 − 1/(t + 1), ema) at global step t (0-based); buffers (spectral-norm
        vectors) copied."""
        alpha = min(1 - 1 / self.step, self.config.ema)
        for e, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            e.mul_(alpha).add_(p, alpha=1 - alpha)
        for ema_buffer, buffer in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    # ------------------------------------------------------------------------------- checkpointing

    def _training_state(self) -> dict[str, Any]:
        """Everything to resume (discriminators and partition included: a training checkpoint, never released)."""
        return {
            "model": self.state_dict(),
            "critics": [D.state_dict() for D in self.critics],
            "teacher_of": self.partition.teacher_of,
            "schedule": self.schedule,
            "optimizers": {
                "generator": self.opt_g.state_dict(),
                "critics": [opt.state_dict() for opt in self._main_optimizers],
            },
            "warmed": self.warmed,
            "step": self.step,
            "served": self.served,
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_gen.get_state(),
        }

    def _load_training_state(self, state: dict[str, Any]) -> None:
        """Resume with the checkpoint's partition and schedule (the discriminators were trained on them)."""
        k = self.config.discriminators
        if len(state["critics"]) != k:
            raise BenchError(f"gswgan: the checkpoint holds {len(state['critics'])} discriminators, this run {k}")
        self._restore_partition(state["teacher_of"], k)
        self.schedule = state["schedule"]
        self.load_state_dict(state["model"])
        for D, s in zip(self.critics, state["critics"], strict=True):
            D.load_state_dict(s)
        self.opt_g.load_state_dict(state["optimizers"]["generator"])
        if state["optimizers"]["critics"]:
            self._start_main()
            for opt, s in zip(self._main_optimizers, state["optimizers"]["critics"], strict=True):
                opt.load_state_dict(s)
        self.warmed, self.step = int(state["warmed"]), int(state["step"])
        self.served = state["served"].clone()
        self.generator.set_state(state["generator"])
        self.noise_gen.set_state(state["noise_generator"])

    # ----------------------------------------------------------------------------------------- sample

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] from the moving-average generator, conditioned on int64 `labels` [n]."""
        if labels is None:
            raise BenchError(f"{self.name} is class-conditional: sample() needs labels")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        cfg = self.config
        z = torch.rand(n, cfg.z_dim, generator=generator)  # drawn on the CPU: the same images on any device
        z = (z < 0.5).float() if cfg.latent == "bernoulli" else torch.randn(n, cfg.z_dim, generator=generator)
        out = [
            (self.G_ema(z[i : i + 500].to(self.device), labels[i : i + 500].to(self.device)) * 255.0)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            .cpu()
            for i in range(0, n, 500)
        ]
        spec = self.spec
        return torch.cat(out) if out else torch.zeros((0, spec.channels, spec.height, spec.width), dtype=torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        """The released network (the moving average) and the live generator; never a discriminator."""
        return {"generator": self.G.state_dict(), "generator_ema": self.G_ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.G_ema.load_state_dict(state["generator_ema"])
