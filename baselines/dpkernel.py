"""DP-Kernel: a generator trained against a noisy kernel mean embedding of each Poisson-sampled batch, released as
a Gaussian process (Jiang, Sun, Yu, "Functional Rényi Differential Privacy for Generative Modeling", NeurIPS 2023).

Reproduces dihjiang/DP-kernel@59c02b7d045113fb9fccf51186fc2a504aa0f37c:DPCondmmdG_kernel_prod.py, the MNIST/FMNIST
commands of its README (`--batch_size 60 --nz 10 --max_iter 200002 --sigma_list 1 2 4 8 16 --lr 5e-5`), with
mmd.py (`rbf_kernel_DP_loss_with_labels`), base_module.py (`CondDecoder`, `weights_init`) and pyvacy's
`IIDBatchSampler` (Poisson sampling). DPImageBench's port,
2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:models/dp_kernel.py, was read too (differences
below).

What the reference does, read from the code:

- Kernel: k((x, y), (x', y')) = Σ_b exp(−‖x − x'‖² / (2b²)) · [y = y'] on the flattened pixels in [−1, 1]
  (MNIST/FMNIST resized to 32×32), bandwidths b ∈ {1, 2, 4, 8, 16}; so k(z, z) = 5 for every z.
- Each step: a Poisson batch X (each record with probability 60/n; an empty draw is skipped), 60·(its size)
  generated samples Y with labels uniform at random; the empirical mean embedding f_D(z) = (1/N) Σᵢ k(xᵢ, z),
  N the batch's actual size, evaluated at all of Z = X ∪ Y and perturbed by ONE draw of N(0, c·K_ZZ) with
  c = √(2·5)/N · σ (σ the command's `--noise`: 0.6 for ε = 10, 1.95 for ε = 1, from TF-Privacy's DP-SGD
  statement for n = 60,000, batch 60, 200 epochs, δ = 1e-5); loss = (mean f̃(X) − 2·mean f̃(Y) + mean K_YY)²;
  RMSprop(lr 5e-5); 200,002 steps.
- Generator `CondDecoder` (DCGAN-like): [z, onehot(y)] → Linear(nz + classes, nz) → (nz, 1, 1) →
  ConvT(nz, 256, 4) → BN → ReLU → ConvT(256, 128, 4, 2, 1) → BN → ReLU → ConvT(128, 64, 4, 2, 1) → BN → ReLU →
  ConvT(64, C, 4, 2, 1) → tanh on 32×32 (ngf 64); N(0, 0.02) convolutions, N(1, 0.02) BN scales, N(0, 0.1) linear
  weights, zero biases. Samples from the generator in evaluation mode.

Privacy. The mechanism is the Gaussian mechanism in the kernel's RKHS H (Hall, Rinaldo, Wasserman 2013; the
paper's functional RDP): with the sum S_B = Σ_{i∈B} k(xᵢ, ·) over a Poisson batch, adding or removing one record
moves S_B by k(x, ·), of RKHS norm √k(x, x) = √L (L bandwidths), so S_B/B̄ (B̄ = q·n the EXPECTED batch size,
public) has sensitivity Δ = √L / B̄, and S_B/B̄ + σΔ·G, G a Gaussian process with covariance k, has the Rényi
divergences of the Gaussian mechanism with noise multiplier σ. Every step is then one Poisson-subsampled Gaussian
mechanism, q = B̄/n, composed over the steps: the same ledger stage as DP-SGD (without clipping: `max_grad_norm`
is empty), its batches drawn by DP-SGD's Poisson sampler, recomputed by the accountant. The noisy function is only
ever evaluated at the generated points Y (data-independent: drawn from the generator, which is post-processing,
with labels uniform at random), where G is N(0, K_YY): `gp_noise` draws it from a Cholesky
factor of K_YY; when K_YY is numerically singular it adds jitter·I to the covariance — MORE noise, independent of
the data, so post-processing — and fails loudly if even that does not factor. The loss is the part of the MMD²
that depends on the generator, −2·mean f̃(Y) + mean K_YY: its gradient is the MMD²'s.

Where the reference's mechanism differs, and what that means (the card of a run says ours):
- the noise's covariance is c·K with c = Δ'σ (Δ' = √(2L)/N, the replace-one sensitivity of the mean over the
  ACTUAL batch size), not (Δ'σ)²K: the noise's standard deviation is √(Δ'σ), which is larger than Δ'σ whenever
  Δ'σ < 1 (at the README's settings, 5.6× at ε = 10): more noise than its accounting needs. `noise_form =
  "reference"` adds that covariance c·K (with our Δ) and charges it as what it is, noise multiplier √(σ/Δ);
- the mean's denominator is the batch's actual size, which is data-dependent under Poisson sampling (ours: B̄);
- the noisy function is also evaluated at the private batch X (`f_Dx_tilde`), and the loss is the SQUARE of an
  MMD² estimate that contains mean f̃(X): the step's gradient, 2·MMD²·∇MMD², is scaled by a statistic of the
  private batch that the release does not cover (not post-processing). Ours drops that term and the square;
- DPImageBench's port wraps the draw in a bare `except:` that, when K is not positive definite, adds NO noise and
  goes on (a silent failure of the mechanism); it divides σ from opacus by 2, takes the generated labels equal to
  the private batch's labels (the evaluation points then depend on private data), samples fixed-size shuffled
  batches while accounting for Poisson sampling, and uses a BigGAN-style generator (z 60) at 28×28.

Deviations from the authors' code (beyond the mechanism above): images at the dataset's own size (28×28, not
resized to 32; the generator's first map is H/2^m for the largest m leaving ≥ 4 pixels, 7×7 on 28×28, so its
widths are ngf/2·2^m: 128, 64 on 28×28; the reference's 256, 128, 64 on 32×32); an empty Poisson batch is a
step (f_D = 0 plus noise), not skipped; random numbers from the run's torch generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import DataSpec, ImageDataset, Progress, device_generator
from bench.errors import BenchError
from bench.nets import BuiltOnce, seeded_init
from bench.pixels import to_model_range, to_uint8
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate
from bench.privacy.dpsgd import poisson_stream

REFERENCE = "dihjiang/DP-kernel@59c02b7d045113fb9fccf51186fc2a504aa0f37c:DPCondmmdG_kernel_prod.py"
JITTERS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # relative to k(z, z) = L, added to K_YY's diagonal in turn


@dataclass(frozen=True, kw_only=True)
class Config:
    batch_size: int = 60  # expected Poisson batch B̄ = q·n
    iterations: int = 200_000  # steps (each one noisy release)
    lr: float = 5e-5  # RMSprop
    bandwidths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)  # b of Σ_b exp(−‖x − x'‖² / 2b²)
    latent_dim: int = 10  # z dimension (--nz)
    ngf: int = 64  # generator width (CondDecoder's ngf)
    noise_multiplier: float | None = None  # σ (relative to Δ = √L / B̄); None: calibrated to ε
    # "rkhs": the Gaussian mechanism in the RKHS, covariance (σΔ)²·K. "reference": the authors' covariance σΔ·K,
    # charged as what it is (noise multiplier √(σ/Δ))
    noise_form: Literal["rkhs", "reference"] = "rkhs"

    def __post_init__(self) -> None:
        for name in ("batch_size", "iterations", "latent_dim", "ngf"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ngf % 2:
            raise ValueError(f"ngf must be even (the first width is ngf/2·2^m), got {self.ngf}")
        if not self.bandwidths or not all(math.isfinite(b) and b > 0 for b in self.bandwidths):
            raise ValueError(f"bandwidths must be finite numbers > 0, got {list(self.bandwidths)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier}")


def upsamplings(side: int) -> tuple[int, int]:
    """(m, s0): the largest m with side / 2^m an integer ≥ 4, and s0 = side / 2^m (32 → (3, 4), 28 → (2, 7))."""
    m = 0
    while side % 2 ** (m + 1) == 0 and side // 2 ** (m + 1) >= 4:
        m += 1
    return m, side // 2**m


class CondDecoder(nn.Module):
    """The reference's generator, generalised from 32×32: forward(z float [B, nz], y int64 [B]) → [B, C, H, W] in
    (−1, 1)."""

    def __init__(self, spec: DataSpec, *, latent_dim: int, ngf: int) -> None:
        super().__init__()
        if spec.height != spec.width:
            raise BenchError(f"dpkernel's generator needs square images, got {spec.height}×{spec.width}")
        m, s0 = upsamplings(spec.height)
        if m < 1:
            raise BenchError(f"dpkernel's generator needs a side of 2^m·s (m ≥ 1, s ≥ 4), got {spec.height}")
        self.num_classes, self.latent_dim = spec.num_classes, latent_dim
        self.decoder_input = nn.Linear(latent_dim + spec.num_classes, latent_dim)
        c = ngf // 2 * 2**m
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, c, s0, 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        ]
        for _ in range(m - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, spec.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.decoder_input(torch.cat([z, F.one_hot(y, self.num_classes).float()], dim=1))
        return self.main(h.view(-1, self.latent_dim, 1, 1))


def weights_init(m: nn.Module) -> None:
    """The reference's initialisation (base_module.weights_init), from torch's global RNG (seeded by the run)."""
    if isinstance(m, nn.ConvTranspose2d | nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.1)
        nn.init.zeros_(m.bias)


def kernel(a: Tensor, b: Tensor, la: Tensor, lb: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    """k between rows: float [M, P], [N, P] and int64 labels [M], [N] → [M, N] (Σ_b Gaussians × [same label])."""
    d2 = torch.cdist(a, b).square()
    k = sum(torch.exp(-d2 / (2 * bw**2)) for bw in bandwidths)
    return k * (la[:, None] == lb[None, :])


def gp_noise(k_yy: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    """One draw of N(0, scale²·K_YY) (float [M]); jitter·L·I is added to the covariance where K_YY does not factor
    (more noise, independent of the data). Raises BenchError rather than adding none."""
    level = float(k_yy.diagonal().max()) if len(k_yy) else 1.0
    eye = torch.eye(len(k_yy), dtype=k_yy.dtype, device=k_yy.device)
    for jitter in JITTERS:
        chol, info = torch.linalg.cholesky_ex(k_yy + jitter * level * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            u = torch.randn(len(k_yy), generator=generator, device=k_yy.device, dtype=k_yy.dtype)
            return scale * (chol @ u)
    raise BenchError(
        f"dpkernel: the generated points' kernel matrix does not factor even with jitter {JITTERS[-1]:g}·L; "
        "refusing to go on without noise"
    )


class DPKernel(BuiltOnce):
    name: ClassVar[str] = "dpkernel"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None:
        self.config: Config = config
        self.spec, self.device = spec, device
        self.check_networks()  # built for real once: in fit, under the run's seed (bench.nets.BuiltOnce)

    def released_model(self) -> nn.Module:
        return self.gen

    def _networks(self) -> None:
        self.gen = self._build()

    def _build(self) -> nn.Module:
        return CondDecoder(self.spec, latent_dim=self.config.latent_dim, ngf=self.config.ngf).to(self.device)

    # ------------------------------------------------------------------------------------------- fit

    @property
    def sensitivity(self) -> float:
        """Δ = √L / B̄: the RKHS norm of one record's k(x, ·) over the expected batch size."""
        return math.sqrt(len(self.config.bandwidths)) / self.config.batch_size

    def noise(self, budget: Budget, n: int) -> tuple[float, float]:
        """(noise scale s added as s·G, noise multiplier charged = s / Δ) for n records."""
        cfg = self.config
        if cfg.noise_multiplier is not None:
            sigma = cfg.noise_multiplier
        elif budget.is_unlimited:
            raise BenchError("dpkernel: an unlimited budget needs an explicit noise_multiplier")
        else:
            q, steps = cfg.batch_size / n, cfg.iterations
            sigma = calibrate(budget.epsilon, lambda s: [step_stage(s, q, steps, cfg.batch_size)], budget.delta,
                              budget.accountant)  # fmt: skip
        delta = self.sensitivity
        if cfg.noise_form == "reference":
            scale = math.sqrt(sigma * delta)  # covariance σΔ·K, as the reference's c·K
            return scale, scale / delta
        return sigma * delta, sigma

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"steps": config.iterations}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n, dev = self.config, len(train), self.device
        if cfg.batch_size > n:
            raise BenchError(f"dpkernel: batch_size {cfg.batch_size} exceeds the {n} training records")
        scale, charged = self.noise(budget, n)
        q = cfg.batch_size / n
        with seeded_init(generator):
            self.gen = self._build()
        self.optimizer = torch.optim.RMSprop(self.gen.parameters(), lr=cfg.lr)
        self.step = 0
        noise_gen = device_generator(generator, dev)
        if (state := progress.resume()) is not None:
            self.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            generator.set_state(state["generator"])
            noise_gen.set_state(state["noise_generator"])
        progress.start(cfg.iterations, f"dpkernel s={scale:.3g} (σ={charged:.3g}) q={q:.2g}")
        progress.advance(self.step)
        x_all = train.images.reshape(n, -1)
        labels_all = train.labels
        batches = poisson_stream(n, q, generator)  # every record with probability q, float64 uniforms (DP-SGD's)
        self.gen.train()
        while self.step < cfg.iterations:
            take = next(batches)
            x = to_model_range(x_all[take].to(dev)).float()
            lx = labels_all[take].to(dev)
            self._step(x, lx, scale, noise_gen)
            self.step += 1
            progress.advance()
            progress.checkpoint(
                lambda: {
                    "model": self.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "generator": generator.get_state(), "noise_generator": noise_gen.get_state(),
                }
            )  # fmt: skip
        ledger = PrivacyLedger()
        ledger.add(step_stage(charged, q, cfg.iterations, cfg.batch_size))
        return ledger

    def _step(self, x: Tensor, lx: Tensor, scale: float, noise_gen: torch.Generator) -> Tensor:
        """One release and one generator step; returns the noisy f̃(Y) (float [M]) for inspection."""
        cfg, classes = self.config, self.spec.num_classes
        m = cfg.batch_size
        ly = torch.randint(0, classes, (m,), generator=noise_gen, device=self.device)
        z = torch.randn(m, cfg.latent_dim, generator=noise_gen, device=self.device)
        y = self.gen(z, ly).flatten(1)
        k_xy = kernel(x, y, lx, ly, cfg.bandwidths)  # [|B|, M]
        k_yy = kernel(y, y, ly, ly, cfg.bandwidths)
        f_y = k_xy.sum(0) / cfg.batch_size + gp_noise(k_yy.detach(), scale, noise_gen)  # the release, at Y only
        loss = -2 * f_y.mean() + k_yy.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return f_y.detach()

    # ---------------------------------------------------------------------------------------- sample

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] for int64 `labels` [n], from the generator in evaluation mode."""
        if labels is None:
            raise BenchError("dpkernel is class-conditional: it needs labels")
        self.gen.eval()
        out = [torch.zeros((0, self.spec.channels, self.spec.height, self.spec.width), dtype=torch.uint8)]
        for y in labels.split(1000):
            z = torch.randn(len(y), self.config.latent_dim, generator=generator).to(self.device)
            out.append(to_uint8(self.gen(z, y.to(self.device))).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.load_state_dict(state["gen"])


def step_stage(sigma: float, q: float, steps: int, batch_size: int) -> Stage:
    """`steps` Poisson-subsampled Gaussian releases of the batch's kernel mean embedding."""
    return Stage(name="embedding", mechanism="poisson_gaussian", noise_multiplier=sigma, sampling_rate=q, steps=steps,
                 expected_batch_size=float(batch_size), sensitivity=SENSITIVITY)  # fmt: skip


SENSITIVITY = (
    "RKHS sensitivity √L / B̄ under add/remove: one record moves the batch's kernel sum by k(x, ·), of norm √k(x, x) "
    "= √L (L bandwidths); divided by the expected batch size B̄ = q·n (public); the noise is a Gaussian process "
    "with the kernel's covariance, evaluated at generated points only"
)
