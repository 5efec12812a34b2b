"""DCGAN-style class-conditional networks shared by the GAN methods (DP-GAN, PATE-GAN), GroupNorm only.

- `Generator`: (z, y) -> image in [−1, 1]; DCGAN (Radford et al. 2016) transposed convolutions,
  label embedding concatenated to z.
- `Discriminator`: (x, y) -> one logit per row; strided convolutions, LeakyReLU, GroupNorm (never
  BatchNorm: it mixes the examples of a batch and breaks per-example clipping), class conditioning by
  projection (Miyato & Koyama 2018): logit = w·h + b + <E[y], h>. Only Conv2d, GroupNorm, Linear and
  Embedding hold parameters, so bench.privacy.dpsgd's "folded" per-example gradients apply.
- `TeacherBank`: k discriminators in one module, parameters stacked along a leading teacher dim and
  run with torch.func.vmap (convolutions become one grouped convolution), for PATE-GAN's teachers.
  `TeacherList` is the same k networks as a Python loop (same initial weights): the reference the
  benchmark compares against.

Images must have H and W divisible by 4 (28, 16, 32, 64 all are).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from bench.contract import DataSpec
from bench.errors import BenchError
from bench.nets import BuiltOnce
from bench.pixels import to_uint8


def check_gan_resolution(height: int, width: int) -> None:
    if height % 4 or width % 4:
        raise ValueError(f"image size {height}×{width} is not divisible by 4 (two stride-2 stages)")


class ConditionalGAN(BuiltOnce):
    """What the GAN baselines share: capability flags and the construction check (subclasses add `name`,
    `Config`, `_build`, `fit`, `sample`, `state_dict`, `load_state_dict`)."""

    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False
    name: ClassVar[str]

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None:
        try:
            check_gan_resolution(spec.height, spec.width)
        except ValueError as e:
            raise BenchError(f"{self.name}: {e}") from None
        self.config: Any = config
        self.spec, self.device = spec, device
        self.check_networks()  # built for real once: in fit, under the run's seed (bench.nets.BuiltOnce)

    def _build(self) -> None:
        raise NotImplementedError


class Generator(nn.Module):
    """forward(z float [B, latent_dim], y int64 [B]) -> float [B, C, H, W] in (−1, 1)."""

    def __init__(
        self, *, channels: int, height: int, width: int, num_classes: int, latent_dim: int, width_c: int, groups: int
    ) -> None:
        super().__init__()
        check_gan_resolution(height, width)
        self.latent_dim, self.h0, self.w0, self.c0 = latent_dim, height // 4, width // 4, 2 * width_c
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(2 * latent_dim, self.c0 * self.h0 * self.w0)
        self.norm0 = nn.GroupNorm(groups, self.c0)
        self.up1 = nn.ConvTranspose2d(self.c0, width_c, 4, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(groups, width_c)
        self.up2 = nn.ConvTranspose2d(width_c, channels, 4, stride=2, padding=1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(-1, self.c0, self.h0, self.w0)
        h = F.relu(self.norm0(h))
        h = F.relu(self.norm1(self.up1(h)))  # [B, c, H/2, W/2]
        return torch.tanh(self.up2(h))  # [B, C, H, W]


class Discriminator(nn.Module):
    """forward(x float [B, C, H, W] in [−1, 1], y int64 [B]) -> logits float [B] (real > 0)."""

    def __init__(self, *, channels: int, num_classes: int, width_c: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width_c, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width_c, 2 * width_c, 4, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(groups, 2 * width_c)
        self.out = nn.Linear(2 * width_c, 1)
        self.embed = nn.Embedding(num_classes, 2 * width_c)  # projection conditioning

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)  # [B, c, H/2, W/2]
        h = F.leaky_relu(self.norm2(self.conv2(h)), 0.2)  # [B, 2c, H/4, W/4]
        h = h.mean(dim=(2, 3))  # [B, 2c]
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(1)


class TeacherBank(nn.Module):
    """k discriminators as one vmapped network: parameters [k, *shape], teacher j owns slice j."""

    def __init__(self, teachers: list[Discriminator]) -> None:
        super().__init__()
        if len(teachers) < 1:
            raise ValueError("TeacherBank needs at least one teacher")
        params, _ = stack_module_state(teachers)  # type: ignore[arg-type]
        self.k = len(teachers)
        self._names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self._names])
        self._base = [copy.deepcopy(teachers[0]).to("meta")]  # in a list: not a registered submodule

    def _params(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self.stacked, strict=True))

    def _one(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return functional_call(self._base[0], params, (x, y))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Teacher j on its own batch: x [k, B, C, H, W], y [k, B] -> logits [k, B]."""
        return vmap(self._one)(self._params(), x, y)

    def shared(self, x: Tensor, y: Tensor) -> Tensor:
        """Every teacher on the same batch: x [B, C, H, W], y [B] -> logits [k, B]."""
        return vmap(self._one, in_dims=(0, None, None))(self._params(), x, y)

    def teacher(self, j: int) -> dict[str, Tensor]:
        """Teacher j's parameters, by the names of a Discriminator (for tests)."""
        return {n: p[j] for n, p in self._params().items()}


class TeacherList(nn.Module):
    """The same k discriminators as a Python loop of separate modules (benchmark reference)."""

    def __init__(self, teachers: list[Discriminator]) -> None:
        super().__init__()
        self.k = len(teachers)
        self.nets = nn.ModuleList(teachers)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([net(x[j], y[j]) for j, net in enumerate(self.nets)])

    def shared(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([net(x, y) for net in self.nets])

    def teacher(self, j: int) -> dict[str, Tensor]:
        return dict(self.nets[j].named_parameters())


@torch.no_grad()
def generate(
    net: Generator, n: int, labels: Tensor, *, generator: torch.Generator, device: torch.device, batch_size: int = 500
) -> Tensor:
    """n images from `net` for int64 `labels` [n]; z ~ N(0, I) from the CPU `generator`: uint8 [n, C, H, W]."""
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    z = torch.randn(n, net.latent_dim, generator=generator)  # drawn on the CPU: same images on any device
    out = [
        to_uint8(net(z[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))).cpu()
        for i in range(0, n, batch_size)
    ]
    return torch.cat(out) if out else torch.zeros((0, *net_shape(net)), dtype=torch.uint8)


def net_shape(net: Generator) -> tuple[int, int, int]:
    return net.up2.out_channels, 4 * net.h0, 4 * net.w0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_pair(spec: Any, *, latent_dim: int, width_c: int, groups: int) -> tuple[Generator, Discriminator]:
    """A Generator and a Discriminator for a DataSpec (initial weights from torch's global RNG)."""
    g = Generator(
        channels=spec.channels,
        height=spec.height,
        width=spec.width,
        num_classes=spec.num_classes,
        latent_dim=latent_dim,
        width_c=width_c,
        groups=groups,
    )
    d = Discriminator(channels=spec.channels, num_classes=spec.num_classes, width_c=width_c, groups=groups)
    return g, d
