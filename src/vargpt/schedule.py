"""Scale schedules: the latent grids, smallest first, that next-scale prediction walks through.

One place for both towers: the image tokenizer codes an image on these grids, the visual decoder predicts
them scale by scale, the LLM reserves `<|image_gen_pad|>` slots for their tokens and the FLOP counter counts
them. `Schedule` bundles a schedule with everything derived from it; the functions below it are its pieces.

Infinity (and so VARGPT-v1.1) defines one 13-step template of (h, w) latent grids per height/width
ratio. A resolution class uses a prefix of its template: 256 px the first 7 steps, 512 px the first 10,
768 px the first 12 and 1024 px all 13 (Infinity's "0.06M", "0.25M", "0.60M" and "1M"). For a square
image at stride 16 the last grid of the prefix is resolution / 16; a non-square template of the same
length covers roughly the same number of pixels.

We generalise the rule to any stride so that tiny test models get the same kind of schedule: the prefix
length is the position of `resolution // stride` in the square template, for every aspect ratio.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

Grid = tuple[int, int]

# Height / width ratio >= 1 -> 13-step template of (h, w) latent grids (Infinity's `ratio2hws`).
# fmt: off
_TEMPLATES_TALL: dict[float, tuple[Grid, ...]] = {
    1.000: (
        (1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16),
        (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64),
    ),
    1.250: (
        (1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16),
        (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56),
    ),
    1.333: (
        (1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15),
        (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54),
    ),
    1.500: (
        (1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14),
        (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52),
    ),
    1.750: (
        (1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12),
        (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48),
    ),
    2.000: (
        (1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11),
        (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45),
    ),
    2.500: (
        (1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10),
        (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40),
    ),
    3.000: (
        (1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9),
        (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37),
    ),
}
# fmt: on


def _with_inverses(tall: dict[float, tuple[Grid, ...]]) -> dict[float, tuple[Grid, ...]]:
    """Add the wide templates: (w, h) swapped, keyed like the original (1/r truncated to 3 decimals)."""
    templates: dict[float, tuple[Grid, ...]] = {}
    for ratio, grids in tall.items():
        templates[ratio] = grids
        if ratio != 1.0:
            templates[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return templates


_TEMPLATES: dict[float, tuple[Grid, ...]] = _with_inverses(_TEMPLATES_TALL)

# Every supported h/w ratio, in the original's order (it matters only for ties in `nearest_aspect_ratio`).
SUPPORTED_ASPECT_RATIOS: tuple[float, ...] = tuple(_TEMPLATES)

_SQUARE_SIDES: tuple[int, ...] = tuple(h for h, _ in _TEMPLATES[1.0])
_RATIO_TOLERANCE = 1e-3


def nearest_aspect_ratio(h_div_w: float) -> float:
    """The supported template nearest to an image's height / width, as the original picks it."""
    if not h_div_w > 0:
        raise ValueError(f"height / width ratio must be positive, got {h_div_w}")
    return min(SUPPORTED_ASPECT_RATIOS, key=lambda template: abs(h_div_w - template))


def _template(aspect_ratio: float) -> tuple[Grid, ...]:
    """The 13-step template of a supported h/w ratio (4/3 matches 1.333 within a tolerance of 1e-3)."""
    for ratio, grids in _TEMPLATES.items():
        if abs(ratio - aspect_ratio) <= _RATIO_TOLERANCE:
            return grids
    raise ValueError(
        f"unsupported aspect ratio (h/w) {aspect_ratio}; supported: {list(SUPPORTED_ASPECT_RATIOS)} "
        "(use nearest_aspect_ratio to snap an image's ratio to one of them)"
    )


def _prefix_length(last_grid: int, what: str) -> int:
    """How many template steps a schedule ending at a square grid of side `last_grid` has."""
    if last_grid not in _SQUARE_SIDES:
        raise ValueError(f"{what}; the last square grid must be one of {list(_SQUARE_SIDES)}")
    return _SQUARE_SIDES.index(last_grid) + 1


def scale_schedule(resolution: int, stride: int = 16, aspect_ratio: float = 1.0) -> list[Grid]:
    """The (h, w) latent grids, smallest first, for images of a resolution class and h/w ratio.

    `resolution` is the side of the square image of the class (256, 512, ... for the full model). The
    schedule is the prefix of the aspect ratio's template as long as the square schedule that ends at
    `resolution // stride`, which is exactly how Infinity builds its 0.06M/0.25M/0.60M/1M lists.
    """
    if stride <= 0 or resolution <= 0:
        raise ValueError(f"resolution and stride must be positive, got resolution={resolution}, stride={stride}")
    supported = [side * stride for side in _SQUARE_SIDES]
    if resolution % stride:
        raise ValueError(f"resolution {resolution} is not a multiple of stride {stride}; supported: {supported}")
    length = _prefix_length(
        resolution // stride, f"unsupported resolution {resolution} at stride {stride}; supported: {supported}"
    )
    return list(_template(aspect_ratio)[:length])


