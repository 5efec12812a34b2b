"""DP-GAN / DP-CGAN: DP-SGD on the discriminator only (Xie et al. 2018; Torkzadehmahani et al. 2019).

    repeat G times:
        repeat d_steps times:                                     # DP-SGD, Abadi et al. 2016, Alg. 1
            L ~ Poisson sample of the private records, rate q
            for i in L:  fake_i = G(z_i, y_i)  (no gradient: a detached input)
            ḡ_i = clip_C(∇_φ ℓ_D(φ; x_i, y_i, fake_i))            # the WHOLE per-example loss
            φ ← Adam(φ, (Σ_i ḡ_i + N(0, σ²C²I)) / (q·N))
        θ ← Adam(θ, ∇_θ ℓ_G(θ; φ, z, y)),  z ~ N(0, I), y ~ U{classes}   # no real data: post-processing

Privacy. Everything record i contributes to a discriminator step goes through its clipped gradient: the
real term, the fake term (fake_i is generated with y_i's class) and, for WGAN-GP, the gradient penalty
at the interpolate of x_i and fake_i are one per-example loss, clipped once. Each discriminator step is
one Poisson-sampled Gaussian mechanism and is charged once (opacus' DCGAN example charged real and fake
passes separately: opacus issue 418). The generator only reads the discriminator's released
parameters, so it is post-processing. The ledger has one poisson_gaussian stage with the number of
noisy steps actually taken; σ is calibrated so that it meets the budget.

Loss. "ns": non-saturating GAN loss, ℓ_D = softplus(−D(x_i)) + softplus(D(fake_i)), ℓ_G =
softplus(−D(G(z))). "wgan-gp": ℓ_D = D(fake_i) − D(x_i) + λ_gp (‖∇_x̂ D(x̂_i)‖ − 1)², x̂_i = a_i x_i +
(1 − a_i) fake_i, ℓ_G = −D(G(z)); the penalty needs a double backward inside the per-example loss, which
only the "functorch" per-example-gradient mode of bench.privacy.dpsgd can do ("folded" replaces the model's
outputs and cannot differentiate through an input gradient). "ns" runs in the faster "folded" mode.

Provenance: written from the papers (Xie et al. 2018, Alg. 1; Torkzadehmahani et al. 2019 for the conditional
variant), not from a repository, so no repository@commit is cited. Deviations: the whole per-example pair loss is
clipped once (opacus' DCGAN example charged the real and fake passes separately: issue 418), GroupNorm instead of
BatchNorm (docs/privacy.md rule 8), Poisson sampling with the accountant's expected batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.contract import ImageDataset, Progress
from bench.errors import BenchError
from bench.nets import seeded_init
from bench.nets.gan import ConditionalGAN, build_pair, generate
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger
from bench.privacy.dpsgd import MODES, poisson_stream
from bench.privacy.setup import make_dpsgd, poisson_rate, steps_for
from bench.training import FitState, dp_steps, ledger_of


@dataclass(frozen=True, kw_only=True)
class Config:
    width: int = 64  # discriminator channels (c, 2c); the generator mirrors them (2c, c)
    latent_dim: int = 100  # z dimension (DCGAN: 100)
    groups: int = 8  # GroupNorm groups (never BatchNorm under DP-SGD)
    loss: Literal["ns", "wgan-gp"] = "ns"  # non-saturating, or WGAN with gradient penalty
    gp_weight: float = 10.0  # λ_gp of WGAN-GP (Gulrajani et al. 2017: 10)
    batch_size: int = 64  # expected Poisson batch of real records per discriminator step
    epochs: float = 10.0  # discriminator steps ≈ epochs / q, rounded to a multiple of d_steps
    d_steps: int = 5  # discriminator (DP) steps per generator step
    lr_d: float = 2e-4  # Adam, discriminator (DCGAN: 2e-4)
    lr_g: float = 2e-4  # Adam, generator
    beta1: float = 0.5  # Adam β1 (DCGAN: 0.5)
    beta2: float = 0.999  # Adam β2
    generator_batch_size: int = 64  # generated samples per generator step
    max_grad_norm: float = 1.0  # clipping bound C of the discriminator's per-example gradient
    dp_mode: str = "auto"  # per-example gradients (bench.privacy.dpsgd); wgan-gp needs "functorch"
    physical_batch_size: int = 256  # examples per backward (memory only; same step)

    def __post_init__(self) -> None:
        for key in ("width", "latent_dim", "groups", "batch_size", "generator_batch_size", "physical_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.width % self.groups:
            raise ValueError(f"groups {self.groups} must divide width {self.width}")
        if self.d_steps < 1:
            raise ValueError(f"d_steps (discriminator steps per generator step) must be ≥ 1, got {self.d_steps}")
        for key in ("epochs", "lr_d", "lr_g", "max_grad_norm"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.gp_weight < 0:
            raise ValueError(f"gp_weight must be ≥ 0, got {self.gp_weight}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.dp_mode not in MODES:
            raise ValueError(f"dp_mode must be one of {MODES}, got {self.dp_mode!r}")
        if self.loss == "wgan-gp" and self.dp_mode not in ("auto", "functorch"):
            raise ValueError(
                f"loss 'wgan-gp' needs dp_mode 'auto' or 'functorch' (double backward), got {self.dp_mode!r}"
            )


class DPGAN(ConditionalGAN):
    name: ClassVar[str] = "dpgan"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config

    def _build(self) -> None:
        cfg = self.config
        g, d = build_pair(self.spec, latent_dim=cfg.latent_dim, width_c=cfg.width, groups=cfg.groups)
        self.G, self.D = g.to(self.device), d.to(self.device)

    # ------------------------------------------------------------------------------------------ losses

    def _d_loss(self, model: Any, x: Tensor, y: Tensor, fake: Tensor, a: Tensor) -> Tensor:
        """ℓ_D of ONE pair: x, fake [C, H, W] in [−1, 1], y [] int64, a [] interpolation weight -> scalar."""
        logits = model(torch.stack([x, fake]), torch.stack([y, y]))  # rows: real, fake
        if self.config.loss == "ns":
            return F.softplus(-logits[0]) + F.softplus(logits[1])
        x_hat = a * x + (1 - a) * fake
        grad = torch.func.grad(lambda v: model(v.unsqueeze(0), y.unsqueeze(0)).sum())(x_hat)
        penalty = ((grad.pow(2).sum() + 1e-12).sqrt() - 1).pow(2)
        return logits[1] - logits[0] + self.config.gp_weight * penalty

    def _generator_step(self, optimizer: torch.optim.Optimizer, noise_gen: torch.Generator) -> float:
        """One step of the generator against the released discriminator: no real data is read."""
        cfg = self.config
        z = torch.randn(cfg.generator_batch_size, cfg.latent_dim, generator=noise_gen, device=self.device)
        y = torch.randint(
            0, self.spec.num_classes, (cfg.generator_batch_size,), generator=noise_gen, device=self.device
        )
        logits = self.D(self.G(z, y), y)
        loss = F.softplus(-logits).mean() if cfg.loss == "ns" else -logits.mean()
        params = list(self.G.parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):  # D gets no .grad
            p.grad = g
        loss = loss.detach()
        optimizer.step()
        return loss.item()

    # --------------------------------------------------------------------------------------------- fit

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        cfg = config
        q = poisson_rate("dpgan: batch_size", cfg.batch_size, num_records)
        return {"discriminator dp steps": steps_for(cfg.epochs, q, cfg.d_steps)}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        x_all = to_model_range(train.images).to(self.device)  # fixed constants, no data statistics
        y_all = train.labels.to(self.device)
        opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
        opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        private = make_dpsgd(
            self.D, opt_d, name="dpgan: batch_size", per_example_loss=self._d_loss, budget=budget,
            batch_size=cfg.batch_size, epochs=cfg.epochs, num_records=n, max_grad_norm=cfg.max_grad_norm,
            generator=generator, device=self.device, steps_multiple=cfg.d_steps,  # whole generator rounds
            mode="functorch" if cfg.loss == "wgan-gp" else cfg.dp_mode, max_physical_batch_size=cfg.physical_batch_size,
        )  # fmt: skip
        dp, noise_gen, (q, steps, sigma) = private.engine, private.noise_generator, private.plan.astuple()
        parts = {"model": self, "opt_d": opt_d, "opt_g": opt_g, "dpsgd": dp}
        fit = FitState(progress, generator, noise_gen, parts)
        fit.resume()
        fit.start(steps, f"dpgan σ={sigma:.3f}", dp.steps)

        def step(idx: Tensor) -> None:
            B, y = len(idx), y_all[idx]
            with torch.no_grad():  # fakes are detached inputs of the per-example loss
                z = torch.randn(B, cfg.latent_dim, generator=noise_gen, device=self.device)
                fake = self.G(z, y)
            a = torch.rand(B, generator=noise_gen, device=self.device)
            dp.step(x_all[idx], y, fake, a)
            if dp.steps % cfg.d_steps == 0:
                self._generator_step(opt_g, noise_gen)

        dp_steps(fit, dp, steps, poisson_stream(n, q, generator), self.device, step)
        return ledger_of(dp.stage("discriminator"))

    # ------------------------------------------------------------------------------------------ sample

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] from the generator, conditioned on int64 `labels` [n]."""
        if labels is None:
            raise BenchError(f"{self.name} is class-conditional: sample() needs labels")
        return generate(self.G.eval(), n, labels, generator=generator, device=self.device)

    def released_model(self) -> torch.nn.Module:
        return self.G

    def state_dict(self) -> dict[str, Any]:
        """Generator and discriminator (both DP: the discriminator by DP-SGD, the generator by post-processing)."""
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
