"""Pixel ranges every method converts between: the datasets' uint8 0..255 and the networks' float [−1, 1].

A module of its own at the bottom of the harness, so that the GAN networks and every method import it without
reaching into the diffusion code."""

from __future__ import annotations

import torch
from torch import Tensor


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [N,C,H,W] 0..255 -> float32 in [−1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float in [−1, 1] (clamped) -> uint8 0..255."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