def schedule_image_size(schedule: Sequence[Grid], stride: int = 16) -> tuple[int, int]:
    """Pixel (height, width) of the images a schedule codes: its last grid times the stride."""
    if not schedule:
        raise ValueError("the scale schedule is empty")
    h, w = schedule[-1]
    return h * stride, w * stride


def rope_reference_grid(aspect_ratio: float = 1.0, max_grid: int = 64) -> Grid:
    """The grid the decoder's 2D RoPE normalises positions to, for a template.

    The original uses the last grid of the 1024 px ("1M") schedule of the image's template: (64, 64) for
    square images, (90, 45) for h/w = 2. `max_grid` is the square side of that reference (64 for the
    full model; the tiny test model's `rope_max_grid`); non-square templates take the same step.
    """
    length = _prefix_length(max_grid, f"unsupported RoPE reference grid {max_grid}")
    return _template(aspect_ratio)[length - 1]


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


def padded_token_count(num_tokens: int, multiple: int) -> int:
    """`num_tokens` rounded up to a multiple: the `<|image_gen_pad|>` slots one image takes in the LLM."""
    if multiple <= 0:
        raise ValueError(f"the pad multiple must be positive, got {multiple}")
    return -(-num_tokens // multiple) * multiple


@dataclass(frozen=True, eq=False)
class Schedule:
    """One image's scale schedule and what both towers derive from it.

    It is a sequence of (h, w) grids (iterating, indexing and `len` work on the grids), so any function taking a
    list of grids takes a `Schedule`. Built by `Schedule.for_resolution` (or `VARGPTConfig`-aware helpers such
    as `VARGPTForConditionalGeneration.generation_schedule`), never by hand-counting tokens.

    `stride` is the image tokenizer's downsampling factor (pixels per latent cell); `rope_reference` the grid the
    decoder's 2D RoPE normalises positions to; `pad_multiple` the LLM's `<|image_gen_pad|>` rounding.
    """

    grids: tuple[Grid, ...]
    stride: int = 16
    rope_reference: Grid = (64, 64)
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", tuple(as_grids(self.grids)))
        if self.stride <= 0 or self.pad_multiple <= 0:
            raise ValueError(f"stride and pad_multiple must be positive, got {self.stride}, {self.pad_multiple}")

    @classmethod
    def for_resolution(
        cls,
        resolution: int,
        stride: int = 16,
        aspect_ratio: float = 1.0,
        rope_max_grid: int = 64,
        pad_multiple: int = 1,
    ) -> Schedule:
        """The schedule of a resolution class and h/w ratio, as Infinity builds it (see `scale_schedule`)."""
        return cls(
            grids=tuple(scale_schedule(resolution, stride, aspect_ratio)),
            stride=stride,
            rope_reference=rope_reference_grid(aspect_ratio, rope_max_grid),
            pad_multiple=pad_multiple,
        )

    # -- a sequence of grids -----------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        """Equal to a `Schedule` with the same fields, or to a plain sequence of the same grids (what
        `generation_schedule` returned before it returned a `Schedule`)."""
        if isinstance(other, Schedule):
            return (self.grids, self.stride, self.rope_reference, self.pad_multiple) == (
                other.grids,
                other.stride,
                other.rope_reference,
                other.pad_multiple,
            )
        if isinstance(other, (list, tuple)):
            return self.grids == tuple(tuple(grid) for grid in other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.grids, self.stride, self.rope_reference, self.pad_multiple))

    def __len__(self) -> int:
        return len(self.grids)

    def __iter__(self) -> Iterator[Grid]:
        return iter(self.grids)

    def __getitem__(self, index):
        return self.grids[index]

    # -- derived counts ----------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @cached_property
    def scale_token_counts(self) -> tuple[int, ...]:
        """Tokens of each scale, h * w."""
        return tuple(h * w for h, w in self.grids)

    @property
    def num_tokens(self) -> int:
        """Tokens over all scales (the decoder's sequence length, the bits one image has per channel)."""
        return sum(self.scale_token_counts)

    @property
    def num_pad_tokens(self) -> int:
        """`<|image_gen_pad|>` slots one image takes in the LLM's sequence."""
        return padded_token_count(self.num_tokens, self.pad_multiple)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of every scale in the flattened token sequence, plus the total at the end."""
        return tuple(scale_offsets(self.grids))

    @property
    def image_size(self) -> tuple[int, int]:
        """Pixel (height, width) of the images this schedule codes."""
        return schedule_image_size(self.grids, self.stride)

    @property
    def last_grid(self) -> Grid:
        return self.grids[-1]

    def prefix(self, num_scales: int) -> Schedule:
        """The first `num_scales` scales (e.g. for a partial decode), same stride, reference and rounding."""
        if not 0 < num_scales <= self.num_scales:
            raise ValueError(f"a prefix needs 1..{self.num_scales} scales, got {num_scales}")
        return Schedule(self.grids[:num_scales], self.stride, self.rope_reference, self.pad_multiple)

    def scale_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Scale index of every token, long [L]."""
        return scale_token_ids(self.grids, device)

    def attention_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Block-causal training mask, bool [L, L]."""
        return block_causal_mask(self.grids, device)
