"""The BSQ autoencoder (the original's `vae_local`): CNN encoder and decoder plus the bit quantiser.

Architecture of Infinity's "flux" VAE with `vae_type=32`: per level of `channel_multipliers` the
encoder has `num_res_blocks` resnet blocks and (but at the last level) a downsample; the decoder
mirrors it with one resnet block more per level and an upsample at every level but the first. There
is no attention. Module names follow the original so its `vae_local.*` tensors load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .configuration import ImageTokenizerConfig
from .layers import Downsample, MidBlock, ResnetBlock, Upsample, WrappedConv2d, WrappedGroupNorm, swish
from .multiscale import MultiScaleBSQ


class EncoderLevel(nn.Module):
    """One resolution of the encoder: `block` (resnet blocks) then an optional `downsample`."""

    def __init__(self, blocks: Sequence[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x_BCHW: Tensor) -> Tensor:
        for block in self.block:
            x_BCHW = block(x_BCHW)
        return x_BCHW if self.downsample is None else self.downsample(x_BCHW)


class DecoderLevel(nn.Module):
    """One resolution of the decoder: `block` (resnet blocks) then an optional `upsample`."""

    def __init__(self, blocks: Sequence[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x_BCHW: Tensor) -> Tensor:
        for block in self.block:
            x_BCHW = block(x_BCHW)
        return x_BCHW if self.upsample is None else self.upsample(x_BCHW)


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> continuous latent (B, bits, H/stride, W/stride)."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        base, mults = config.base_channels, list(config.channel_multipliers)
        groups, eps = config.norm_groups, config.norm_eps
        self.conv_in = WrappedConv2d(config.in_channels, base, 3, padding=1)
        levels = []
        in_mults = [1, *mults]
        for level, mult in enumerate(mults):
            channels_in, channels_out = base * in_mults[level], base * mult
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(channels_in, channels_out, groups, eps))
                channels_in = channels_out
            downsample = Downsample(channels_out) if level < len(mults) - 1 else None
            levels.append(EncoderLevel(blocks, downsample))
        self.down = nn.ModuleList(levels)
        top = base * mults[-1]
        self.mid = MidBlock(top, groups, eps)
        self.norm_out = WrappedGroupNorm(top, groups, eps)
        self.conv_out = WrappedConv2d(top, config.bits, 3, padding=1)

    def forward(self, images_B3HW: Tensor) -> Tensor:
        h_BCHW = self.conv_in(images_B3HW)
        for level in self.down:
            h_BCHW = level(h_BCHW)
        h_BCHW = self.mid(h_BCHW)
        return self.conv_out(swish(self.norm_out(h_BCHW)))


class Decoder(nn.Module):
    """Latent (B, bits, h, w) -> images (B, 3, h*stride, w*stride), not clamped."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        base, mults = config.base_channels, list(config.channel_multipliers)
        groups, eps = config.norm_groups, config.norm_eps
        channels_in = base * mults[-1]
        self.conv_in = WrappedConv2d(config.bits, channels_in, 3, padding=1)
        self.mid = MidBlock(channels_in, groups, eps)
        levels: list[DecoderLevel] = []
        for level in reversed(range(len(mults))):
            channels_out = base * mults[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels_in, channels_out, groups, eps))
                channels_in = channels_out
            upsample = Upsample(channels_out) if level > 0 else None
            levels.insert(0, DecoderLevel(blocks, upsample))
        # Stored lowest level first (`up.0` is the full-resolution level) but run from the top.
        self.up = nn.ModuleList(levels)
        self.norm_out = WrappedGroupNorm(channels_in, groups, eps)
        self.conv_out = WrappedConv2d(channels_in, config.in_channels, 3, padding=1)

    def forward(self, latent_BdHW: Tensor) -> Tensor:
        h_BCHW = self.mid(self.conv_in(latent_BdHW))
        for level in reversed(self.up):
            h_BCHW = level(h_BCHW)
        return self.conv_out(swish(self.norm_out(h_BCHW)))


class BSQVAE(nn.Module):
    """Encoder, decoder and multi-scale bit quantiser of the image tokenizer.

    `encode` gives the continuous latent that `multiscale.encode_to_bits` / `teacher_forcing` code;
    `decode` turns a summed-code latent back into images in [-1, 1].
    """

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        if not config.channel_multipliers:
            raise ValueError("channel_multipliers must name at least one level")
        if config.num_res_blocks < 1 or config.base_channels < 1 or config.bits < 1:
            raise ValueError("num_res_blocks, base_channels and bits must be positive")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = MultiScaleBSQ(config.bits)

    @property
    def stride(self) -> int:
        """Pixels per latent position along each side."""
        return self.config.downsample_factor

    def encode(self, images_B3HW: Tensor) -> Tensor:
        """Images in [-1, 1] -> float32 latent f (B, bits, H/stride, W/stride)."""
        self._check_input(images_B3HW, self.config.in_channels, "images", self.stride)
        return self.encoder(images_B3HW).float()

    def decode(self, latent_BdHW: Tensor) -> Tensor:
        """Summed-code latent -> images clamped to [-1, 1]."""
        self._check_input(latent_BdHW, self.config.bits, "latent", 1)
        return torch.clamp(self.decoder(latent_BdHW), -1.0, 1.0)

    @staticmethod
    def _check_input(x: Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{what} size {tuple(x.shape[-2:])} is not divisible by the stride {multiple}")
