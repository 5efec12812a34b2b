"""The non-private reference: the same class-conditional denoiser as DPDM, trained without DP (ε = ∞).

It is the upper bound every table shows under the DP rows; its card says guarantee "none". Network,
parameterization, label dropout, samplers and EMA are dpdm's (bench.diffusion.DiffusionConfig, reproducing
nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3: model/ncsnpp.py, denoiser.py, score_losses.py,
samplers.py, model/ema.py), so the gap to dpdm is the cost of DP on the same model. The reference has no
non-private runner (runners/train_dpdm_base.py always wraps the model in opacus); ours is that loop without
the privacy engine: shuffled minibatches (every record once per epoch, not Poisson batches), one draw of
(σ, noise) per example, Adam on the mean loss. Deviations: batch size, epochs and learning rate are ours
(profile: 128, 50, 2e-4), not published for a non-private DPDM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.contract import ImageDataset, Progress
from bench.diffusion import ConditionalDenoiser, DiffusionConfig
from bench.nets import seeded_init
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger
from bench.training import FitState, ShuffledEpochs, plain_step, plain_steps


@dataclass(frozen=True, kw_only=True)
class Config(DiffusionConfig):
    batch_size: int = 128  # shuffled minibatches
    epochs: float = 50.0
    lr: float = 2e-4  # Adam

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1 or self.epochs <= 0 or self.lr <= 0:
            raise ValueError(
                f"need batch_size ≥ 1, epochs > 0, lr > 0; got {self.batch_size}, {self.epochs}, {self.lr}"
            )


class DDPM(ConditionalDenoiser):
    name: ClassVar[str] = "ddpm"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "none"
    needs_public_data: ClassVar[bool] = False

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        cfg = config
        return {"steps": ShuffledEpochs(num_records, cfg.batch_size, cfg.epochs).steps}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        epochs = ShuffledEpochs(n, cfg.batch_size, cfg.epochs)
        x_all = to_model_range(train.images).to(self.device)
        y_all = train.labels.to(self.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        # every draw from the run's CPU generator, then moved
        values = {"step": 0, "perm": epochs.first_permutation()}
        fit = FitState(progress, generator, generator, {"model": self, "optimizer": optimizer}, values)
        fit.resume()
        fit.start(epochs.steps, "ddpm (non-private)", fit.values["step"])

        def step(idx: Tensor) -> None:
            y, level, noise = self.training_draws(y_all[idx], 1, generator)  # one draw per example
            plain_step(self.net, optimizer, self.batch_loss(self.net, x_all[idx], y, level, noise), self.ema)

        plain_steps(fit, epochs, self.device, step)
        ledger = PrivacyLedger()
        ledger.mark_non_private("trained on the private training set without DP (non-private reference)")
        return ledger
