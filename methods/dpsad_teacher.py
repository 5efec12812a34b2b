"""DP-SAD's non-private teacher (Liu, Wang, Ge, ECCV 2024), as a stage every `dpsad` cell shares and as a reference
row of its own (`dpsad-teacher`, guarantee "none"): the ceiling the DP student distils from.

The teacher is a class-conditional denoiser trained on the private training set WITHOUT DP (so `dpsad`'s guarantee
is "partial"), with shuffled minibatches, one draw of (noise level, noise) per example and Adam on the mean loss,
as the non-private reference `ddpm`. Two denoisers (field `denoiser`):

- "ddpm": the paper's DDPM ε-prediction (linear β, T = 500) on our UNet; the paper profile keeps it.
- "edm": DPDM's σ-space denoiser, the same as `dpdm`'s (bench.diffusion.edm: EDM preconditioning, ln σ ~ N(p_mean,
  p_std²), the EDM-weighted loss, label dropout for classifier-free guidance) on its NCSN++ network
  (bench.nets.ncsnpp), sampled with dpdm's σ-space samplers. Not the paper's (a deviation, recorded in every run's
  config through this field): the DDPM path does not learn within a CPU budget, and on dpdm's denoiser `dpsad` and
  `dpdm` differ only in how the released network is trained.

Trained once per (dataset, training fields, seed, code version) and stored in the results folder
(`shared/dpsad-teacher-*`, see bench.grid.shared): every `dpsad` cell at every ε and every value of a student field
reuses it, and the `dpsad-teacher` row scores its samples. Its random draws come from a generator of its own, seeded
from the run's seed (`teacher_seed`), so a student does not depend on whether its teacher was trained or reused.
No public code of DP-SAD exists, so no repository is cited; the σ-space parts reproduce
nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3 as bench.diffusion.edm says.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from bench.config import at_least, choice, fraction
from bench.contract import ImageDataset, Progress, shared_stage
from bench.diffusion import ConditionalDenoiser, Schedule, SigmaSpaceFields
from bench.nets import seeded_init
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger
from bench.training import FitState, ShuffledEpochs, plain_step, plain_steps

TEACHER_VERSION = 1  # bump when a change alters a trained teacher: a new shared key, so old teachers are not reused
TEACHER_NOT_DP = "teacher trained on the private training set without DP; its output enters every student loss term"
DENOISERS = ("ddpm", "edm")
_EPS_SAMPLERS, _SIGMA_SAMPLERS = ("ddpm", "ddim"), ("ddim", "edm-heun", "edm-stochastic")


@dataclass(frozen=True, kw_only=True)
class DenoiserFields(SigmaSpaceFields):
    """What DP-SAD's teacher and student share: the denoiser, its diffusion and its sampler (student and teacher
    are "the same kind of network")."""

    denoiser: Literal["ddpm", "edm"] = "ddpm"  # the paper's DDPM ε-prediction, or dpdm's σ-space denoiser (docstring)
    groups: int = 8  # UNet (ddpm) and discriminator GroupNorm groups (NCSN++ uses min(channels // 4, 32))
    dropout: float = 0.0  # NCSN++ dropout (edm)
    T: int = 500  # ddpm: diffusion steps, linear β schedule (paper: 500)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    label_dropout: float = 0.0  # P(label -> "no label") in training (paper: none; dpdm: 0.1), for guidance
    ema_warmup: bool = False  # EMA decay min(decay, (1 + n)/(10 + n)) for update n (dpdm's; paper: unknown)
    sampler: Literal["ddpm", "ddim", "edm-heun", "edm-stochastic"] = "ddpm"  # ddpm: ddpm (paper), ddim; edm: σ-space
    sample_steps: int = 50  # DDIM steps (ddpm denoiser) or noise levels (edm)

    @property
    def parameterization(self) -> str:
        """bench.diffusion's name of the denoiser: "eps" (DDPM ε-prediction) or "edm"."""
        return "edm" if self.denoiser == "edm" else "eps"

    @property
    def network(self) -> str:
        """The network kind: our UNet for the paper's DDPM, dpdm's NCSN++ for edm."""
        return "ncsnpp" if self.denoiser == "edm" else "unet"

    def check_denoiser(self) -> None:
        choice("denoiser", self.denoiser, DENOISERS)
        at_least(self, 1, "groups", "sample_steps")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        Schedule(self.T, self.beta_start, self.beta_end)  # validates T ≥ 2 and β
        if self.denoiser == "ddpm" and self.sampler not in _EPS_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} does not fit denoiser 'ddpm'; choose one of ddpm, ddim")
        if self.denoiser == "edm" and self.sampler not in _SIGMA_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} does not fit denoiser 'edm'; choose one of ddim, edm-heun, "
                             "edm-stochastic")  # fmt: skip
        if self.denoiser == "ddpm" and not 1 <= self.sample_steps <= self.T:
            raise ValueError(f"sample_steps must be in 1..T = {self.T}, got {self.sample_steps}")
        self.check_sigma_space(self.parameterization)


