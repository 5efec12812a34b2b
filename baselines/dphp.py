"""DP-HP: Hermite polynomial features for private data generation (Vinaroz, Charusaie, Harder, Adamczewski, Park,
ICML 2022).

Reproduces ParkLabML/DP-HP@e9aec76845f8a127ba0a7a25614641878199cae7:dp_mehp/prod_and_sum_kernel_image.py, the
private MNIST/FMNIST commands of README.md (`--split --split-sum-ratio 0.8 --is-private`), with dp_mehp/all_aux_files.py
(find_rho, phi_recursion, ME_with_HP, ME_with_HP_prod, FCCondGen, ConvCondGen). Below, :N is a line of the script,
aux:N one of all_aux_files.py.

What the reference does, read from the code:

- Kernel: per pixel, the Gaussian kernel k(x, x') = exp(−(x − x')²/(2σ²)) (σ² is `--kernel-length-*`, a variance:
  0.005 MNIST, 0.15 FMNIST, the same for both kernels) written as Σₖ φₖ(x) φₖ(x'), with ρ = −1/(2α) + √(1/α² + 4)/2,
  α = 1/(2σ²) (find_rho, aux:104; it equals √(1 + σ⁴) − σ², always in (0, 1), so the rho_1 branch never runs),
  φ₀ = (1−ρ)^¼ (1+ρ)^¼ exp(−ρx²/(1+ρ)), φ₁ = √(2ρ) x φ₀, φₖ₊₁ = √ρ/√(2(k+1)) · 2x φₖ − ρk/√(k(k+1)) · φₖ₋₁
  (phi_recursion, aux:139), truncated at order C: φₖ = (1−ρ²)^¼ √(ρᵏ/(2ᵏk!)) Hₖ(x) exp(−ρx²/(1+ρ)), and Mehler's
  formula gives Σₖ φₖ(x) φₖ(x') = exp(−ρ(x − x')²/(1 − ρ²)) = k(x, x') since 1 − ρ² = 2σ²ρ.
- Sum kernel k(x, x') = (1/P) Σ_d k(x_d, x'_d) over the P = 784 pixels in [0, 1]: per record the features of every
  pixel, orders 0..C_sum = 100, divided by √P (ME_with_HP, aux:182-201); summed per class and divided by n = 60,000:
  a [P·(C+1), classes] embedding, released ONCE before training (prod_and_sum_kernel_image.py:220, 231).
- Product kernel k(x, x') = Π_{d ∈ dims} k(x_d, x'_d) over `--prod-dimension` 2 pixels drawn with
  np.random.choice(784, 2, replace=False) at the start of EVERY epoch (:266): per record the outer product of the
  two pixels' features, orders 0..C_prod = 20, (C+1)² = 441 features (ME_with_HP_prod, aux:203-244), summed per class
  over the whole training set, divided by n and released every epoch (:306-325).
- Noise: N(0, (2σ/n)²) on each mean (replace-one, :137, :234), σ from autodp's privacy_calibrator.gaussian_mech:
  the sum kernel at (0.8ε, δ/2) with k = 1, the product kernel at (0.2ε, δ/2) with k = epochs (:227-234); the two
  parts composed by basic composition (ε and δ add up).
- Generator: FCCondGen('500,500') for MNIST: [z ~ N(0, I₅), onehot(y)] → Linear(15, 500) → BatchNorm → ReLU →
  Linear(500, 500) → BatchNorm → ReLU → Linear(500, 784) → sigmoid (aux:938-990); ConvCondGen for FMNIST, DP-MERF's
  with a first dense layer of 500 (aux:1006-1042).
- Loss: Σ (prod_data − prod_synth)² + γ Σ (sum_data − sum_synth)² (:361-364), synthetic embeddings per class summed
  and divided by the batch size, labels uniform at random; γ = 20 MNIST, 10 FMNIST. Adam(lr 0.01), StepLR(γ 0.9)
  per epoch, 10 epochs of ⌈n/200⌉ steps of 200 generated samples. The generator never sees private data.
- Samples: the generator in evaluation mode (BatchNorm's running statistics), balanced labels.

Privacy under the harness's add/remove adjacency. Let S_sum(D) = Σᵢ Φ(xᵢ) ⊗ e_yᵢ, Φ(x) = (φ(x_1), ..., φ(x_P))/√P,
φ = (φ₀..φ_C). Mehler's formula gives Σₖ₌₀^∞ φₖ(x)² = k(x, x) = 1 for every x; the truncated sum has fewer
non-negative terms, so ‖φ(x)‖ ≤ 1, ‖Φ(x)‖² = (1/P) Σ_d ‖φ(x_d)‖² ≤ 1 and ‖Φ(x) ⊗ e_y‖ ≤ 1. Adding or removing one
record moves S_sum by that one term: Δ₂S_sum ≤ 1. For the product kernel,
S_prod(D) = Σᵢ (φ(x_{i,a}) ⊗ φ(x_{i,b})) ⊗ e_yᵢ with the epoch's pixels (a, b) drawn without looking at the data:
‖φ(x_a) ⊗ φ(x_b)‖ = ‖φ(x_a)‖ ‖φ(x_b)‖ ≤ 1 (and so for D pixels), so Δ₂S_prod ≤ 1 for each epoch's release. The
releases are S_sum + N(0, σ_sum² I) once and S_prod,e + N(0, σ_prod² I) at each epoch e: Gaussian mechanisms of noise
multipliers σ_sum and σ_prod, adaptively composed (the pixels are public randomness; the generator never touches the
data). Dividing by n is post-processing with n public (as dpmerf). In floating point: the data's features are
computed in float64 on the 256 pixel levels, where ‖φ(v)‖² can exceed 1 by a few units in the last place (~1e-15),
nothing against σ (the tests check Δ₂ ≤ 1 + 1e-6 on extreme records).

Budget split: the reference's split (80% of ε and half of δ to the sum kernel, the rest to the `epochs` product
releases) fixes the RATIO σ_prod/σ_sum: each part is calibrated alone with the harness's accountant. One common scale
is then found by `calibrate` so that the COMPOSED ledger (one sum-kernel release, `epochs` product-kernel releases)
meets (ε, δ) with that accountant; this spends the whole budget where basic composition would leave some unused.
`split = false` is the reference's run without --split: one σ for all 1 + epochs releases (:238).

Deviations (beyond the adjacency and the calibration above):
- noise σ on the SUM (add/remove) instead of 2σ/n on the mean (replace-one); `adjacency = "replace-one"` adds the
  reference's twice-as-large noise and charges it as what it is under add/remove (a smaller ε than the target);
- the data embeddings are computed exactly as in the reference but by a different route: pixels take 256 values
  v/255, so Σᵢ φ(x_{i,d}) is a histogram of levels times a [256, C+1] table of features (float64), not a recursion
  per record in float32;
- the reference's per-epoch `log_gen_data` (100 samples in training mode: BatchNorm's running statistics move, random
  numbers drawn) is not run, and neither is its (unused) pass over the real data loader during generator steps;
- random numbers come from the run's torch generator; the product kernel's pixels from torch.randperm, not numpy;
- shapes other than 1×28×28: P = C·H·W; the conv generator's first map is (16, H/4, W/4) as dpmerf's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import DataSpec, ImageDataset, Progress
from bench.errors import BenchError
from bench.nets import BuiltOnce, seeded_init
from bench.nets.kernel_gen import ConvCondGen, FCCondGen, GeneratorTraining, sample_images
from bench.privacy import N_DIVIDES_THE_RELEASE, Budget, PrivacyLedger, Stage, calibrate

EMBED_BATCH = 5000  # records per histogram pass of the data embeddings (memory only, not the result)
LEVELS = 256  # uint8 pixel values; pixel v is the number v/255, as torchvision's ToTensor


@dataclass(frozen=True, kw_only=True)
class Config:
    order_sum: int = 100  # C of the sum kernel: Hermite orders 0..C per pixel (--order-hermite-sum)
    order_prod: int = 20  # C of the product kernel (--order-hermite-prod)
    prod_dimension: int = 2  # pixels of the product kernel, drawn anew each epoch: (C+1)^this features
    kernel_length_sum: float | None = None  # σ², a variance (authors: 0.005 MNIST, 0.15 FMNIST; set per dataset)
    kernel_length_prod: float | None = None  # σ² of the product kernel (authors: the same as the sum kernel's)
    gamma: float | None = None  # weight of the sum-kernel loss (authors' private runs: 20 MNIST, 10 FMNIST)
    # --split: the reference's budget split fixes σ_prod/σ_sum, then one common scale meets ε for the composed ledger.
    # False: the reference without --split, one σ for all 1 + epochs releases
    split: bool = True
    split_sum_ratio: float = 0.8  # the sum kernel's share of (ε, δ) in the split (--split-sum-ratio)
    sigma_sum: float | None = None  # fixed noise multiplier of the sum-kernel release (with sigma_prod); None: ε
    sigma_prod: float | None = None  # fixed noise multiplier of each product-kernel release (with sigma_sum)
    # "add-remove": noise σ on the sums, the harness's adjacency. "replace-one": the reference's 2σ (its means'
    # replace-one sensitivity 2/n), charged as such (a smaller ε)
    adjacency: Literal["add-remove", "replace-one"] = "add-remove"
    generator: Literal["fc", "conv"] | None = None  # authors: "fc" (FCCondGen) MNIST, "conv" (ConvCondGen) FMNIST
    batch_size: int = 200  # generated samples per step
    epochs: int = 10  # generator epochs of ⌈n / batch_size⌉ steps; one product-kernel release each
    lr: float = 0.01  # Adam
    lr_decay: float = 0.9  # StepLR γ, once per epoch
    d_code: int = 5  # latent code z ~ N(0, I)
    gen_hidden: tuple[int, ...] = (500, 500)  # "fc": the two hidden widths; "conv": the first is the dense width
    gen_channels: tuple[int, ...] = (16, 8)  # "conv": channels of the two feature maps before the output
    kernel_size: int = 5  # "conv": of both convolutions (padding keeps the size)

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "d_code", "kernel_size", "prod_dimension"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("order_sum", "order_prod"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.order_prod + 1) ** self.prod_dimension > 1_000_000:
            raise ValueError(
                f"(order_prod + 1) ** prod_dimension must be <= 1e6 features, got {self.order_prod + 1}**"
                f"{self.prod_dimension}"
            )
        for name in ("kernel_length_sum", "kernel_length_prod", "gamma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not 0 < self.split_sum_ratio < 1:
            raise ValueError(f"split_sum_ratio must be in (0, 1), got {self.split_sum_ratio}")
        if (self.sigma_sum is None) != (self.sigma_prod is None):
            raise ValueError(f"set both sigma_sum and sigma_prod or neither, got {self.sigma_sum}, {self.sigma_prod}")
        for name in ("sigma_sum", "sigma_prod"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (padding keeps the size), got {self.kernel_size}")
        if len(self.gen_hidden) != 2 or min(self.gen_hidden) < 1:
            raise ValueError(f"gen_hidden must be two positive widths, got {self.gen_hidden}")
        if len(self.gen_channels) != 2 or min(self.gen_channels) < 1:
            raise ValueError(f"gen_channels must be two positive widths, got {self.gen_channels}")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1):
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")


# ------------------------------------------------------------------------------------------------- features


def find_rho(sigma2: float) -> float:
    """Mehler's ρ for the Gaussian kernel of variance σ² (find_rho, α = 1/(2σ²)): √(1 + σ⁴) − σ², in (0, 1)."""
    alpha = 1.0 / (2.0 * sigma2)
    return -1.0 / (2.0 * alpha) + math.sqrt(1.0 / alpha**2 + 4.0) / 2.0


