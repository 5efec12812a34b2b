"""Networks shared by several methods. GroupNorm only: BatchNorm mixes examples and breaks DP-SGD."""

from bench.nets.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
