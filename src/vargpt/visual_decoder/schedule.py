"""Token layout of a scale schedule: which scale each token belongs to and what it may attend to."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grid = tuple[int, int]


def as_grids(schedule: Sequence[Sequence[int]], max_scales: int | None = None) -> list[Grid]:
    """Validate a schedule of (h, w) grids and return it as a list of int pairs.

    Raises ValueError for an empty schedule, entries that are not two positive ints, or more scales than
    the decoder has level embeddings for.
    """
    if len(schedule) == 0:
        raise ValueError("the scale schedule is empty")
    grids: list[Grid] = []
    for index, grid in enumerate(schedule):
        if len(grid) != 2:
            raise ValueError(f"scale {index} of the schedule must be an (h, w) pair, got {tuple(grid)}")
        h, w = int(grid[0]), int(grid[1])
        if h <= 0 or w <= 0 or h != grid[0] or w != grid[1]:
            raise ValueError(f"scale {index} of the schedule must hold two positive ints, got {tuple(grid)}")
        grids.append((h, w))
    if max_scales is not None and len(grids) > max_scales:
        raise ValueError(f"the schedule has {len(grids)} scales but the decoder embeds at most {max_scales}")
    return grids


def token_count(schedule: Sequence[Grid]) -> int:
    """Number of tokens over all scales."""
    return sum(h * w for h, w in schedule)


def scale_offsets(schedule: Sequence[Grid]) -> list[int]:
    """Start index of every scale in the flattened sequence, plus the total length at the end."""
    offsets = [0]
    for h, w in schedule:
        offsets.append(offsets[-1] + h * w)
    return offsets


def scale_token_ids(schedule: Sequence[Grid], device: torch.device | str | None = None) -> torch.Tensor:
    """Scale index of every token, shape [L] (long): 0 for the first scale's tokens, 1 for the next..."""
    sizes = torch.tensor([h * w for h, w in schedule], device=device)
    return torch.repeat_interleave(torch.arange(len(schedule), device=device), sizes)


def block_causal_mask(schedule: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """Training attention mask, bool [L, L], True where query token i may attend to key token j.

    A token of scale k sees every token of scales <= k (its own scale included, in both directions), which
    is what the scale-by-scale KV-cached inference computes.
    """
    ids_L = scale_token_ids(as_grids(schedule), device)
    return ids_L[:, None] >= ids_L[None, :]
