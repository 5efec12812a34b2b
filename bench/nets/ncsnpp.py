"""NCSN++ (Song et al. 2021), the score network of DPDM (Dockhorn et al. 2023), as DPDM configures it.

Ported from nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3 (Apache-2.0, itself from
yang-song/score_sde_pytorch), only the branches DPDM's configs reach:

    model/ncsnpp.py               NCSNpp: resblock_type 'biggan', progressive / progressive_input 'none',
                                  embedding_type 'positional', fir False, nonlinearity 'swish', use_cfg
    model/layerspp.py             ResnetBlockBigGANpp (-> ResBlock), AttnBlockpp (-> AttnBlock)
    model/layers.py               default_init / variance_scaling, ddpm_conv3x3, ddpm_conv1x1, NIN,
                                  get_timestep_embedding
    model/up_or_down_sampling.py  naive_upsample_2d, naive_downsample_2d

The configs: fmnist_28 and mnist_28 set image_size 28, attn_resolutions [7] and keep every other
constructor default (nf 32, ch_mult (1, 2, 2), num_res_blocks 2, dropout 0, skip_rescale, init_scale 0,
label_dim 10 with use_cfg); cifar10_32 sets 3 channels, image_size 32, attn_resolutions [16]; celeba_32
also label_dim 0 (unconditional) and attn_resolutions [8, 16]; celeba_64 also ch_mult (1, 1, 2, 2);
imagenet_32 is celeba_32 with label_dim 1000.
NCSNppConfig covers all of them (`reference_config`).

Same layers, built in the same order (so `parameters()` lists them in the reference's order and, from
the same seed, the same random draws give the same initial weights) and the same initialisation: DDPM's
default_init (variance scaling, fan_avg, uniform; scale 0 means 1e-10) for every conv and Linear weight,
zero biases, PyTorch's default for nn.Embedding. Easy to miss, and kept: NIN's default init_scale is 0.1
(attention q, k, v), the attention output and each block's last conv use init_scale, the residual-block
shortcuts are ddpm_conv1x1 with scale 1. Deviations:

  - NIN (a per-pixel linear map, W [in, out] and bias) is an nn.Conv2d with kernel_size 1, weight
    [out, in, 1, 1] = Wᵀ, so that bench.privacy.dpsgd's folded mode knows every parameter. Its initial weight
    is drawn with the reference's shape (in, out) and transposed; fan_avg is symmetric in the two fans,
    so the scale does not depend on the layout. The conv is built with torch.nn.utils.skip_init: the
    reference's NIN draws nothing but its W, so the random stream stays the same.
  - Where attention goes is decided at construction from image_size, not at run time from the feature
    map's width (`h.shape[-1] in attn_resolutions`); inputs must be image_size × image_size (checked).
    An attention resolution that no level has is refused (the reference ignores it).
  - y None means the "no label" class num_classes (the reference raises; DPDM's classifier-free
    guidance feeds that index itself). With num_classes 0 the network is unconditional and ignores y,
    as the reference with label_dim 0. There is no use_cfg=False: a conditional network always has the
    extra "no label" row (every DPDM config with labels uses use_cfg).
  - Out-of-place `h = h + Dense(...)` instead of `h += ...`; the attention is computed on [B, C, H·W]
    with two matmul-style einsums instead of [B, H, W, H, W] reshapes; naive up/downsampling is
    nearest-neighbour interpolation / 2×2 average pooling. Same functions, up to float rounding.
  - Reference options DPDM does not use are left out: resblock_type 'ddpm', FIR resampling,
    progressive growing, Fourier embeddings, other nonlinearities, num_in_channels != num_out_channels.

Written for per-example gradients: no BatchNorm, no in-place ops on activations, no data-dependent
control flow, each example's output depends on that example only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.nets.unet import count_parameters

__all__ = ["NCSNpp", "NCSNppConfig", "count_parameters", "reference_config"]

_Layer = TypeVar("_Layer", nn.Conv2d, nn.Linear)


@dataclass(frozen=True, kw_only=True)
class NCSNppConfig:
    """DPDM's NCSNpp constructor arguments (defaults: the fmnist_28 / mnist_28 network)."""

    in_channels: int = 1  # num_in_channels = num_out_channels
    image_size: int = 28
    nf: int = 32  # channels at full resolution; the embedding width is nf, the MLP's 4·nf
    ch_mult: tuple[int, ...] = (1, 2, 2)  # one resolution level per entry; each after the first halves H, W
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (7,)  # feature-map sides that get self-attention
    dropout: float = 0.0
    num_classes: int = 10  # label_dim; 0 = unconditional; class index num_classes is the "no label" token
    skip_rescale: bool = True  # residual sums divided by sqrt(2)
    init_scale: float = 0.0  # variance scale of each block's last layer; 0 means 1e-10 (reference)

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "nf", "num_res_blocks"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"NCSNppConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or not all(isinstance(m, int) and m >= 1 for m in self.ch_mult):
            raise ValueError(f"NCSNppConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"NCSNppConfig.image_size {self.image_size} must be divisible by 2**(len(ch_mult)-1) = {factor}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NCSNppConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 0):
            raise ValueError(f"NCSNppConfig.num_classes must be an int >= 0, got {self.num_classes!r}")
        if not self.init_scale >= 0.0:
            raise ValueError(f"NCSNppConfig.init_scale must be >= 0, got {self.init_scale!r}")
        sides = self.resolutions
        for side in self.attention_resolutions:
            if side not in sides:
                raise ValueError(
                    f"NCSNppConfig.attention_resolutions: no level has side {side!r} (the levels have {sides})"
                )
        for ch in sorted(_norm_channels(self.nf, self.ch_mult, self.num_res_blocks)):
            if ch // 4 < 1 or ch % _groups(ch):
                raise ValueError(
                    f"NCSNppConfig: a GroupNorm has {ch} channels, not divisible into min({ch}//4, 32) groups "
                    f"(nf={self.nf}, ch_mult={self.ch_mult}); every channel count must be >= 4 and divisible by it"
                )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The feature-map side of each level: image_size // 2**level."""
        return tuple(self.image_size // 2**level for level in range(len(self.ch_mult)))


def reference_config(name: str) -> NCSNppConfig:
    """The network of DPDM's configs/<name>/train_eps_*.yaml (nv-tlabs/DPDM@29bb94d)."""
    configs = {
        "mnist_28": NCSNppConfig(),
        "fmnist_28": NCSNppConfig(),
        "cifar10_32": NCSNppConfig(in_channels=3, image_size=32, attention_resolutions=(16,)),
        "celeba_32": NCSNppConfig(in_channels=3, image_size=32, attention_resolutions=(8, 16), num_classes=0),
        "imagenet_32": NCSNppConfig(in_channels=3, image_size=32, attention_resolutions=(8, 16), num_classes=1000),
        "celeba_64": NCSNppConfig(
            in_channels=3, image_size=64, ch_mult=(1, 1, 2, 2), attention_resolutions=(8, 16), num_classes=0
        ),
    }
    if name not in configs:
        raise ValueError(f"unknown DPDM config {name!r}; known: {sorted(configs)}")
    return configs[name]


def _groups(channels: int) -> int:
    """GroupNorm groups of the reference: min(channels // 4, 32)."""
    return min(channels // 4, 32)


def _norm_channels(nf: int, ch_mult: Sequence[int], num_res_blocks: int) -> set[int]:
    """Channel counts of every GroupNorm of the network (the input and output of each block)."""
    channels = {nf}
    skips = [nf]
    c = nf
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            c = nf * mult
            channels.add(c)
            skips.append(c)
        if level != len(ch_mult) - 1:
            skips.append(c)
    for mult in reversed(ch_mult):
        for _ in range(num_res_blocks + 1):
            channels.add(c + skips.pop())
            c = nf * mult
            channels.add(c)
    return channels


# ------------------------------------------------------------------------------------ initialisation


def variance_scaling_uniform(shape: Sequence[int], scale: float) -> Tensor:
    """DDPM's default_init (reference model/layers.py: default_init, variance_scaling 'fan_avg', 'uniform').

    Fans of a weight of `shape`: fan_in = shape[1]·r, fan_out = shape[0]·r, r = the product of the other
    axes (the receptive field); U(-a, a) with a = sqrt(3·scale / ((fan_in + fan_out) / 2)). Scale 0 means
    1e-10, as in the reference.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(shape) / shape[0] / shape[1]
    fan_avg = (shape[0] + shape[1]) * receptive / 2
    return (torch.rand(*shape) * 2.0 - 1.0) * math.sqrt(3 * scale / fan_avg)


def _reinit(layer: _Layer, scale: float = 1.0) -> _Layer:
    """Replace a layer's weight by a default_init draw (after PyTorch's own, as the reference) and zero its bias."""
    with torch.no_grad():
        layer.weight.copy_(variance_scaling_uniform(layer.weight.shape, scale))
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def conv3x3(c_in: int, c_out: int, init_scale: float = 1.0) -> nn.Conv2d:
    """Reference ddpm_conv3x3: a padded 3×3 conv with DDPM initialisation."""
    return _reinit(nn.Conv2d(c_in, c_out, 3, padding=1), init_scale)


def conv1x1(c_in: int, c_out: int, init_scale: float = 1.0) -> nn.Conv2d:
    """Reference ddpm_conv1x1: a 1×1 conv with DDPM initialisation."""
    return _reinit(nn.Conv2d(c_in, c_out, 1), init_scale)


def dense(d_in: int, d_out: int) -> nn.Linear:
    """The reference's nn.Linear with default_init weight and zero bias."""
    return _reinit(nn.Linear(d_in, d_out))


def nin(c_in: int, c_out: int, init_scale: float = 0.1) -> nn.Conv2d:
    """Reference NIN (W [in, out], bias; default init_scale 0.1) as the 1×1 conv with weight Wᵀ.

    skip_init: no PyTorch default draw, so the random stream is the reference's (its NIN draws only W).
    """
    # on the default device (skip_init's own default is the CPU): the meta device of a shape check, else the CPU
    conv = torch.nn.utils.skip_init(nn.Conv2d, c_in, c_out, 1, device=torch.empty(0).device)
    with torch.no_grad():
        conv.weight.copy_(variance_scaling_uniform((c_in, c_out), init_scale).t()[:, :, None, None])
        conv.bias.zero_()
    return conv


def timestep_embedding(c_noise: Tensor, dim: int, max_positions: float = 10000.0) -> Tensor:
    """Reference get_timestep_embedding: c_noise [B] -> [B, dim], sin then cos, zero-padded when dim is odd.

    Frequencies exp(-log(max_positions)·i / (half - 1)) for i < half = dim // 2.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=c_noise.device) * -(math.log(max_positions) / (half - 1))
    )
    args = c_noise.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


# ---------------------------------------------------------------------------------------------- blocks


def _residual(x: Tensor, h: Tensor, skip_rescale: bool) -> Tensor:
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


class ResBlock(nn.Module):
    """Reference ResnetBlockBigGANpp (fir False): GroupNorm, SiLU, [resample], conv, + Dense(SiLU(temb)),
    GroupNorm, SiLU, Dropout, conv(init_scale); 1×1 conv shortcut when the channels change or it resamples.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        temb_dim: int,
        *,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.0,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        # attribute names and order as the reference's (GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Dropout_0,
        # Conv_1, Conv_2)
        self.norm0 = nn.GroupNorm(_groups(c_in), c_in, eps=1e-6)
        self.conv0 = conv3x3(c_in, c_out)
        self.dense = dense(temb_dim, c_out)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv3x3(c_out, c_out, init_scale=init_scale)
        self.shortcut = conv1x1(c_in, c_out) if (c_in != c_out or up or down) else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:  # naive_upsample_2d: each pixel repeated 2×2
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:  # naive_downsample_2d: mean of each 2×2 block
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self._resample(F.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h) + self.dense(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return _residual(x, h, self.skip_rescale)


class AttnBlock(nn.Module):
    """Reference AttnBlockpp: self-attention over the H·W positions with 1×1 q, k, v and out projections."""

    def __init__(self, channels: int, *, skip_rescale: bool = True, init_scale: float = 0.0) -> None:
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.q = nin(channels, channels)
        self.k = nin(channels, channels)
        self.v = nin(channels, channels)
        self.out = nin(channels, channels, init_scale=init_scale)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(B, C, H * W) for proj in (self.q, self.k, self.v))
        w = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) * C**-0.5, dim=-1)  # [B, query, key]
        h = torch.einsum("bnm,bcm->bcn", w, v).reshape(B, C, H, W)
        return _residual(x, self.out(h), self.skip_rescale)


