"""Multi-scale residual bit coding of a latent map (Infinity's multi-scale BSQ).

The latent f (B, d, H, W) is coded over a schedule of grids (h_k, w_k) ending at (H, W). With F the
running sum of decoded codes at full size (F = 0 at the start), scale k codes
r_k = area-downsample(f - F) to (h_k, w_k) (no resize at the full-size scale) as bits [r_k > 0], and
adds their codes, bilinearly upsampled to (H, W), to F. The visual decoder predicts scale k + 1 from
the bilinear resize of F to (h_{k+1}, w_{k+1}).

Upsampling resizes are the original's trilinear resize over a time axis of length 1 (align_corners=False):
mathematically a bilinear resize, but computed in the original's order so that the summed codes are
bitwise the original's. Per-scale bits are laid out (B, h*w, d), positions in row-major order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedule import Grid
from .bsq import BinarySphericalQuantizer, bits_to_codes, quantize


def _check_latent(f_BdHW: Tensor, schedule: Sequence[Grid]) -> None:
    if f_BdHW.ndim != 4:
        raise ValueError(f"latent must be (B, d, H, W), got shape {tuple(f_BdHW.shape)}")
    if not schedule:
        raise ValueError("the scale schedule is empty")
    if tuple(schedule[-1]) != tuple(f_BdHW.shape[-2:]):
        raise ValueError(
            f"the schedule's last grid {tuple(schedule[-1])} must equal the latent grid {tuple(f_BdHW.shape[-2:])}"
        )


def _check_bits(bits_B_hw_d: Tensor, grid_hw: Grid, channels: int) -> None:
    h, w = grid_hw
    if bits_B_hw_d.ndim != 3 or bits_B_hw_d.shape[1:] != (h * w, channels):
        raise ValueError(
            f"bits for grid {tuple(grid_hw)} must be (B, {h * w}, {channels}), got shape {tuple(bits_B_hw_d.shape)}"
        )


def _flatten(x_BdHW: Tensor) -> Tensor:
    """(B, d, h, w) -> (B, h*w, d), positions row-major."""
    return x_BdHW.flatten(2).transpose(1, 2)


def _unflatten(x_B_hw_d: Tensor, grid_hw: Grid) -> Tensor:
    """(B, h*w, d) -> (B, d, h, w)."""
    return x_B_hw_d.transpose(1, 2).reshape(x_B_hw_d.shape[0], x_B_hw_d.shape[2], *grid_hw)


def _resize_bilinear(x_BdHW: Tensor, grid_hw: Grid) -> Tensor:
    if tuple(x_BdHW.shape[-2:]) == tuple(grid_hw):
        return x_BdHW
    # the original's trilinear resize over a time axis of length 1: the same values as a bilinear resize up
    # to summation order, and that order decides the last bit of the summed codes. The CPU kernel's order
    # also follows the memory layout, so the input is laid out channels-last, as the original's codes arrive
    # (a permuted (B, 1, h, w, d) tensor): the training targets, the inference loop and the original then agree
    # bit for bit whatever views the bits come in.
    x_Bd1HW = x_BdHW.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d)
    return F.interpolate(x_Bd1HW, size=(1, *grid_hw), mode="trilinear").squeeze(2)


def _downsample_area(x_BdHW: Tensor, grid_hw: Grid) -> Tensor:
    if tuple(x_BdHW.shape[-2:]) == tuple(grid_hw):
        return x_BdHW
    return F.interpolate(x_BdHW, size=tuple(grid_hw), mode="area")


def accumulate_scale(F_BdHW: Tensor, bits_B_hw_d: Tensor, grid_hw: Grid) -> Tensor:
    """F plus the codes of one scale's bits, bilinearly upsampled to F's grid.

    Start the scale loop from `torch.zeros(B, d, H, W)`.
    """
    if F_BdHW.ndim != 4:
        raise ValueError(f"summed codes must be (B, d, H, W), got shape {tuple(F_BdHW.shape)}")
    _check_bits(bits_B_hw_d, grid_hw, F_BdHW.shape[1])
    codes_BdHW = _unflatten(bits_to_codes(bits_B_hw_d, dtype=F_BdHW.dtype), grid_hw)
    return F_BdHW + _resize_bilinear(codes_BdHW, tuple(F_BdHW.shape[-2:]))


def next_scale_input(F_BdHW: Tensor, next_grid_hw: Grid) -> Tensor:
    """The decoder's input for the next scale: F bilinearly resized to that grid, as (B, h*w, d)."""
    if F_BdHW.ndim != 4:
        raise ValueError(f"summed codes must be (B, d, H, W), got shape {tuple(F_BdHW.shape)}")
    return _flatten(_resize_bilinear(F_BdHW, next_grid_hw))


def bits_to_latent(
    bits_per_scale: Sequence[Tensor], schedule: Sequence[Grid], dtype: torch.dtype = torch.float32
) -> Tensor:
    """The latent F (B, d, H, W) that the VAE decoder turns into pixels, from every scale's bits."""
    if len(bits_per_scale) != len(schedule) or not schedule:
        raise ValueError(f"got bits for {len(bits_per_scale)} scales but the schedule has {len(schedule)}")
    first = bits_per_scale[0]
    if first.ndim != 3:
        raise ValueError(f"bits must be (B, h*w, d), got shape {tuple(first.shape)}")
    batch, _, channels = first.shape
    F_BdHW = torch.zeros(batch, channels, *schedule[-1], dtype=dtype, device=first.device)
    for bits_B_hw_d, grid_hw in zip(bits_per_scale, schedule, strict=True):
        F_BdHW = accumulate_scale(F_BdHW, bits_B_hw_d, grid_hw)
    return F_BdHW


