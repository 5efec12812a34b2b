"""What dpdm and ddpm share, and DP-SAD builds on: DiffusionConfig (network, parameterization, sampler), the
sampler presets of DPDM's tuned rows, and ConditionalDenoiser (training draws, losses and sampling for "eps", or
through bench.diffusion.edm for the σ-space "edm" and "v" parameterizations)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from bench.config import SIGNED, at_least, choice, fraction, positive
from bench.contract import device_generator
from bench.diffusion.ddpm import (
    Schedule,
    check_resolution,
    denoising_loss,
    draw_noise_multiplicity,
    make_unet,
    multiplicity_loss,
    sample_images,
)
from bench.diffusion.edm import (
    PARAMETERIZATIONS,
    SIGMA_DATA,
    SIGMA_SAMPLERS,
    NoiseLevels,
    Preconditioning,
    SamplerSettings,
    drop_labels,
    guided,
)
from bench.diffusion.edm import loss as edm_loss
from bench.diffusion.edm import multiplicity_loss as edm_multiplicity_loss
from bench.diffusion.edm import sample as sample_sigma
from bench.diffusion.ema import EMA
from bench.errors import BenchError
from bench.nets import BuiltOnce
from bench.pixels import to_model_range, to_uint8

if TYPE_CHECKING:
    from bench.contract import DataSpec


@dataclass(frozen=True, kw_only=True)
class SigmaSpaceFields:
    """The σ-space fields every EDM/V diffusion config shares (dpdm, ddpm, DP-SAD's edm denoiser), with DPDM's
    reference values (nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3: configs/fmnist_28/*.yaml): training
    noise levels, preconditioning, classifier-free guidance and the σ-space samplers. A subclass has `sampler` and
    `sample_steps` fields and calls `check_sigma_space(parameterization)` from its __post_init__."""

    sigma_data: float = SIGMA_DATA  # edm: σ_d (DPDM: √(1/3))
    p_mean: float = field(default=-1.2, metadata=SIGNED)  # edm: ln σ ~ N(p_mean, p_std²) in training
    p_std: float = 1.2
    logsnr_min: float = field(default=-9.0, metadata=SIGNED)  # v: training log-SNR range
    logsnr_max: float = field(default=13.0, metadata=SIGNED)
    label_dropout: float = 0.1  # P(label -> "no label") in training, for classifier-free guidance
    guidance: float = 0.0  # classifier-free guidance weight w at sampling (reference configs: 0)
    sigma_min: float = 0.002  # edm/v sampler: σ levels (Karras et al.'s ρ-schedule)
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0  # edm-stochastic: noise added back per step (γ = min(s_churn / steps, 1))
    s_min: float = 0.0  # ... on levels σ in [s_min, s_max]
    s_max: float | None = None  # None: no upper limit
    s_noise: float = 1.0

    def check_sigma_space(self, parameterization: str) -> None:
        at_least(self, 0, "s_min", "s_churn", "s_noise")  # checked whatever the denoiser: a typo never waits
        positive(self, "sigma_min", "sigma_max", "rho")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.guidance > 0 and self.label_dropout == 0:
            raise ValueError("guidance > 0 needs label_dropout > 0 (the unconditional model is never trained)")
        Preconditioning("edm" if parameterization == "eps" else parameterization, self.sigma_data)
        NoiseLevels("edm", self.p_mean, self.p_std, self.logsnr_min, self.logsnr_max)
        samplers = ("ddim", "ddpm") if parameterization == "eps" else SIGMA_SAMPLERS
        sampler = self.sampler  # type: ignore[attr-defined]
        if sampler not in samplers:
            raise ValueError(
                f"sampler {sampler!r} does not fit parameterization {parameterization!r}; "
                f"choose one of {', '.join(samplers)}"
            )
        if parameterization != "eps":
            self.sampler_settings()

    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(
            sampler=self.sampler, steps=self.sample_steps, sigma_min=self.sigma_min,  # type: ignore[attr-defined]
            sigma_max=self.sigma_max, rho=self.rho, s_churn=self.s_churn, s_min=self.s_min,
            s_max=math.inf if self.s_max is None else self.s_max, s_noise=self.s_noise,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(SigmaSpaceFields):
    """The diffusion fields DPDM and its non-private twin `ddpm` share, defaulting to DPDM's reference configs
    (nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:configs/{mnist,fmnist}_28/train_eps_{1.0,10.0}.yaml
    and sample_eps_*.yaml; ε = 0.2 uses parameterization "v"): network, parameterization, label dropout,
    guidance, sampler and EMA. See bench.diffusion.edm for the formulas and bench.nets.ncsnpp for the network."""

    network: Literal["ncsnpp", "unet"] = "ncsnpp"  # DPDM's NCSN++/DDPM++ network, or our small DDPM UNet
    base_channels: int = 32  # width at full resolution (NCSN++ nf)
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (28 -> 14 -> 7)
    num_res_blocks: int = 2  # residual blocks per level
    attention_resolutions: tuple[int, ...] = (7,)  # ncsnpp: self-attention at these feature-map sides
    dropout: float = 0.0
    groups: int = 8  # unet only: GroupNorm groups (ncsnpp uses min(channels // 4, 32), as the reference)
    parameterization: Literal["edm", "v", "eps"] = "edm"  # Karras et al.; v: DPDM's ε = 0.2 configs; eps: DDPM
    T: int = 1000  # eps: diffusion steps, linear β schedule
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: Literal["ddim", "ddpm", "edm-heun", "edm-stochastic"] = "ddim"  # eps: ddim, ddpm; else not ddpm
    sample_steps: int = 50  # noise levels (edm/v) or DDIM steps (eps)
    sampler_preset: Literal["", "fid", "acc"] = ""  # the paper's tuned sampler of its (FID) / (Acc) rows
    ema_decay: float = 0.999  # EMA of the iterates (reference 0.999), the released model
    ema_warmup: bool = True  # the reference's min(decay, (1 + n)/(10 + n)) for update n

    def __post_init__(self) -> None:
        at_least(self, 1, "base_channels", "num_res_blocks", "groups", "sample_steps")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty list of integers ≥ 1, got {list(self.channel_mults)}")
        fraction(self, "ema_decay")
        choice("network", self.network, ("ncsnpp", "unet"))
        choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        choice("sampler_preset", self.sampler_preset, ("", "fid", "acc"))
        self.check_sigma_space(self.parameterization)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        Schedule(self.T, self.beta_start, self.beta_end)  # validates T and β
        if self.parameterization == "eps" and not 1 <= self.sample_steps <= self.T:
            raise ValueError(f"sample_steps must be in 1..T = {self.T}, got {self.sample_steps}")

    @classmethod
    def preset_fields(cls, preset: str, dataset: str, epsilon: float) -> dict[str, Any]:
        """bench.config.resolve's hook: the fields `sampler_preset` sets for this run's (dataset, ε)."""
        return sampler_preset_fields(preset, dataset, epsilon)


# The DPDM paper's two tuned samplers per cell, behind its Table 1 rows "DPDM (FID)" and "DPDM (Acc)" (paper:
# Sec. 5.1, "the two settings (FID) and (Acc) are based on the same DM, differing only in sampler setting", its
# Tables 13-14, which we could not read). Values: 2019ChenGong/DPImageBench@565f8d7e2e0d2faaec43108971db3269519579af:
# configs/DPDM/{mnist,fmnist}_28_eps{1.0,10.0}.yaml (sampler_fid, sampler_acc), a secondary source; its MNIST ε = 1
# FID setting equals the one the authors print in nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3:README.md.
# All: the EDM stochastic ("Churn") sampler, 1000 levels, S_max 50, S_noise 1, σ 0.002..80, ρ 7. No source gives
# the ε = 0.2 settings: those presets are refused.
_CHURN = {"sampler": "edm-stochastic", "sample_steps": 1000, "s_max": 50.0, "s_noise": 1.0}
SAMPLER_PRESETS: dict[tuple[str, float, str], dict[str, Any]] = {
    ("mnist", 1.0, "fid"): _CHURN | {"s_churn": 100.0, "s_min": 0.05, "guidance": 0.0},
    ("mnist", 1.0, "acc"): _CHURN | {"s_churn": 10.0, "s_min": 0.1, "guidance": 0.0},
    ("mnist", 10.0, "fid"): _CHURN | {"s_churn": 50.0, "s_min": 0.05, "guidance": 0.25},
    ("mnist", 10.0, "acc"): _CHURN | {"s_churn": 10.0, "s_min": 0.025, "guidance": 0.0},
    ("fmnist", 1.0, "fid"): _CHURN | {"s_churn": 50.0, "s_min": 0.025, "guidance": 1.0},
    ("fmnist", 1.0, "acc"): _CHURN | {"s_churn": 10.0, "s_min": 0.025, "guidance": 0.0},
    ("fmnist", 10.0, "fid"): _CHURN | {"s_churn": 50.0, "s_min": 0.025, "guidance": 1.0},
    ("fmnist", 10.0, "acc"): _CHURN | {"s_churn": 10.0, "s_min": 0.025, "guidance": 0.0},
}


def sampler_preset_fields(preset: str, dataset: str, epsilon: float) -> dict[str, Any]:
    """The fields a `sampler_preset` sets for (dataset, ε); a one-line error where no source gives them."""
    if preset not in ("fid", "acc"):
        raise BenchError(f"sampler_preset must be 'fid' or 'acc', got {preset!r}")
    try:
        return dict(SAMPLER_PRESETS[(dataset, float(epsilon), preset)])
    except KeyError:
        have = sorted({f"{d} ε={e:g}" for d, e, _ in SAMPLER_PRESETS})
        raise BenchError(
            f"no published '{preset}' sampler preset for {dataset} at ε={epsilon:g} (known: {', '.join(have)})"
        ) from None


def make_network(config: Any, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The denoiser network a DiffusionConfig names (our UNet for configs without a `network` field)."""
    if getattr(config, "network", "unet") == "unet":
        return make_unet(config, channels=channels, num_classes=num_classes)
    from bench.nets.ncsnpp import NCSNpp, NCSNppConfig

    return NCSNpp(
        NCSNppConfig(
            in_channels=channels, image_size=image_size, nf=config.base_channels, ch_mult=tuple(config.channel_mults),
            num_res_blocks=config.num_res_blocks, attention_resolutions=tuple(config.attention_resolutions),
            dropout=config.dropout, num_classes=num_classes,
        )
    )  # fmt: skip


class ConditionalDenoiser(BuiltOnce):
    """What every class-conditional diffusion method shares: its network + EMA, its training draws and loss,
    sampling, saving.

    A subclass defines `name`, `Config` (the UNet, schedule, EMA and sampler fields, or a DiffusionConfig) and
    `fit`; `fit` calls `self._build()` under `bench.nets.seeded_init(generator)` so that initial weights follow
    the run's seed. The released model is the EMA network. A config without a `parameterization` field is
    DDPM's ε-prediction on our UNet (DP-SAD's).
    """

    name: ClassVar[str]
    config: Any

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None:
        try:
            check_resolution(spec.height, spec.width, tuple(config.channel_mults))
        except ValueError as e:
            raise BenchError(f"{self.name}: {e}") from None
        self.config, self.spec, self.device = config, spec, device
        self.parameterization: str = getattr(config, "parameterization", "eps")
        self.schedule = Schedule(config.T, config.beta_start, config.beta_end)
        self.alpha_bar = self.schedule.alpha_bar(device)
        if self.parameterization != "eps":
            self.pre = Preconditioning(self.parameterization, config.sigma_data)
            self.levels = NoiseLevels(
                self.parameterization, config.p_mean, config.p_std, config.logsnr_min, config.logsnr_max
            )
        try:
            self.check_networks()  # built for real once: in fit, under the run's seed (bench.nets.BuiltOnce)
        except ValueError as e:  # a network that does not fit the data's shape: the user's settings, one line
            shape = f"{spec.channels}×{spec.height}×{spec.width}"
            raise BenchError(
                f"{self.name}: {e}; on {shape} images set the network's fields for this dataset in the profile "
                f"([{self.name}.<dataset>]) or with --set {self.name}.<field>=..."
            ) from None

    def _build(self) -> None:
        spec, cfg = self.spec, self.config
        self.net = make_network(cfg, channels=spec.channels, image_size=spec.height, num_classes=spec.num_classes)
        self.net = self.net.to(self.device)
        self.ema = EMA(self.net, cfg.ema_decay, warmup=getattr(cfg, "ema_warmup", False))

    # ------------------------------------------------------------------------------------- training

    def training_draws(self, y: Tensor, K: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The random inputs of one training step, drawn outside the loss from `generator`: labels after
        label dropout [B], noise levels [B, K] (timesteps for eps, σ otherwise) and noise [B, K, C, H, W]."""
        B, shape = y.shape[0], (self.spec.channels, self.spec.height, self.spec.width)
        g, dev = generator.device, self.device  # drawn where the generator lives, then moved
        y = drop_labels(y, getattr(self.config, "label_dropout", 0.0), self.spec.num_classes, generator)
        if self.parameterization == "eps":
            t, noise = draw_noise_multiplicity(B, K, shape, self.config.T, generator, g)
            return y, t.to(dev), noise.to(dev)
        sigma = self.levels.draw((B, K), generator, g)
        return y, sigma.to(dev), torch.randn((B, K, *shape), generator=generator, device=g).to(dev)

    def example_loss(self, model: Any, x0: Tensor, y: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        """ONE example's loss over its K draws (DP-SGD's per-example loss): x0 [C, H, W], level [K]."""
        if self.parameterization == "eps":
            return multiplicity_loss(model, x0, y, level, noise, self.alpha_bar)
        return edm_multiplicity_loss(self.pre, model, x0, y, level, noise)

    def batch_loss(self, model: Any, x0: Tensor, y: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        """The mean loss of a batch (non-private training): x0 [B, C, H, W], level [B, K], noise [B, K, C, H, W]."""
        if self.parameterization == "eps":
            return denoising_loss(model, x0, y, level, noise, self.alpha_bar)
        return edm_loss(self.pre, model, x0, y, level, noise)

    # ------------------------------------------------------------------------------------- sampling

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] from the EMA network, conditioned on int64 `labels` [n]."""
        if labels is None and getattr(self, "conditional", True):
            raise BenchError(f"{self.name} is class-conditional: sample() needs labels")
        return self.sample_net(self.ema.model, n, labels=labels, generator=generator)

    def sample_net(
        self, net: nn.Module, n: int, *, labels: Tensor | None, generator: torch.Generator,
        sampler: str | None = None, steps: int | None = None,
    ) -> Tensor:  # fmt: skip
        """uint8 [n, C, H, W] from `net` (a network of this method's parameterization) with the config's sampler
        (or `sampler` and `steps` instead) and guidance; `labels` int64 [n], or None for an unconditional network."""
        cfg, shape = self.config, (self.spec.channels, self.spec.height, self.spec.width)
        weight, classes = getattr(cfg, "guidance", 0.0), self.spec.num_classes
        sampler, steps = sampler or cfg.sampler, steps or cfg.sample_steps
        if self.parameterization == "eps":
            return sample_images(
                guided(net, weight, classes), n, shape=shape, labels=labels, schedule=self.schedule,
                sampler=sampler, steps=steps, generator=generator, device=self.device,
            )  # fmt: skip
        settings = dataclasses.replace(cfg.sampler_settings(), sampler=sampler, steps=steps)
        denoiser = guided(lambda x, s, y: self.pre.denoise(net, x, s, y), weight, classes)
        gen = device_generator(generator, self.device)
        out = [torch.zeros((0, *shape), dtype=torch.uint8)]
        for start in range(0, n, 500):
            m = min(500, n - start)
            y = labels[start : start + m].to(self.device) if labels is not None else None
            x = sample_sigma(denoiser, (m, *shape), y, settings, gen, self.device)
            out.append(to_uint8(x).cpu())
        return torch.cat(out)

    def membership_scores(self, images: Tensor, labels: Tensor, *, generator: torch.Generator) -> Tensor:
        """The contract's optional audit member (bench.audit's white-box score): minus the released (EMA)
        network's denoising loss of each image at its label, over one draw of K = 8 noise levels and noises from
        `generator` shared by every image (so scores differ by the images only). Higher = more likely trained on."""
        model = self.released_model()
        was_training = model.training
        model.eval()
        _, level, noise = self.training_draws(torch.zeros(1, dtype=torch.long), 8, generator)
        x0 = to_model_range(images).to(self.device)
        y = labels.to(self.device)
        with torch.no_grad():
            losses = torch.stack([self.example_loss(model, x0[i], y[i], level[0], noise[0]) for i in range(len(x0))])
        model.train(was_training)
        return -losses

    def released_model(self) -> nn.Module:
        """The network that is released (its parameter count is a cost figure)."""
        return self.ema.model

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "ema": self.ema.model.state_dict(), "ema_updates": self.ema.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = int(state.get("ema_updates", 0))