class _DownLevel(nn.Module):
    """One level of the down path: residual blocks, each followed by attention where the level has it,
    then a downsampling residual block unless it is the last level. Returns every skip it leaves."""

    def __init__(self, blocks: list[ResBlock], attns: list[AttnBlock | None], downsample: ResBlock | None) -> None:
        super().__init__()
        # registered interleaved (block, its attention, block, ...) as in the reference's module list
        self.stages = nn.ModuleList(m for pair in zip(blocks, attns, strict=True) for m in pair if m is not None)
        self.with_attn = [a is not None for a in attns]
        self.downsample = downsample

    def forward(self, h: Tensor, temb: Tensor) -> list[Tensor]:
        skips = []
        stages = iter(self.stages)
        for with_attn in self.with_attn:
            h = next(stages)(h, temb)
            if with_attn:
                h = next(stages)(h)
            skips.append(h)
        if self.downsample is not None:
            skips.append(self.downsample(h, temb))
        return skips


class _UpLevel(nn.Module):
    """One level of the up path: residual blocks on [h, skip], attention where the level has it, then an
    upsampling residual block unless it is the first level."""

    def __init__(self, blocks: list[ResBlock], attn: AttnBlock | None, upsample: ResBlock | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.upsample = upsample

    def forward(self, h: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        """`skips` in the order the blocks consume them (the most recent first)."""
        for block, skip in zip(self.blocks, skips, strict=True):
            h = block(torch.cat([h, skip], dim=1), temb)
        if self.attn is not None:
            h = self.attn(h)
        if self.upsample is not None:
            h = self.upsample(h, temb)
        return h


# --------------------------------------------------------------------------------------------- network


class NCSNpp(nn.Module):
    """Reference NCSNpp: forward(x [B,C,H,W], c_noise float [B], y int64 [B] or None) -> [B,C,H,W].

    c_noise is the noise conditioning as given (DPDM's EDM denoiser passes log(σ)/4); y None means the
    "no label" class. Parameters are registered in the reference's order: label embedding, the two
    embedding Linears, conv_in, the down path, the middle, the up path, the output norm and conv.
    """

    def __init__(self, config: NCSNppConfig) -> None:
        super().__init__()
        self.config = cfg = config
        nf, temb_dim = cfg.nf, 4 * cfg.nf

        def res(c_in: int, c_out: int | None = None, *, up: bool = False, down: bool = False) -> ResBlock:
            c_out = c_in if c_out is None else c_out
            return ResBlock(
                c_in,
                c_out,
                temb_dim,
                up=up,
                down=down,
                dropout=cfg.dropout,
                skip_rescale=cfg.skip_rescale,
                init_scale=cfg.init_scale,
            )

        def attn(channels: int) -> AttnBlock:
            return AttnBlock(channels, skip_rescale=cfg.skip_rescale, init_scale=cfg.init_scale)

        self.label_embed = nn.Embedding(cfg.num_classes + 1, nf) if cfg.num_classes > 0 else None
        self.temb_in = dense(nf, temb_dim)
        self.temb_out = dense(temb_dim, temb_dim)
        self.conv_in = conv3x3(cfg.in_channels, nf)

        last = len(cfg.ch_mult) - 1
        skips = [nf]
        c = nf
        down = []
        for level, (mult, side) in enumerate(zip(cfg.ch_mult, cfg.resolutions, strict=True)):
            blocks: list[ResBlock] = []
            attns: list[AttnBlock | None] = []
            for _ in range(cfg.num_res_blocks):  # built in the reference's order: block, its attention, ...
                blocks.append(res(c, nf * mult))
                c = nf * mult
                attns.append(attn(c) if side in cfg.attention_resolutions else None)
                skips.append(c)
            downsample = res(c, down=True) if level != last else None
            if downsample is not None:
                skips.append(c)
            down.append(_DownLevel(blocks, attns, downsample))
        self.down = nn.ModuleList(down)

        self.mid_res0 = res(c)
        self.mid_attn = attn(c)
        self.mid_res1 = res(c)

        up = []
        self.skips_per_up_level = []
        for level in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(c + skips.pop(), nf * cfg.ch_mult[level]))
                c = nf * cfg.ch_mult[level]
            level_attn = attn(c) if cfg.resolutions[level] in cfg.attention_resolutions else None
            up.append(_UpLevel(blocks, level_attn, res(c, up=True) if level != 0 else None))
            self.skips_per_up_level.append(len(blocks))
        self.up = nn.ModuleList(up)
        if skips:
            raise RuntimeError(f"NCSNpp skip bookkeeping error: {len(skips)} left")  # pragma: no cover

        self.norm_out = nn.GroupNorm(_groups(c), c, eps=1e-6)
        self.conv_out = conv3x3(c, cfg.in_channels, init_scale=cfg.init_scale)

    def embed(self, c_noise: Tensor, y: Tensor | None) -> Tensor:
        """The conditioning vector [B, 4·nf]: MLP(sinusoidal(c_noise) + label embedding)."""
        temb = timestep_embedding(c_noise, self.config.nf)
        if self.label_embed is not None:
            if y is None:
                y = torch.full_like(c_noise, self.config.num_classes, dtype=torch.long)
            temb = temb + self.label_embed(y)
        return self.temb_out(F.silu(self.temb_in(temb)))

    def forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        size = self.config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"NCSNpp built for {size}x{size} inputs, got {tuple(x.shape)}")
        temb = self.embed(c_noise, y)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            hs.extend(level(hs[-1], temb))
        h = self.mid_res1(self.mid_attn(self.mid_res0(hs[-1], temb)), temb)
        for level, n in zip(self.up, self.skips_per_up_level, strict=True):
            h = level(h, hs[: -n - 1 : -1], temb)  # the last n skips, most recent first
            del hs[-n:]
        return self.conv_out(F.silu(self.norm_out(h)))
