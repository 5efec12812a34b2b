"""A small class-conditional UNet noise predictor (DDPM, Ho et al. 2020), GroupNorm throughout.

Written for per-example gradients: no BatchNorm, no in-place ops on activations, no data-dependent
control flow, so it works under torch.func.vmap as well as with opacus hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    in_channels: int = 1
    base_channels: int = 32  # channels at full resolution
    channel_mults: tuple[int, ...] = (
        1,
        2,
    )  # one resolution level per entry; each after the first halves H, W
    num_res_blocks: int = 1  # residual blocks per level
    groups: int = 8  # GroupNorm groups (must divide every channel count)
    num_classes: int = 10  # 0 = unconditional; class index num_classes is the "no label" token
    dropout: float = 0.0


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """ε-prediction network: forward(x float [B,C,H,W] in [-1,1], t [B] timesteps, y int64 [B]) -> [B,C,H,W].

    H and W must be divisible by 2 ** (len(channel_mults) - 1).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, g = config.base_channels, config.groups
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes > 0 else None
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch]
        c = ch
        for level, mult in enumerate(config.channel_mults):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(c, ch * mult, emb_dim, g, config.dropout))
                c = ch * mult
                skips.append(c)
            self.down.append(blocks)
            last = level == len(config.channel_mults) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)

        self.mid = nn.ModuleList(
            [ResBlock(c, c, emb_dim, g, config.dropout), ResBlock(c, c, emb_dim, g, config.dropout)]
        )

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            blocks = nn.ModuleList()
            # a lower level also consumes the skip of the downsampling conv above it
            for _ in range(config.num_res_blocks + (1 if level > 0 else 0)):
                blocks.append(ResBlock(c + skips.pop(), ch * mult, emb_dim, g, config.dropout))
                c = ch * mult
            self.up.append(blocks)
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if level > 0 else nn.Identity())
        # the full-resolution level also consumes the conv_in skip
        self.up[-1].append(ResBlock(c + skips.pop(), ch, emb_dim, g, config.dropout))  # type: ignore[operator]
        c = ch
        if skips:
            raise RuntimeError(f"UNet skip bookkeeping error: {len(skips)} left")  # pragma: no cover
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, config.in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))  # [B, 4ch]
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks, down in zip(self.down, self.downsample, strict=True):
            for block in blocks:  # type: ignore[attr-defined]
                h = block(h, emb)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for blocks, up in zip(self.up, self.upsample, strict=True):
            for block in blocks:  # type: ignore[attr-defined]
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
