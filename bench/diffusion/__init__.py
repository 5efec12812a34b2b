"""Diffusion shared by every diffusion method.

    ddpm.py       DDPM's "eps" parameterization (DP-SAD's): schedule, forward process, losses, DDPM/DDIM samplers, UNet
    edm.py        σ-space diffusion as DPDM runs it: EDM preconditioning, noise levels, loss, guidance, samplers
    ema.py        the exponential moving average of the weights (the released network)
    denoiser.py   DiffusionConfig and ConditionalDenoiser: what dpdm, ddpm and DP-SAD's denoisers share

The names methods use are importable from `bench.diffusion` itself; the pixel-range helpers live in bench.pixels.
"""

from __future__ import annotations

from bench.diffusion.ddpm import (
    EpsModel,
    Schedule,
    check_resolution,
    ddim_sample,
    ddpm_sample,
    denoising_loss,
    draw_noise_multiplicity,
    make_unet,
    multiplicity_loss,
    q_sample,
    sample_images,
)
from bench.diffusion.denoiser import (
    SAMPLER_PRESETS,
    ConditionalDenoiser,
    DiffusionConfig,
    SigmaSpaceFields,
    make_network,
    sampler_preset_fields,
)
from bench.diffusion.ema import EMA
from bench.pixels import to_model_range, to_uint8

__all__ = [
    "EMA",
    "SAMPLER_PRESETS",
    "ConditionalDenoiser",
    "DiffusionConfig",
    "EpsModel",
    "Schedule",
    "SigmaSpaceFields",
    "check_resolution",
    "ddim_sample",
    "ddpm_sample",
    "denoising_loss",
    "draw_noise_multiplicity",
    "make_network",
    "make_unet",
    "multiplicity_loss",
    "q_sample",
    "sample_images",
    "sampler_preset_fields",
    "to_model_range",
    "to_uint8",
]
