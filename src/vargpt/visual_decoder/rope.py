"""2D rotary position embedding of the decoder's self-attention (Infinity's "normalized by hw, mode 2").

Every scale is laid on a common reference grid (H, W): token (i, j) of a (h, w) scale takes position
(round(i * H / h), round(j * W / w)), rounding half to even as `torch.round` does. For a square schedule
(H, W) is (rope_max_grid, rope_max_grid), i.e. (64, 64) for the full model, the last grid of the 1024 px
schedule. A non-square schedule must be a prefix of one of Infinity's aspect-ratio templates and takes
that template's reference grid (the original looks its RoPE table up by the exact schedule). A `Schedule`
(`VARGPTForConditionalGeneration.generation_schedule`) carries its reference grid, so no lookup is needed.

Each head's channels are split in halves: the first half rotates with the row (y) position, the second
with the column (x) position; inside a half, adjacent channel pairs (2p, 2p + 1) form the rotated planes
with frequency theta ** (-2p / (head_dim / 2)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..schedule import SUPPORTED_ASPECT_RATIOS, Grid, Schedule, rope_reference_grid, scale_schedule

# Resolution and stride that select a template's full 13-step list.
_FULL_TEMPLATE_RESOLUTION, _FULL_TEMPLATE_STRIDE = 1024, 16


def reference_grid(schedule: Sequence[Grid], max_grid: int) -> Grid:
    """The (H, W) grid that positions of `schedule` are normalised to.

    Square last grid: (max_grid, max_grid). Otherwise the schedule must be a prefix of an aspect-ratio
    template, whose reference grid is returned; anything else raises ValueError (the original has no
    RoPE table for it either).
    """
    h_last, w_last = schedule[-1]
    if h_last == w_last:
        return max_grid, max_grid
    grids = [tuple(grid) for grid in schedule]
    for ratio in SUPPORTED_ASPECT_RATIOS:
        template = scale_schedule(_FULL_TEMPLATE_RESOLUTION, _FULL_TEMPLATE_STRIDE, ratio)
        if grids == [tuple(grid) for grid in template[: len(grids)]]:
            return rope_reference_grid(ratio, max_grid)
    raise ValueError(
        f"non-square schedule {grids} is not a prefix of any aspect-ratio template, so it has no 2D RoPE "
        "reference grid; build schedules with vargpt.schedule.scale_schedule"
    )


def scale_positions(grid: Grid, reference: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """(y, x) positions of the tokens of one (h, w) scale, row-major, shape [h * w, 2] (long)."""
    h, w = grid
    ref_h, ref_w = reference
    # float32 products as in the original, so that exact halves round the same way (half to even)
    rows = (torch.arange(h, device=device) * (ref_h / h)).round().long()
    cols = (torch.arange(w, device=device) * (ref_w / w)).round().long()
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def schedule_reference(schedule: Sequence[Grid] | Schedule, max_grid: int) -> Grid:
    """The reference grid of a schedule: a `Schedule` carries it (from its template, found when it was built);
    for a plain list of grids it is looked up with `reference_grid`."""
    if isinstance(schedule, Schedule):
        return schedule.rope_reference
    return reference_grid(schedule, max_grid)


def schedule_positions(
    schedule: Sequence[Grid] | Schedule, max_grid: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(y, x) positions of every token of a schedule, scales concatenated, shape [L, 2] (long)."""
    reference = schedule_reference(schedule, max_grid)
    return torch.cat([scale_positions(grid, reference, device) for grid in schedule])


def rope_cos_sin(
    positions_L2: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [L, head_dim // 2]: y planes first, then x planes."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, device=positions_L2.device) / half))
    y_L, x_L = positions_L2.to(inv_freq.dtype).unbind(-1)
    angles = torch.cat((torch.outer(y_L, inv_freq), torch.outer(x_L, inv_freq)), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BHLc: torch.Tensor, cos_Lp: torch.Tensor, sin_Lp: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (2p, 2p + 1) of x by the angle of plane p."""
    pairs = x_BHLc.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((cos_Lp * even - sin_Lp * odd, sin_Lp * even + cos_Lp * odd), dim=-1)
    return rotated.flatten(-2)