def check_net(config: Any, prefix: str = "") -> None:
    """The network fields (`prefix` "" or "teacher_"): widths ≥ 1, a non-empty list of level multipliers."""
    at_least(config, 1, f"{prefix}base_channels", f"{prefix}num_res_blocks")
    mults = getattr(config, f"{prefix}channel_mults")
    if not mults or min(mults) < 1:
        raise ValueError(f"{prefix}channel_mults must be a non-empty list of integers ≥ 1, got {list(mults)}")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(DenoiserFields):
    """The teacher alone: the config of the `dpsad-teacher` row, derived from a `dpsad` config (`teacher_config`)."""

    base_channels: int = 32  # teacher width (paper: unknown; DPDM's FMNIST net has nf = 32)
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (28 -> 14 -> 7)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)  # edm: NCSN++ self-attention at these feature-map sides
    batch_size: int = 128  # shuffled minibatches (the non-private reference's setting)
    epochs: float = 50.0  # passes over the private data
    lr: float = 2e-4  # Adam
    ema_decay: float = 0.999  # EMA of the teacher's iterates; the EMA network is the teacher

    def __post_init__(self) -> None:
        self.check_denoiser()
        check_net(self)
        at_least(self, 1, "batch_size")
        for key in ("epochs", "lr"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)}")
        fraction(self, "ema_decay")

    def training_fields(self) -> dict[str, Any]:
        """The fields that determine the trained teacher (its shared key): all but the sampler's."""
        sampling = {"sampler", "sample_steps", "guidance", "sigma_min", "sigma_max", "rho", "s_churn", "s_min",
                    "s_max", "s_noise"}  # fmt: skip
        return {k: v for k, v in _jsonable(self).items() if k not in sampling}


# The teacher's own fields (a dpsad config has them as teacher_<name>) and the dpsad fields that determine it
_SHARED = frozenset(f.name for f in dataclasses.fields(DenoiserFields))
TEACHER_OWN = tuple(f.name for f in dataclasses.fields(TeacherConfig) if f.name not in _SHARED)
TEACHER_FIELDS = _SHARED | {f"teacher_{n}" for n in TEACHER_OWN}


def _jsonable(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def teacher_seed(seed: int) -> int:
    """The teacher's own seed, derived from the run's: its draws are independent of the student's stream."""
    return (seed * 1_000_003 + 0x7EAC4E5) % 2**63


class DPSADTeacher(ConditionalDenoiser):
    """The non-private teacher as a method: `fit` trains it (or reuses the shared one), `sample` draws from its EMA."""

    name: ClassVar[str] = "dpsad-teacher"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = TeacherConfig
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "none"
    needs_public_data: ClassVar[bool] = False

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"teacher steps": ShuffledEpochs(num_records, config.batch_size, config.epochs).steps}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        if getattr(progress, "shared", None) is not None:  # the harness: the stage every dpsad cell of the seed uses
            self.fit_shared(train, generator.initial_seed(), progress)
        else:  # library use: trained here, resumable through `progress` like any fit
            self.load_state_dict(self.train_teacher(train, teacher_seed(generator.initial_seed()), progress))
        ledger = PrivacyLedger()
        ledger.mark_non_private("trained on the private training set without DP (DP-SAD's teacher: a reference row)")
        return ledger

    def fit_shared(self, train: ImageDataset, seed: int, progress: Progress) -> None:
        """The teacher of run seed `seed`: trained once and shared through the harness (bench.grid.shared), or trained
        here when the Progress offers no sharing (library use)."""
        ident = {"teacher": self.config.training_fields(), "seed": teacher_seed(seed), "version": TEACHER_VERSION}
        state = shared_stage(progress, self.name, ident, lambda p: self.train_teacher(train, teacher_seed(seed), p))
        self.load_state_dict(state)

    def train_teacher(self, train: ImageDataset, seed: int, progress: Progress) -> dict[str, Any]:
        """Train without DP from `seed` (resumable through `progress`); returns the state to share (on the CPU)."""
        cfg, n = self.config, len(train)
        generator = torch.Generator().manual_seed(seed)
        with seeded_init(generator):
            self._build()
        epochs = ShuffledEpochs(n, cfg.batch_size, cfg.epochs)
        x_all, y_all = to_model_range(train.images).to(self.device), train.labels.to(self.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        values: dict[str, Any] = {"step": 0, "perm": epochs.first_permutation()}
        fit = FitState(progress, generator, generator, {"model": self, "optimizer": optimizer}, values)
        fit.resume()
        fit.start(epochs.steps, f"{self.name} (non-private, shared by the dpsad cells of a seed)", fit.values["step"])

        def step(idx: Tensor) -> None:
            y, level, noise = self.training_draws(y_all[idx], 1, generator)  # one draw per example, as ddpm
            plain_step(self.net, optimizer, self.batch_loss(self.net, x_all[idx], y, level, noise), self.ema)

        plain_steps(fit, epochs, self.device, step)
        return _cpu_state(self.state_dict())


def _cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    """The method's state with its module states copied to the CPU (what the shared store keeps)."""
    return {
        k: {n: t.detach().cpu() for n, t in v.items()} if isinstance(v, dict) else v for k, v in state.items()
    }  # fmt: skip
