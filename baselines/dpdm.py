"""DPDM: DP-SGD diffusion (Dockhorn, Cao, Vahdat, Kreis, "Differentially Private Diffusion Models", TMLR 2023).

Reproduces nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3: runners/train_dpdm_base.py (the training
loop), configs/{mnist,fmnist}_28/train_eps_{0.2,1.0,10.0}.yaml (the settings, our defaults and the paper profile),
denoiser.py, score_losses.py and samplers.py (bench.diffusion.edm), model/ncsnpp.py (bench.nets.ncsnpp), model/ema.py
(bench.diffusion.EMA with warm-up).

A class-conditional denoiser D(x; σ, y) with EDM preconditioning (σ_d = √(1/3); "v" for the ε = 0.2 configs, "eps"
for DDPM's ε-prediction, kept for ablation) on the NCSN++ network (attention at 7×7), trained with DP-SGD:
Poisson sampling at q = B/N (B = 4096), per-example clipping at C = 1 of the loss averaged over K = 32 draws of
(σ, noise) (noise multiplicity: K costs no privacy, the average comes before clipping), Gaussian noise σ·C on
the sum, Adam 3e-4, 300 epochs. Labels are dropped to the "no label" class with probability 0.1 for
classifier-free guidance. The released model is the EMA (0.999, with the reference's warm-up) of the DP
iterates: post-processing. σ is calibrated so that the ledger meets the budget. Samplers: the reference's
σ-space DDIM (Euler, 50 levels, ρ = 7; its sample configs), edm-heun and edm-stochastic ("Churn"); the paper's
per-cell tuned samplers behind its "(FID)" and "(Acc)" rows are `sampler_preset = "fid" | "acc"`
(bench.diffusion.SAMPLER_PRESETS, with their source).

Deviations from the reference, recorded here and in every run's config:
- DP-SGD is ours (bench.privacy.dpsgd), not the reference's opacus fork (make_private_with_epsilon with Poisson
  sampling): the same mechanism (Poisson batches, steps = round(epochs / q), noise on the clipped sum divided by
  the expected batch size); σ is calibrated by the harness's accountant (RDP by default), not opacus's.
- The reference's ε = 0.2 configs say `epsilon: 10.`; a slip (their file names and the paper say 0.2): we use the
  run's ε.
- The random draws (σ, noise, label dropout) come from the run's generator outside the per-example loss.
- The reference's opacus skips the EMA update on steps it skips; ours never skips a step (an empty Poisson batch
  is still a noisy step), so the EMA is updated after every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from bench.config import choice
from bench.contract import ImageDataset, Progress
from bench.diffusion import ConditionalDenoiser, DiffusionConfig
from bench.nets import seeded_init
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger
from bench.privacy.dpsgd import MODES, poisson_stream
from bench.privacy.setup import make_dpsgd, poisson_rate, steps_for
from bench.training import FitState, dp_steps, ledger_of


@dataclass(frozen=True, kw_only=True)
class Config(DiffusionConfig):
    batch_size: int = 4096  # expected batch size q·N under Poisson sampling (reference: 4096)
    epochs: float = 300.0  # steps = round(epochs / q) (reference: 300)
    lr: float = 3e-4  # Adam, no weight decay (reference: 3e-4)
    max_grad_norm: float = 1.0  # clipping bound C (reference: 1)
    noise_multiplicity: int = 32  # K draws of (σ, noise) per example, averaged before clipping (reference: 32)
    dp_mode: str = "auto"  # per-example gradient implementation (bench.privacy.dpsgd)
    physical_batch_size: int = 512  # examples per chunk of a logical batch (memory only; same step)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward/backward; auto: bf16 on CUDA, fp32 elsewhere

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("dp_mode", self.dp_mode, MODES)
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


class DPDM(ConditionalDenoiser):
    name: ClassVar[str] = "dpdm"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        cfg = config
        return {"dp steps": steps_for(cfg.epochs, poisson_rate("dpdm: batch_size", cfg.batch_size, num_records))}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        cuda = self.device.type == "cuda"
        self.precision = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else "fp32"
        x_all = to_model_range(train.images).to(self.device)
        if cuda:  # convolutions in channels-last with cuDNN's autotuner (the same step, faster)
            torch.backends.cudnn.benchmark = True
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            x_all = x_all.contiguous(memory_format=torch.channels_last)
        y_all = train.labels.to(self.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        private = make_dpsgd(
            self.net, optimizer, name="dpdm: batch_size", per_example_loss=self.example_loss, budget=budget,
            batch_size=cfg.batch_size, epochs=cfg.epochs, num_records=n, max_grad_norm=cfg.max_grad_norm,
            generator=generator, device=self.device, mode=cfg.dp_mode, max_physical_batch_size=cfg.physical_batch_size,
            autocast_dtype=torch.bfloat16 if self.precision == "bf16" else None,
        )  # fmt: skip
        dp, noise_gen, (q, steps, sigma) = private.engine, private.noise_generator, private.plan.astuple()
        fit = FitState(progress, generator, noise_gen, {"model": self, "optimizer": optimizer, "dpsgd": dp})
        fit.resume()
        fit.start(steps, f"dpdm σ={sigma:.3f}", dp.steps)

        def step(idx: Tensor) -> None:
            y, level, noise = self.training_draws(y_all[idx], cfg.noise_multiplicity, noise_gen)
            dp.step(x_all[idx], y, level, noise)
            self.ema.update(self.net)

        dp_steps(fit, dp, steps, poisson_stream(n, q, generator), self.device, step)
        return ledger_of(dp.stage("denoiser"))