def hermite_features(x: Tensor, rho: float, order: int) -> Tensor:
    """φ₀..φ_C at every entry of x: float [...] → [C+1, ...], dtype of x; Σₖ φₖ(x)² ≤ 1 (Mehler: = 1 for C = ∞)."""
    phi = [(1 - rho) ** 0.25 * (1 + rho) ** 0.25 * torch.exp(-rho / (1 + rho) * x**2)]
    if order >= 1:
        phi.append(math.sqrt(2 * rho) * x * phi[0])
    for k in range(1, order):  # φₖ₊₁ from φₖ and φₖ₋₁ (phi_recursion)
        phi.append(math.sqrt(rho / (2 * (k + 1))) * 2 * x * phi[k] - rho * k / math.sqrt(k * (k + 1)) * phi[k - 1])
    return torch.stack(phi)  # order-major: each φₖ a contiguous slab


def level_table(rho: float, order: int, device: torch.device) -> Tensor:
    """φ(v/255) for the 256 pixel levels: float64 [256, C+1]."""
    return hermite_features(torch.arange(LEVELS, dtype=torch.float64, device=device) / 255.0, rho, order).T


def outer_features(phi: Tensor) -> Tensor:
    """Per record, the outer product of its pixels' features: [B, D, K] → [B, K^D] (first pixel's index major)."""
    out = phi[:, 0]
    for d in range(1, phi.shape[1]):
        out = (out[:, :, None] * phi[:, d, None, :]).flatten(1)
    return out


