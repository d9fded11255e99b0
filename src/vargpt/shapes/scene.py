"""The symbolic side of the shapes world: its configuration, scenes, grid cells and split assignment.

Everything a scene *means* lives here, free of pixels and of language, so that the renderer, the text generators
and the detector all agree on one description. Scenes are values (frozen, canonically ordered), which makes
"the same scene" a precise notion: the split of a scene is a pure function of its canonical key and the
configuration's salt, never of a random seed, so worlds built with different seeds still agree on which
scenes are train, validation or test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

GRID_SIZE = 3
SUPPORTED_SHAPES = ("circle", "square", "triangle")
SUPPORTED_BACKGROUNDS = ("white", "grey", "stripes")
SPLITS = ("train", "validation", "test")
# How text-to-image targets are laid out: "random" (cells, sizes and background drawn like any scene) or
# "canonical" (one fixed layout per object count or asked relation, large shapes on white) or "varied" (a few
# layouts per count or relation, objects shuffled among their cells, large shapes on any background: what the
# prompt leaves open varies between samples, while the picture space stays small enough to learn)
GENERATION_LAYOUTS = ("random", "canonical", "varied")

# Background pixel colours. Both are far (> 150 in RGB distance) from every palette colour, so that a pixel's
# nearest reference colour tells shape from background even under noise.
WHITE_RGB = (255, 255, 255)
GREY_RGB = (200, 200, 200)

# Six saturated colours whose pairwise RGB distance is at least 97, so per-pixel Gaussian noise of sigma 0.05
# (about 13 per channel) cannot flip a shape's majority colour.
DEFAULT_PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 30, 30)),
    ("orange", (245, 130, 0)),
    ("yellow", (250, 225, 20)),
    ("green", (30, 160, 50)),
    ("blue", (30, 70, 220)),
    ("purple", (140, 50, 190)),
)

# (colour, shape) pairs that never occur in train or validation; test items containing one are flagged.
DEFAULT_HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("orange", "circle"),
    ("green", "square"),
)

# Shape extent as a fraction of a grid cell. The gap between large shapes in neighbouring cells is 0.2 cell
# (2 px at 32 px), enough to keep them separate components after a mild blur.
DEFAULT_SIZES: tuple[tuple[str, float], ...] = (("small", 0.5), ("large", 0.8))

ROW_WORDS = ("top", "middle", "bottom")
COLUMN_WORDS = ("left", "middle", "right")

Cell = tuple[int, int]


def cell_name(cell: Cell) -> str:
    """Human name of a grid cell: 'top left', 'middle right', 'center', 'bottom middle'..."""
    row, col = cell
    if (row, col) == (1, 1):
        return "center"
    return f"{ROW_WORDS[row]} {COLUMN_WORDS[col]}"


def all_cells() -> tuple[Cell, ...]:
    return tuple((row, col) for row in range(GRID_SIZE) for col in range(GRID_SIZE))


@dataclass(frozen=True)
class ShapesWorldConfig:
    """What a shapes world can contain and how it is split. Detector and renderer read the same object."""

    image_size: int = 32
    shapes: tuple[str, ...] = SUPPORTED_SHAPES
    palette: tuple[tuple[str, tuple[int, int, int]], ...] = DEFAULT_PALETTE
    backgrounds: tuple[str, ...] = SUPPORTED_BACKGROUNDS
    sizes: tuple[tuple[str, float], ...] = DEFAULT_SIZES
    max_objects: int = 4
    held_out_pairs: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT_PAIRS
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test_unseen_fraction: float = 0.3
    split_salt: str = "shapes-v1"
    generation_layout: str = "random"

    def __post_init__(self) -> None:
        self._check_drawing()
        self._check_sampling()

    def _check_drawing(self) -> None:
        """What a picture can show: its size, shape and colour names, backgrounds and object sizes."""
        if not 24 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [24, 1024] pixels, got {self.image_size}")
        unknown = set(self.shapes) - set(SUPPORTED_SHAPES)
        if unknown or len(self.shapes) < 2 or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be 2+ distinct names from {SUPPORTED_SHAPES}, got {self.shapes}")
        names = [name for name, _ in self.palette]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"palette needs 2+ distinct colour names, got {names}")
        for name, rgb in self.palette:
            if len(rgb) != 3 or any(not 0 <= v <= 255 for v in rgb):
                raise ValueError(f"palette colour {name!r} must be three values in [0, 255], got {rgb}")
        unknown = set(self.backgrounds) - set(SUPPORTED_BACKGROUNDS)
        if unknown or not self.backgrounds:
            raise ValueError(f"backgrounds must be names from {SUPPORTED_BACKGROUNDS}, got {self.backgrounds}")
        fractions = sorted(f for _, f in self.sizes)
        if not self.sizes or any(not 0.2 <= f <= 0.85 for f in fractions):
            raise ValueError(f"size fractions must be in [0.2, 0.85] of a cell, got {self.sizes}")
        if any(b - a < 0.2 for a, b in pairwise(fractions)):
            raise ValueError(f"size fractions must differ by at least 0.2 to be told apart, got {self.sizes}")

    def _check_sampling(self) -> None:
        """How scenes are drawn and split: object counts, held-out pairs, split fractions and the layout."""
        if not 1 <= self.max_objects <= GRID_SIZE * GRID_SIZE:
            raise ValueError(f"max_objects must be in [1, {GRID_SIZE * GRID_SIZE}], got {self.max_objects}")
        for colour, shape in self.held_out_pairs:
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(f"held-out pair ({colour!r}, {shape!r}) names an unknown colour or shape")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be three numbers summing to 1, got {self.split_fractions}")
        if any(f <= 0 for f in self.split_fractions):
            raise ValueError(f"every split needs a positive fraction, got {self.split_fractions}")
        if not 0 <= self.test_unseen_fraction <= 1:
            raise ValueError(f"test_unseen_fraction must be in [0, 1], got {self.test_unseen_fraction}")
        if self.generation_layout not in GENERATION_LAYOUTS:
            raise ValueError(f"generation_layout must be one of {GENERATION_LAYOUTS}, got {self.generation_layout!r}")
        if self.generation_layout in ("canonical", "varied") and self.max_objects > 4:
            raise ValueError(
                f"the {self.generation_layout} layout places at most 4 objects, max_objects is {self.max_objects}"
            )

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.palette)

    @property
    def colour_rgb(self) -> dict[str, tuple[int, int, int]]:
        return dict(self.palette)

    @property
    def size_fraction(self) -> dict[str, float]:
        return dict(self.sizes)

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    @property
    def cell_pixels(self) -> float:
        return self.image_size / GRID_SIZE

    def allowed_pairs(self, include_held_out: bool) -> tuple[tuple[str, str], ...]:
        """(colour, shape) pairs that may be drawn; held-out ones only when asked for."""
        held = set(self.held_out_pairs)
        return tuple((c, s) for c in self.colours for s in self.shapes if include_held_out or (c, s) not in held)

    def validate_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True, order=True)
class ShapeInstance:
    """One shape in one grid cell. Field order makes the natural sort row-major by cell."""

    cell: Cell
    shape: str
    colour: str
    size: str = "large"

    def __post_init__(self) -> None:
        row, col = self.cell
        if not (0 <= row < GRID_SIZE and 0 <= col < GRID_SIZE):
            raise ValueError(f"cell must be (row, col) in [0, {GRID_SIZE}), got {self.cell}")
        object.__setattr__(self, "cell", (int(row), int(col)))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "cell": list(self.cell), "size": self.size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeInstance:
        return cls(cell=tuple(data["cell"]), shape=data["shape"], colour=data["colour"], size=data["size"])


@dataclass(frozen=True)
class Scene:
    """A whole picture: shapes (at most one per cell, kept in row-major order) on a background."""

    objects: tuple[ShapeInstance, ...]
    background: str = "white"
    _key: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.objects))
        cells = [o.cell for o in ordered]
        if len(set(cells)) != len(cells):
            raise ValueError(f"a scene holds at most one shape per cell, got cells {cells}")
        object.__setattr__(self, "objects", ordered)
        parts = [f"{o.cell[0]}{o.cell[1]}:{o.shape}:{o.colour}:{o.size}" for o in ordered]
        object.__setattr__(self, "_key", f"{self.background}|" + ",".join(parts))

    @property
    def key(self) -> str:
        """Canonical identity: two scenes are the same picture iff their keys are equal."""
        return self._key

    def occupied(self) -> set[Cell]:
        return {o.cell for o in self.objects}

    def at(self, cell: Cell) -> ShapeInstance | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}

    def replace_object(self, old: ShapeInstance, new: ShapeInstance | None) -> Scene:
        kept = [o for o in self.objects if o != old]
        return Scene(tuple(kept + ([new] if new is not None else [])), self.background)

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(tuple(ShapeInstance.from_dict(o) for o in data["objects"]), data["background"])


def validate_scene(scene: Scene, config: ShapesWorldConfig) -> None:
    """Raise ValueError when a scene uses names the configuration does not know."""
    if scene.background not in config.backgrounds:
        raise ValueError(f"unknown background {scene.background!r}; known: {config.backgrounds}")
    for obj in scene.objects:
        if obj.shape not in config.shapes:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {config.shapes}")
        if obj.colour not in config.colours:
            raise ValueError(f"unknown colour {obj.colour!r}; known: {config.colours}")
        if obj.size not in config.size_names:
            raise ValueError(f"unknown size {obj.size!r}; known: {config.size_names}")


def stable_unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, text) on every machine and Python run (unlike `hash`)."""
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def has_held_out_pair(scene: Scene, config: ShapesWorldConfig) -> bool:
    return bool(scene.pairs() & set(config.held_out_pairs))


def split_of_scene(scene: Scene, config: ShapesWorldConfig) -> str:
    """The one split a scene belongs to: test if it shows a held-out pair, otherwise by its key's hash."""
    if has_held_out_pair(scene, config):
        return "test"
    u = stable_unit_hash(scene.key, config.split_salt)
    train, validation, _ = config.split_fractions
    if u < train:
        return "train"
    return "validation" if u < train + validation else "test"
