"""Building blocks of the FLUX-style convolutional autoencoder.

Convolutions and group norms sit inside one-attribute wrappers only so that parameter names carry
the original's `.conv.` / `.norm.` infixes (`conv_in.conv.weight`, `norm1.norm.weight`): the published
checkpoint loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x), written out: it matches the original bit for bit, where `F.silu` differs by ~1e-6."""
    return x * torch.sigmoid(x)


class WrappedConv2d(nn.Module):
    """A zero-padded Conv2d stored as `.conv`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(x_BCHW)


class WrappedGroupNorm(nn.Module):
    """An affine GroupNorm stored as `.norm`."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.norm(x_BCHW)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = WrappedGroupNorm(in_channels, groups, eps)
        self.conv1 = WrappedConv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = WrappedGroupNorm(out_channels, groups, eps)
        self.conv2 = WrappedConv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = WrappedConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h_BCHW = self.conv1(swish(self.norm1(x_BCHW)))
        h_BCHW = self.conv2(swish(self.norm2(h_BCHW)))
        shortcut_BCHW = x_BCHW if self.nin_shortcut is None else self.nin_shortcut(x_BCHW)
        return shortcut_BCHW + h_BCHW


class Downsample(nn.Module):
    """Halve the resolution: zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = WrappedConv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = WrappedConv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2, mode="nearest"))


class MidBlock(nn.Module):
    """Two resnet blocks at the lowest resolution (the original has no attention here)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, eps)
        self.block_2 = ResnetBlock(channels, channels, groups, eps)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.block_2(self.block_1(x_BCHW))