def sum_embedding(data: ImageDataset, rho: float, order: int, device: torch.device) -> Tensor:
    """S_sum = Σᵢ Φ(xᵢ) ⊗ e_yᵢ, Φ(x) = (φ(x_1), ..., φ(x_P))/√P: float64 [C+1, classes, P] (the reference's
    [P·(C+1), classes], permuted).

    Exact and fast: per (class, pixel) the counts of each of the 256 levels (one bincount per batch of records),
    times the level table."""
    pixels, classes = data.images[0].numel(), data.num_classes
    counts = torch.zeros(classes * pixels * LEVELS, dtype=torch.int64, device=device)
    offsets = torch.arange(pixels, device=device) * LEVELS  # [P]
    for images, labels in zip(data.images.split(EMBED_BATCH), data.labels.split(EMBED_BATCH), strict=True):
        v = images.to(device).reshape(len(images), pixels).long()  # [B, P] levels
        index = labels.to(device)[:, None] * (pixels * LEVELS) + offsets + v  # [B, P] into (class, pixel, level)
        counts += torch.bincount(index.flatten(), minlength=len(counts))
    s = torch.einsum("cpv,vk->kcp", counts.view(classes, pixels, LEVELS).double(), level_table(rho, order, device))
    return s / math.sqrt(pixels)


