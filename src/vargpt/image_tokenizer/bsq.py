"""Binary spherical quantisation (BSQ): one sign bit per latent channel, codes on the unit sphere.

A d-channel latent vector r is coded as bit_j = [r_j > 0] and decoded as code_j = (2 bit_j - 1) / sqrt(d),
so every code has norm 1 whatever the bits. Training the autoencoder through the sign uses a
straight-through estimator whose gradient is that of the L2-normalised input, as in the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bits_to_codes(bits_Nd: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Map 0/1 bits along the last dimension (d) to codes of +-1/sqrt(d) (bit 1 -> positive).

    Computed as the original does (signs times the float64 1/sqrt(d), then L2-normalised), not as the
    shorter `signs * d**-0.5`: the two differ in the last bit for d = 8 and 32, and that ulp is enough to
    move a decoded pixel across an integer boundary."""
    signs = bits_Nd.to(dtype) * 2 - 1
    return F.normalize(signs * (1 / math.sqrt(bits_Nd.shape[-1])), dim=-1)


def quantize(residual: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Quantise `residual` along its channel dimension `dim`.

    Returns (bits, codes): bits are int64 0/1 of the residual's shape; codes equal `bits_to_codes(bits)`
    exactly in value and carry the straight-through gradient of the L2-normalised residual.
    """
    bits = (residual > 0).long()
    codes = bits_to_codes(bits.movedim(dim, -1), dtype=residual.dtype).movedim(-1, dim)
    if residual.requires_grad:
        unit = F.normalize(residual, dim=dim)
        codes = codes + (unit - unit.detach())
    return bits, codes


class BinarySphericalQuantizer(nn.Module):
    """The per-position quantiser (the original's `quantizer.lfq`).

    It has no learned weights; its one state is the persistent buffer `mask` = 2^(d-1), ..., 2, 1 that
    the original stores in its checkpoint and uses to pack d bits (first bit most significant) into one
    integer index.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 0 < bits < 64:
            raise ValueError(f"bits must be in 1..63 to pack into int64 indices, got {bits}")
        self.bits = bits
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int64), persistent=True)

    def forward(self, residual_BdHW: Tensor) -> tuple[Tensor, Tensor]:
        """Bits and straight-through codes of a channel-first residual (see `quantize`)."""
        self._check_channels(residual_BdHW.shape[1], "residual")
        return quantize(residual_BdHW, dim=1)

    def bits_to_codes(self, bits_Nd: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """+-1/sqrt(d) codes of channel-last bits."""
        self._check_channels(bits_Nd.shape[-1], "bits")
        return bits_to_codes(bits_Nd, dtype)

    def bits_to_indices(self, bits_Nd: Tensor) -> Tensor:
        """Pack channel-last 0/1 bits into int64 indices, first bit most significant."""
        self._check_channels(bits_Nd.shape[-1], "bits")
        return (bits_Nd.long() * self.mask).sum(dim=-1)

    def indices_to_bits(self, indices_N: Tensor) -> Tensor:
        """Unpack int64 indices into channel-last int64 0/1 bits (inverse of `bits_to_indices`)."""
        return ((indices_N.long().unsqueeze(-1) & self.mask) != 0).long()

    def _check_channels(self, channels: int, what: str) -> None:
        if channels != self.bits:
            raise ValueError(f"{what} has {channels} channels, the quantiser codes {self.bits} bits")
