"""DP-Kernel: a generator trained by MMD against the kernel mean embedding of each Poisson-sampled batch (Jiang, Sun,
Yu, "Functional Rényi Differential Privacy for Generative Modeling", NeurIPS 2023), with the noise moved to where the
update reads the private data: the embedding's gradient at the generated points (its code's noise never gets there).

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

The reference's privacy argument, and why it does not hold for its code. The paper releases the batch's kernel
mean embedding f_D(·) = (1/N) Σᵢ k(xᵢ, ·) as a FUNCTION, perturbed by a Gaussian process (the Gaussian mechanism in
the kernel's RKHS: functional RDP), so that anything computed from the noisy function is post-processing. The code
draws the process's values at the points (f̃ = f + ξ, `mvn(...).sample()`, no gradient) and differentiates the loss:
∂f̃(y)/∂y is ∂f(y)/∂y, the NOISE-FREE derivative of the private embedding, because ξ is a constant to autograd. The
generator's update direction is therefore computed from the private batch without any noise; the noise enters only
through the scalar that squaring the loss multiplies it by (2·MMD², which also contains mean f̃(X), the noisy
function read at the private points). Ours, measured before this was understood: the same fit at ε = 1 and ε = 10
gave bit-identical generators (the noise moved nothing; fd_domain 17.40 both).

Our mechanism (sound, and a deviation): what the generator needs is the gradient of the data term at the generated
points, G = [∇_y f_D(y_j)]_j ∈ R^{M×P}, f_D = (1/B̄) Σ_{i∈batch} k(xᵢ, ·) with B̄ = q·n the EXPECTED batch size
(public). Adding or removing one record moves each row by ∇_y k(x, y_j)/B̄, and for a Gaussian
exp(−‖x − y‖²/2b²)·[same label], ‖∇_y‖ = (r/b²)·e^{−r²/2b²} ≤ e^{−1/2}/b (at r = b), so ‖ΔG‖_F ≤ √M·c with
c = Σ_b e^{−1/2}/(b·B̄): `gradient_sensitivity`. G + N(0, (σ√M·c)²I) is one Gaussian mechanism with noise
multiplier σ; every step is one Poisson-subsampled (rate q, DP-SGD's sampler) Gaussian mechanism, the same ledger
stage as DP-SGD (without clipping: `max_grad_norm` is empty), calibrated and recomputed by the accountant. The
generator then steps on −(2/M) Σ_j ⟨G̃_j, y_j⟩ + mean K_YY (the MMD²'s gradient with G̃ in place of G): the
repulsion term K_YY involves generated points only. The noisy values f̃ are never needed.

DPImageBench's port adds, read from its code: a bare `except:` that, when the covariance is not positive definite,
adds NO noise and goes on (a silent failure); σ from opacus divided by 2; the generated labels equal to the private
batch's labels (the evaluation points then depend on private data); fixed-size shuffled batches while accounting
for Poisson sampling; a BigGAN-style generator (z 60) at 28×28.

Deviations from the authors' code (beyond the mechanism above): images at the dataset's own size (28×28, not
resized to 32; the generator's first map is H/2^m for the largest m leaving ≥ 4 pixels, 7×7 on 28×28, so its
widths are ngf/2·2^m: 128, 64 on 28×28; the reference's 256, 128, 64 on 32×32); an empty Poisson batch is a
step (f_D = 0 plus noise), not skipped; random numbers from the run's torch generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

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


@dataclass(frozen=True, kw_only=True)
class Config:
    batch_size: int = 60  # expected Poisson batch B̄ = q·n, and M, the generated points a step (the reference: as many)
    iterations: int = 200_000  # steps (each one noisy release)
    lr: float = 5e-5  # RMSprop
    bandwidths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)  # b of Σ_b exp(−‖x − x'‖² / 2b²)
    latent_dim: int = 10  # z dimension (--nz)
    ngf: int = 64  # generator width (CondDecoder's ngf)
    noise_multiplier: float | None = None  # σ, relative to the released gradient's sensitivity √M·c; None: calibrated

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


def embedding_gradient(
    x: Tensor, lx: Tensor, y: Tensor, ly: Tensor, bandwidths: tuple[float, ...], batch: int
) -> Tensor:
    """G = [∇_y f_D(y_j)]_j, f_D = (1/B̄) Σᵢ k(xᵢ, ·): float [M, P] (each row depends on its own y_j only)."""
    y = y.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(kernel(x, y, lx, ly, bandwidths).sum() / batch, y)
    return g


def noisy_gradient(
    x: Tensor, lx: Tensor, y: Tensor, ly: Tensor, bandwidths: tuple[float, ...], batch: int, scale: float,
    generator: torch.Generator,
) -> Tensor:  # fmt: skip
    """The release of a step: G + N(0, scale²I), scale = σ·(sensitivity of G)."""
    g = embedding_gradient(x, lx, y, ly, bandwidths, batch)
    return g + scale * torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype)


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

    def gradient_sensitivity(self) -> float:
        """√M·c: the most one record moves G = [∇_y f_D(y_j)]_j (Frobenius), c = Σ_b e^{−1/2} / (b·B̄)."""
        cfg = self.config
        c = sum(math.exp(-0.5) / b for b in cfg.bandwidths) / cfg.batch_size
        return math.sqrt(cfg.batch_size) * c

    def noise_multiplier(self, budget: Budget, n: int) -> float:
        """σ (noise σ·sensitivity on every entry of G): the config's, or calibrated to the budget for n records."""
        cfg = self.config
        if cfg.noise_multiplier is not None:
            return cfg.noise_multiplier
        if budget.is_unlimited:
            raise BenchError("dpkernel: an unlimited budget needs an explicit noise_multiplier")
        q, steps = cfg.batch_size / n, cfg.iterations
        return calibrate(budget.epsilon, lambda s: [step_stage(s, q, steps, cfg.batch_size)], budget.delta,
                         budget.accountant)  # fmt: skip

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
        sigma = self.noise_multiplier(budget, n)
        scale = sigma * self.gradient_sensitivity()
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
        progress.start(cfg.iterations, f"dpkernel σ={sigma:.3g} (noise {scale:.3g} on ∇f) q={q:.2g}")
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
        ledger.add(step_stage(sigma, q, cfg.iterations, cfg.batch_size))
        return ledger

    def _step(self, x: Tensor, lx: Tensor, scale: float, noise_gen: torch.Generator) -> Tensor:
        """One release and one generator step; returns the released G̃ (float [M, P]) for inspection."""
        cfg, classes = self.config, self.spec.num_classes
        m = cfg.batch_size
        ly = torch.randint(0, classes, (m,), generator=noise_gen, device=self.device)
        z = torch.randn(m, cfg.latent_dim, generator=noise_gen, device=self.device)
        y = self.gen(z, ly).flatten(1)
        released = noisy_gradient(x, lx, y.detach(), ly, cfg.bandwidths, cfg.batch_size, scale, noise_gen)
        k_yy = kernel(y, y, ly, ly, cfg.bandwidths)
        loss = -2.0 / m * (released * y).sum() + k_yy.mean()  # ∇_θ: the MMD²'s, with G̃ for the data term
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return released

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
    "L2 sensitivity √M·Σ_b e^(−1/2)/(b·B̄) under add/remove of the gradient of the batch's kernel mean embedding at the "
    "M generated points (one record moves each point's gradient by ∇_y k(x, y)/B̄, of norm ≤ Σ_b e^(−1/2)/b); B̄ = q·n, "
    "the expected batch size, public"
)