def encode_to_bits(f_BdHW: Tensor, schedule: Sequence[Grid]) -> tuple[list[Tensor], Tensor]:
    """Code a latent over a schedule: per-scale int64 bits (B, h*w, d) and the accumulated latent F.

    F carries the straight-through gradient to f (for autoencoder training); the residual of each
    scale is taken against the detached F, as the original does.
    """
    _check_latent(f_BdHW, schedule)
    full_hw = tuple(f_BdHW.shape[-2:])
    F_BdHW = torch.zeros_like(f_BdHW)
    bits_per_scale: list[Tensor] = []
    for grid_hw in schedule:
        residual_BdHW = _downsample_area(f_BdHW - F_BdHW.detach(), grid_hw)
        bits_BdHW, codes_BdHW = quantize(residual_BdHW, dim=1)
        F_BdHW = F_BdHW + _resize_bilinear(codes_BdHW, full_hw)
        bits_per_scale.append(_flatten(bits_BdHW))
    return bits_per_scale, F_BdHW


def teacher_forcing(
    f_BdHW: Tensor,
    schedule: Sequence[Grid],
    flip_probs: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Training targets and inputs of the visual decoder for a latent f.

    Returns (labels_BLd, inputs_BLd): labels are every scale's bits (int64, L = token count); inputs
    are the next-scale inputs of scales 2..K (length L - h_1 w_1). With `flip_probs` (one probability
    per scale) this is bitwise self-correction: each scale's bits are flipped with that probability,
    the flipped bits' codes feed F, and the labels of later scales are the clean bits of the residual
    against that corrupted F. Flip masks are drawn from `generator` in (B, h*w, d) order, the same
    element order as the original's (B, 1, h, w, d) draw. No gradient flows to f.
    """
    _check_latent(f_BdHW, schedule)
    if flip_probs is not None:
        if len(flip_probs) != len(schedule):
            raise ValueError(f"got {len(flip_probs)} flip probabilities for {len(schedule)} scales")
        if any(not 0.0 <= p <= 1.0 for p in flip_probs):
            raise ValueError(f"flip probabilities must lie in [0, 1], got {list(flip_probs)}")
    f_BdHW = f_BdHW.detach()
    F_BdHW = torch.zeros_like(f_BdHW)
    labels: list[Tensor] = []
    inputs: list[Tensor] = []
    for k, grid_hw in enumerate(schedule):
        residual_BdHW = _downsample_area(f_BdHW - F_BdHW, grid_hw)
        bits_B_hw_d = _flatten((residual_BdHW > 0).long())
        labels.append(bits_B_hw_d)
        if flip_probs is not None:
            bits_B_hw_d = bits_B_hw_d ^ _flip_mask(bits_B_hw_d, flip_probs[k], generator)
        F_BdHW = accumulate_scale(F_BdHW, bits_B_hw_d, grid_hw)
        if k + 1 < len(schedule):
            inputs.append(next_scale_input(F_BdHW, schedule[k + 1]))
    inputs_BLd = torch.cat(inputs, dim=1) if inputs else f_BdHW.new_zeros(f_BdHW.shape[0], 0, f_BdHW.shape[1])
    return torch.cat(labels, dim=1), inputs_BLd


def _flip_mask(bits_B_hw_d: Tensor, prob: float, generator: torch.Generator | None) -> Tensor:
    """int64 0/1 mask, 1 with probability `prob` per bit (drawn even for prob 0, like the original)."""
    device = generator.device if generator is not None else bits_B_hw_d.device
    uniform = torch.rand(bits_B_hw_d.shape, generator=generator, device=device).to(bits_B_hw_d.device)
    return (uniform < prob).long()


def sample_flip_probs(
    num_scales: int, max_prob: float = 0.3, step: float = 0.01, generator: torch.Generator | None = None
) -> list[float]:
    """One flip probability per scale, each uniform over {0, step, ..., max_prob}.

    The original draws a fresh probability for every scale of every batch (one value shared by all the
    batch's images) from {0, 0.01, ..., 0.30}.
    """
    if num_scales < 0:
        raise ValueError(f"num_scales must be non-negative, got {num_scales}")
    if step <= 0 or not 0.0 <= max_prob <= 1.0:
        raise ValueError(f"need step > 0 and 0 <= max_prob <= 1, got step={step}, max_prob={max_prob}")
    levels = round(max_prob / step)
    device = generator.device if generator is not None else None
    draws = torch.randint(0, levels + 1, (num_scales,), generator=generator, device=device)
    return [int(k) * step for k in draws.tolist()]


class MultiScaleBSQ(nn.Module):
    """The autoencoder's quantiser (the original's `quantizer`): holds the per-position `lfq`."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.lfq = BinarySphericalQuantizer(bits)

    def forward(self, f_BdHW: Tensor, schedule: Sequence[Grid]) -> tuple[list[Tensor], Tensor]:
        """Per-scale bits and the accumulated latent (see `encode_to_bits`)."""
        if f_BdHW.ndim != 4 or f_BdHW.shape[1] != self.lfq.bits:
            raise ValueError(f"latent must be (B, {self.lfq.bits}, H, W), got shape {tuple(f_BdHW.shape)}")
        return encode_to_bits(f_BdHW, schedule)
