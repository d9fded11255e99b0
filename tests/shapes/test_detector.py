import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vargpt.shapes.detector import detect, matches_scene, read_scene
from vargpt.shapes.scene import Scene, ShapeInstance, ShapesWorldConfig, all_cells
from vargpt.shapes.world import ShapesWorld


def _noisy(image: Image.Image, seed: int, sigma: float = 0.05, blur: float = 0.5) -> Image.Image:
    """Gaussian blur (radius in px) then Gaussian noise of `sigma` on a [0, 1] scale."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255
    pixels = pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


def _random_scenes(n: int, config: ShapesWorldConfig, seed: int) -> list[Scene]:
    """Any scene the world can draw, held-out pairs included (the detector must read them too)."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        cells = rng.sample(all_cells(), rng.randint(1, config.max_objects))
        objects = [
            ShapeInstance(c, rng.choice(config.shapes), rng.choice(config.colours), rng.choice(config.size_names))
            for c in cells
        ]
        scenes.append(Scene(tuple(objects), rng.choice(config.backgrounds)))
    return scenes


@pytest.mark.parametrize("image_size", [32, 64])
def test_every_single_shape_in_every_cell_is_read_exactly(image_size):
    config = ShapesWorldConfig(image_size=image_size)
    world = ShapesWorld(0, image_size=image_size)
    for cell in all_cells():
        for shape in config.shapes:
            for size in config.size_names:
                for background in config.backgrounds:
                    scene = Scene((ShapeInstance(cell, shape, "blue", size),), background)
                    reading = read_scene(world.render(scene), config)
                    assert matches_scene(reading, scene), (scene, reading)


@pytest.mark.parametrize(("image_size", "n"), [(32, 500), (64, 150)])
def test_detector_reads_rendered_scenes_perfectly(image_size, n):
    config = ShapesWorldConfig(image_size=image_size)
    world = ShapesWorld(0, image_size=image_size)
    wrong = [s for s in _random_scenes(n, config, seed=image_size) if not matches_scene(read_scene(world.render(s)), s)]
    assert wrong == []


@pytest.mark.parametrize(("image_size", "n"), [(32, 200), (64, 60)])
def test_detector_is_robust_to_mild_noise_and_blur(image_size, n):
    config = ShapesWorldConfig(image_size=image_size)
    world = ShapesWorld(0, image_size=image_size)
    scenes = _random_scenes(n, config, seed=image_size + 1)
    wrong = [s for i, s in enumerate(scenes) if not matches_scene(read_scene(_noisy(world.render(s), i)), s)]
    assert wrong == []


def test_detections_report_geometry_consistent_with_the_cell():
    world = ShapesWorld(0, image_size=64)
    scene = Scene(
        (ShapeInstance((0, 2), "triangle", "red", "large"), ShapeInstance((2, 0), "circle", "green", "small")),
        "stripes",
    )
    detections = sorted(detect(world.render(scene)), key=lambda d: d.cell)
    assert [d.cell for d in detections] == [(0, 2), (2, 0)]
    triangle, circle = detections
    x0, y0, x1, y1 = triangle.bbox
    assert 128 / 3 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 / 3
    assert triangle.centre == ((x0 + x1) / 2, (y0 + y1) / 2)
    assert triangle.score == 1.0 and circle.score == 1.0
    assert circle.area < triangle.area * 0.8  # a small circle against a large triangle


def test_background_types_are_estimated_and_blank_images_have_no_shapes():
    world = ShapesWorld(0)
    for background in ("white", "grey", "stripes"):
        reading = read_scene(world.render(Scene((), background)))
        assert reading.detections == () and reading.background == background
    black = Image.new("RGB", (32, 32), (0, 0, 0))
    assert read_scene(black).detections == () and read_scene(black).background == "unknown"


def test_speckles_below_the_minimum_area_are_ignored():
    pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
    pixels[3, 3] = (220, 30, 30)
    pixels[20:22, 20] = (30, 70, 220)
    assert detect(Image.fromarray(pixels)) == []


def test_touching_shapes_of_one_colour_do_not_pass_as_two():
    pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
    pixels[2:9, 2:20] = (220, 30, 30)  # one long bar spanning two cells
    detections = detect(Image.fromarray(pixels))
    assert len(detections) == 1


def test_non_square_or_tiny_images_are_rejected():
    with pytest.raises(ValueError, match="square image"):
        detect(Image.new("RGB", (32, 48), "white"))
    with pytest.raises(ValueError, match="square image"):
        detect(Image.new("RGB", (16, 16), "white"))
    with pytest.raises(ValueError, match="PIL image"):
        detect(np.zeros((32, 32, 3)))
