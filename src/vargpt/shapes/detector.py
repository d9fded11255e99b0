"""A programmatic detector for shapes-world images: what is drawn where, read back from pixels.

It replaces GenEval's learned detector (Mask2Former + CLIP colour classifier) for our world, where colours and
shapes are known in advance, so scores are exact rather than model-dependent. Steps:

1. Each pixel takes the nearest reference colour (palette + white + grey backgrounds); a pixel is *shape* when
   that reference is a palette colour within `max_colour_distance` (RGB, 0-255 units). Nearest-colour
   classification is what makes noisy or slightly blurred generated images readable.
2. Shape pixels are grouped into 4-connected components; components smaller than `min_area_fraction` of the
   smallest triangle the world draws are discarded as speckle.
3. A component's colour is the majority of its pixels' colours (its `score` is that majority's share); its
   kind comes from two robust features of the bounding box: the share of its area in the lower half (about
   3/4 for an apex-up triangle, 1/2 for circles and squares) and its fill ratio (1 for a square, about pi/4
   for a circle); its size is the nearest size fraction to max(width, height) / cell; its cell is the cell
   holding the bounding box centre.
4. The background is white, grey or stripes by the share of white among the background pixels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scene import GREY_RGB, GRID_SIZE, WHITE_RGB, Cell, Scene, ShapesWorldConfig

# Feature thresholds (see the module docstring). Rendered triangles score >= 0.7 on the lower-half share and
# rendered circles <= 0.89 on fill, leaving margins on both sides for noisy images.
TRIANGLE_LOWER_SHARE = 0.6
SQUARE_FILL = 0.93
# A background whose white share lies strictly between these is striped (stripes are half white).
STRIPES_WHITE_SHARE = (0.2, 0.8)


@dataclass(frozen=True)
class Detection:
    """One detected shape. bbox is (x0, y0, x1, y1) in pixel edges, x1 and y1 exclusive (GenEval's box order)."""

    shape: str
    colour: str
    size: str
    cell: Cell
    bbox: tuple[int, int, int, int]
    centre: tuple[float, float]
    area: int
    score: float

    def key(self) -> tuple[Cell, str, str, str]:
        """What a detection says about the scene, comparable with `object_key` of a ShapeInstance."""
        return (self.cell, self.shape, self.colour, self.size)


@dataclass(frozen=True)
class SceneReading:
    """Detections (in raster order of their first pixel) and the estimated background type."""

    detections: tuple[Detection, ...]
    background: str


def _image_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    width, height = image.size
    if width != height or width < 24:
        raise ValueError(f"expected a square image of at least 24 px, got {width}x{height}")
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _components(mask_HW: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (N,) array of flat pixel indices."""
    height, width = mask_HW.shape
    todo = mask_HW.ravel().copy()
    found = []
    for start in np.flatnonzero(todo):
        if not todo[start]:
            continue
        todo[start] = False
        stack, members = [int(start)], []
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, width)
            for q, ok in ((p - 1, x > 0), (p + 1, x < width - 1), (p - width, y > 0), (p + width, y < height - 1)):
                if ok and todo[q]:
                    todo[q] = False
                    stack.append(q)
        found.append(np.array(members))
    return found


def _classify_shape(ys: np.ndarray, xs: np.ndarray, bbox: tuple[int, int, int, int]) -> str:
    x0, y0, x1, y1 = bbox
    mid = (y0 + y1 - 1) / 2
    lower = (np.count_nonzero(ys > mid) + 0.5 * np.count_nonzero(ys == mid)) / len(ys)
    if lower > TRIANGLE_LOWER_SHARE:
        return "triangle"
    fill = len(ys) / ((x1 - x0) * (y1 - y0))
    return "square" if fill >= SQUARE_FILL else "circle"


def _background(nearest_N: np.ndarray, is_background_N: np.ndarray, white_index: int) -> str:
    total = np.count_nonzero(is_background_N)
    if total == 0:
        return "unknown"
    white_share = np.count_nonzero(is_background_N & (nearest_N == white_index)) / total
    low, high = STRIPES_WHITE_SHARE
    if white_share >= high:
        return "white"
    return "grey" if white_share <= low else "stripes"


def read_scene(
    image: Image.Image,
    world_config: ShapesWorldConfig | None = None,
    *,
    max_colour_distance: float = 120.0,
    min_area_fraction: float = 0.25,
) -> SceneReading:
    """Detect every shape in a (square) shapes-world image and estimate its background."""
    config = world_config or ShapesWorldConfig()
    pixels_HW3 = _image_array(image)
    size = pixels_HW3.shape[0]
    names = config.colours
    references_K3 = np.array([rgb for _, rgb in config.palette] + [WHITE_RGB, GREY_RGB], dtype=np.float32)
    flat_N3 = pixels_HW3.reshape(-1, 3)
    dist2_NK = ((flat_N3[:, None, :] - references_K3[None, :, :]) ** 2).sum(-1)
    nearest_N = dist2_NK.argmin(1)
    close_N = dist2_NK[np.arange(len(nearest_N)), nearest_N] <= max_colour_distance**2
    is_shape_N = close_N & (nearest_N < len(names))
    is_background_N = close_N & (nearest_N >= len(names))

    cell = size / GRID_SIZE
    smallest = min(config.size_fraction.values()) * cell
    min_area = min_area_fraction * 0.5 * smallest * smallest
    fractions = config.size_fraction
    detections = []
    for members in _components(is_shape_N.reshape(size, size)):
        if len(members) < min_area:
            continue
        ys, xs = np.divmod(members, size)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        colour_index, votes = Counter(nearest_N[members].tolist()).most_common(1)[0]
        extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) / cell
        centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        row = min(int(centre[1] // cell), GRID_SIZE - 1)
        col = min(int(centre[0] // cell), GRID_SIZE - 1)
        detections.append(
            Detection(
                shape=_classify_shape(ys, xs, bbox),
                colour=names[colour_index],
                size=min(fractions, key=lambda name: abs(fractions[name] - extent)),
                cell=(row, col),
                bbox=bbox,
                centre=centre,
                area=len(members),
                score=votes / len(members),
            )
        )
    return SceneReading(tuple(detections), _background(nearest_N, is_background_N, len(names)))


def detect(image: Image.Image, world_config: ShapesWorldConfig | None = None, **options: float) -> list[Detection]:
    """The shapes found in an image (see `read_scene` for the options)."""
    return list(read_scene(image, world_config, **options).detections)


def object_key(obj) -> tuple[Cell, str, str, str]:
    """(cell, shape, colour, size) of a ShapeInstance, the same tuple as `Detection.key()`."""
    return (obj.cell, obj.shape, obj.colour, obj.size)


def matches_scene(reading: SceneReading, scene: Scene) -> bool:
    """True when the image shows exactly the scene: same objects (as a multiset) and the same background."""
    detected = sorted(d.key() for d in reading.detections)
    expected = sorted(object_key(o) for o in scene.objects)
    return detected == expected and reading.background == scene.background