def prod_embedding(data: ImageDataset, dims: Tensor, rho: float, order: int, device: torch.device) -> Tensor:
    """S_prod = Σᵢ (⊗_{d ∈ dims} φ(x_{i,d})) ⊗ e_yᵢ: float64 [(C+1)^D, classes], for int64 pixel indices `dims` [D]."""
    table = level_table(rho, order, device)
    s = torch.zeros((order + 1) ** len(dims), data.num_classes, dtype=torch.float64, device=device)
    for images, labels in zip(data.images.split(EMBED_BATCH), data.labels.split(EMBED_BATCH), strict=True):
        v = images.to(device).reshape(len(images), -1)[:, dims.to(device)].long()  # [B, D] levels
        s += outer_features(table[v]).T @ F.one_hot(labels.to(device), data.num_classes).double()
    return s


def gaussian_release(s: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """The Gaussian mechanism on a sum of L2 sensitivity ≤ 1: s + N(0, σ² I), noise from the run's generator."""
    return s + sigma * torch.randn(tuple(s.shape), generator=generator, dtype=torch.float64).to(s.device)


# ------------------------------------------------------------------------------------------------ generators


def build_generator(spec: DataSpec, cfg: Config) -> nn.Module:
    """FCCondGen('500,500') or ConvCondGen with a first dense layer of gen_hidden[0] (bench.nets.kernel_gen)."""
    if cfg.generator == "fc":
        return FCCondGen(spec, d_code=cfg.d_code, hidden=cfg.gen_hidden)
    return ConvCondGen(spec, d_code=cfg.d_code, hidden=cfg.gen_hidden[0], channels=cfg.gen_channels,
                       kernel_size=cfg.kernel_size, owner="dphp")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- method


class DPHP(BuiltOnce):
    name: ClassVar[str] = "dphp"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None:
        self.config: Config = config
        self.spec, self.device = spec, device
        # the generator's kind depends on the dataset (no default): checked here when set (built for real once, in
        # fit, under the run's seed: bench.nets.BuiltOnce), else fit says what to set
        if config.generator:
            self.check_networks()
        else:
            self.gen: nn.Module | None = None
        self.noisy_sum: Tensor | None = None  # the released sum-kernel mean [C+1, classes, P]
        self.prod_dims: list[Tensor] = []  # per epoch so far, the product kernel's pixels [D] (public randomness)
        self.noisy_prod: list[Tensor] = []  # per epoch so far, the released product-kernel mean [(C+1)^D, classes]

    def _networks(self) -> None:
        self.gen = build_generator(self.spec, self.config).to(self.device)

    def released_model(self) -> nn.Module:
        return self._generator()

    def _generator(self) -> nn.Module:
        if self.gen is None:
            raise BenchError(
                'dphp: generator is not set (the authors used "fc" for MNIST and "conv" for Fashion-MNIST); '
                "set it in the profile ([dphp.<dataset>]) or with --set generator=..."
            )
        return self.gen

    # ------------------------------------------------------------------------------------------- fit

    def noise_multipliers(self, budget: Budget) -> tuple[float, float]:
        """(σ_sum, σ_prod) of the releases on the sums (sensitivity ≤ 1 each): the config's, or the reference's
        split ratio scaled to meet the budget composed (times 2 with adjacency "replace-one", as its 2σ/n)."""
        cfg = self.config
        if cfg.sigma_sum is not None and cfg.sigma_prod is not None:
            sigma_sum, sigma_prod = cfg.sigma_sum, cfg.sigma_prod
        elif budget.is_unlimited:
            raise BenchError("dphp: an unlimited budget needs explicit sigma_sum and sigma_prod")
        else:
            ratio = split_ratio(budget, cfg)
            sigma_sum = calibrate(
                budget.epsilon, lambda s: release_stages(s, ratio * s, cfg.epochs), budget.delta, budget.accountant
            )
            sigma_prod = ratio * sigma_sum
        factor = 2.0 if cfg.adjacency == "replace-one" else 1.0
        return factor * sigma_sum, factor * sigma_prod

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"generator steps": config.epochs * math.ceil(num_records / config.batch_size)}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n, device = self.config, len(train), self.device
        if cfg.kernel_length_sum is None or cfg.kernel_length_prod is None or cfg.gamma is None:
            raise BenchError(
                "dphp: kernel_length_sum, kernel_length_prod and gamma must be set (the authors used σ² = 0.005 for "
                "both kernels and gamma = 20 for MNIST, σ² = 0.15 and gamma = 10 for Fashion-MNIST); set them in the "
                "profile ([dphp.<dataset>]) or with --set"
            )
        self._generator()  # its kind must be set
        if cfg.prod_dimension > train.images[0].numel():
            raise BenchError(
                f"dphp: prod_dimension {cfg.prod_dimension} is more than the {train.images[0].numel()} pixels"
            )
        rho_sum, rho_prod = find_rho(cfg.kernel_length_sum), find_rho(cfg.kernel_length_prod)
        sigma_sum, sigma_prod = self.noise_multipliers(budget)
        steps_per_epoch = math.ceil(n / cfg.batch_size)  # the reference's loop over its data loader
        total = cfg.epochs * steps_per_epoch
        with seeded_init(generator):  # initial weights from the run's seed
            self.gen = build_generator(self.spec, cfg).to(device)
        training = GeneratorTraining(self.gen, lr=cfg.lr, lr_decay=cfg.lr_decay, owner=self.name)
        step = 0
        if (state := progress.resume()) is not None:  # every release is in the checkpoint: none is drawn twice
            self.load_state_dict(state["model"])
            generator.set_state(state["generator"])
            step = training.resume(state)
        else:
            s = sum_embedding(train, rho_sum, cfg.order_sum, device)
            self.noisy_sum = (gaussian_release(s, sigma_sum, generator) / n).float()  # n public: post-processing
            self.prod_dims, self.noisy_prod = [], []
        progress.start(total, "dphp generator (post-processing of noisy sum- and product-kernel embeddings)")
        progress.advance(step)
        gen, noisy_sum, pixels, classes = self.gen, self.noisy_sum, train.images[0].numel(), self.spec.num_classes
        gamma = cfg.gamma
        assert noisy_sum is not None and gamma is not None

        def loss_at(step: int) -> Tensor:
            if len(self.noisy_prod) == step // steps_per_epoch:  # a new epoch: its product-kernel release
                dims = torch.randperm(pixels, generator=generator)[: cfg.prod_dimension]  # data-independent
                s = prod_embedding(train, dims, rho_prod, cfg.order_prod, device)
                self.prod_dims.append(dims)
                self.noisy_prod.append((gaussian_release(s, sigma_prod, generator) / n).float())
            dims, noisy_prod = self.prod_dims[-1].to(device), self.noisy_prod[-1]
            z = torch.randn(cfg.batch_size, cfg.d_code, generator=generator).to(device)
            labels = torch.randint(0, classes, (cfg.batch_size,), generator=generator).to(device)
            x = gen(z, labels).flatten(1)  # [B, P] in [0, 1]
            onehot = F.one_hot(labels, classes).float() / cfg.batch_size  # [B, classes]: means over the batch
            phi = hermite_features(x, rho_sum, cfg.order_sum)  # [C+1, B, P]
            synth_sum = torch.matmul(onehot.T, phi) / math.sqrt(pixels)  # [C+1, classes, P]
            phi_prod = hermite_features(x[:, dims], rho_prod, cfg.order_prod).permute(1, 2, 0)  # [B, D, C+1]
            synth_prod = outer_features(phi_prod).T @ onehot  # [(C+1)^D, classes]
            return ((noisy_prod - synth_prod) ** 2).sum() + gamma * ((noisy_sum - synth_sum) ** 2).sum()

        training.run(step=step, total=total, steps_per_epoch=steps_per_epoch, loss_at=loss_at, progress=progress,
                     state=lambda: {"model": self.state_dict(), "generator": generator.get_state()})  # fmt: skip
        ledger = PrivacyLedger()
        for stage in release_stages(sigma_sum, sigma_prod, len(self.noisy_prod)):  # what was drawn is charged
            ledger.add(stage)
        ledger.assume(N_DIVIDES_THE_RELEASE)
        return ledger

    # ---------------------------------------------------------------------------------------- sample

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] for int64 `labels` [n], from the generator in evaluation mode."""
        return sample_images(self._generator(), labels, spec=self.spec, d_code=self.config.d_code,
                             generator=generator, device=self.device, owner=self.name)  # fmt: skip

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "gen": self._generator().state_dict(),
            "noisy_sum": self.noisy_sum,
            "prod_dims": list(self.prod_dims),
            "noisy_prod": list(self.noisy_prod),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator().load_state_dict(state["gen"])
        self.noisy_sum = None if state["noisy_sum"] is None else state["noisy_sum"].to(self.device)
        self.prod_dims = [d.cpu() for d in state["prod_dims"]]
        self.noisy_prod = [p.to(self.device) for p in state["noisy_prod"]]


# ------------------------------------------------------------------------------------------------- privacy


def split_ratio(budget: Budget, cfg: Config) -> float:
    """σ_prod / σ_sum of the reference's split: each part calibrated alone to its share of (ε, δ) (the sum kernel
    to (rε, δ/2) once, the product kernel to ((1−r)ε, δ/2) over `epochs` releases); 1 without a split."""
    if not cfg.split:
        return 1.0
    r = cfg.split_sum_ratio
    eps, delta, acc = budget.epsilon, budget.delta / 2, budget.accountant
    sigma_sum = calibrate(r * eps, lambda s: release_stages(s, None, 0), delta, acc)
    sigma_prod = calibrate((1 - r) * eps, lambda s: release_stages(None, s, cfg.epochs), delta, acc)
    return sigma_prod / sigma_sum


def release_stages(sigma_sum: float | None, sigma_prod: float | None, epochs: int) -> list[Stage]:
    """The Gaussian releases: the sum kernel's once, the product kernel's `epochs` times (each sensitivity ≤ 1)."""
    stages = []
    if sigma_sum is not None:
        stages.append(Stage(name="sum-kernel", mechanism="gaussian", noise_multiplier=sigma_sum, count=1,
                            sensitivity=SENSITIVITY_SUM))  # fmt: skip
    if sigma_prod is not None and epochs > 0:
        stages.append(Stage(name="product-kernel", mechanism="gaussian", noise_multiplier=sigma_prod, count=epochs,
                            sensitivity=SENSITIVITY_PROD))  # fmt: skip
    return stages


SENSITIVITY_SUM = (
    "L2 sensitivity <= 1 under add/remove: the SUM over the records of Φ(x) ⊗ onehot(y), Φ(x) = the truncated Hermite "
    "features of every pixel / √P, of norm <= 1 (Mehler's formula); the mean divides it by n, taken as public (the "
    "reference calibrates the mean for replace-one, 2/n)"
)
SENSITIVITY_PROD = (
    "L2 sensitivity <= 1 under add/remove, per release: the SUM over the records of the outer product of the truncated "
    "Hermite features of the epoch's pixels (each of norm <= 1, Mehler's formula) ⊗ onehot(y); pixels drawn without "
    "the data; the mean divides it by n, taken as public (the reference: replace-one, 2/n)"
)
