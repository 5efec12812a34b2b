"""DPDM: DP-SGD diffusion (Dockhorn, Cao, Vahdat, Kreis, "Differentially Private Diffusion Models", TMLR 2023).

A class-conditional DDPM ε-predictor trained with DP-SGD (Poisson sampling, per-example clipping,
Gaussian noise σ·C on the sum) and noise multiplicity K: each example's loss is averaged over K
(timestep, noise) draws before its gradient is clipped, which costs no privacy. The released model is
an EMA of the DP iterates (post-processing). σ is calibrated so that the ledger meets the budget.

Differences from the paper (recorded here, not hidden): a DDPM ε-prediction UNet with a linear β
schedule instead of EDM preconditioning on DDPM++; DDIM or ancestral sampling instead of the EDM
sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from bench.contract import ImageDataset, Progress, device_generator
from bench.diffusion import (
    ConditionalDenoiser,
    Schedule,
    draw_noise_multiplicity,
    multiplicity_loss,
    to_model_range,
)
from bench.dpsgd import DPSGD, poisson_stream
from bench.errors import BenchError
from bench.nets import seeded_init
from bench.privacy import Budget, PrivacyLedger, calibrate_sigma


@dataclass(frozen=True, kw_only=True)
class Config:
    base_channels: int = 32  # UNet width at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (28 -> 14 -> 7)
    num_res_blocks: int = 2  # residual blocks per level
    groups: int = 8  # GroupNorm groups (never BatchNorm under DP-SGD)
    T: int = 1000  # diffusion steps, linear β schedule
    beta_start: float = 1e-4
    beta_end: float = 0.02
    batch_size: int = 4096  # expected batch size q·N under Poisson sampling (paper: 4096)
    epochs: float = 300.0  # steps = round(epochs / q) (paper: 300)
    lr: float = 3e-4  # Adam (paper: 3e-4)
    max_grad_norm: float = 1.0  # clipping bound C (paper: 1)
    noise_multiplicity: int = 32  # K draws of (t, ε) per example, averaged before clipping (paper: 32)
    ema_decay: float = 0.999  # EMA of the DP iterates (paper: 0.999)
    sampler: Literal["ddim", "ddpm"] = "ddim"  # paper: DDIM 50 steps for accuracy
    sample_steps: int = 50  # DDIM steps (ignored by ddpm, which runs all T)
    dp_mode: str = "auto"  # per-example gradient implementation (bench.dpsgd)
    physical_batch_size: int = 512  # examples per chunk of a logical batch (memory only; same step)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be ≥ 1, got {self.physical_batch_size}")
        if self.noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be ≥ 1, got {self.noise_multiplicity}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        Schedule(self.T, self.beta_start, self.beta_end)  # validates T and β


class DPDM(ConditionalDenoiser):
    name: ClassVar[str] = "dpdm"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def _loss(self, model: Any, x0: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return multiplicity_loss(model, x0, y, t, noise, self.alpha_bar)

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        q = cfg.batch_size / n
        if q > 1:
            raise BenchError(f"dpdm: batch_size {cfg.batch_size} exceeds the {n} training records")
        steps = max(1, round(cfg.epochs / q))
        sigma = calibrate_sigma(
            budget.epsilon, sample_rate=q, steps=steps, delta=budget.delta, accountant=budget.accountant
        )
        x_all = to_model_range(train.images).to(self.device)
        y_all = train.labels.to(self.device)
        # Poisson sampling draws from the run's CPU generator; noise is drawn where the parameters live.
        noise_gen = device_generator(generator, self.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        dp = DPSGD(
            self.net,
            optimizer,
            per_example_loss=self._loss,
            noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm,
            sample_rate=q,
            num_records=n,
            generator=noise_gen,
            mode=cfg.dp_mode,
            max_physical_batch_size=cfg.physical_batch_size,
        )
        if (state := progress.resume()) is not None:
            self.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            dp.load_state_dict(state["dpsgd"])
            generator.set_state(state["generator"])
            noise_gen.set_state(state["noise_generator"])
        batches = poisson_stream(n, q, generator)
        progress.start(steps, f"dpdm σ={sigma:.3f}")
        progress.advance(dp.steps)
        shape = (spec := self.spec).channels, spec.height, spec.width
        while dp.steps < steps:
            idx = next(batches).to(self.device)
            t, noise = draw_noise_multiplicity(len(idx), cfg.noise_multiplicity, shape, cfg.T, noise_gen, self.device)
            dp.step(x_all[idx], y_all[idx], t, noise)
            self.ema.update(self.net)
            progress.advance()
            progress.checkpoint(
                lambda: {
                    "model": self.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "dpsgd": dp.state_dict(),
                    "generator": generator.get_state(),
                    "noise_generator": noise_gen.get_state(),
                }
            )
        ledger = PrivacyLedger()
        ledger.add(dp.stage("denoiser"))
        return ledger
