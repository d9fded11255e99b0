"""The trained shapes-world model that ships inside the package (issue: a shipped, working default model)."""

from __future__ import annotations

import json

import pytest

from vargpt import VARGPTPipeline
from vargpt.pipeline import default_model_name, shipped_model_path
from vargpt.shapes.detector import read_scene
from vargpt.shapes.scene import Scene, ShapeInstance

NAME = "vargpt-shapes-tiny"


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained(NAME)


def test_the_model_ships_as_safetensors_within_the_size_limit():
    folder = shipped_model_path(NAME)
    assert folder is not None, "the trained shapes model must ship in src/vargpt/models/"
    weights = list(folder.glob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) <= 50 * 2**20
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    assert default_model_name() == NAME  # every command's default


def test_model_and_processor_load_it_by_name_as_the_pipeline_does(pipe):
    from vargpt import VARGPTForConditionalGeneration, VARGPTProcessor

    model = VARGPTForConditionalGeneration.from_pretrained(NAME)
    assert model.config.to_dict() == pipe.model.config.to_dict()
    processor = VARGPTProcessor.from_pretrained(NAME)
    assert processor.chat_template == pipe.processor.chat_template


def test_it_loads_with_its_own_image_settings(pipe):
    settings = json.loads((shipped_model_path(NAME) / "image_generation_config.json").read_text())
    assert pipe.image_config.to_dict() == {**pipe.image_config.to_dict(), **settings}
    assert pipe.image_config.uncond_mode == "null_prompt"


def test_it_draws_varied_scenes_of_its_world(pipe):
    # trained weights draw shapes the detector reads, different ones per seed; the random `tiny` preset's
    # noise reads as the same single blob every time. (How well the drawings follow their prompts is what
    # `vargpt eval shapes` measures; the README gives the numbers.)
    prompts = [f"a photo of a {shape}" for shape in ("circle", "square", "triangle")] * 2
    images = pipe.generate(prompts, seed=[11, 12, 13, 14, 15, 16])
    readings = [tuple(d.key() for d in read_scene(image).detections) for image in images]
    assert sum(bool(r) for r in readings) >= 4
    assert len(set(readings)) >= 4


def test_it_answers_about_an_image_in_words(pipe):
    from vargpt.shapes.render import render
    from vargpt.shapes.scene import ShapesWorldConfig

    scene = render(Scene((ShapeInstance((1, 1), "square", "green", "large"),)), ShapesWorldConfig(), 32)
    answer = pipe.chat("Which shape is the green object?", images=[scene], max_new_tokens=8)
    assert answer.strip().rstrip(".").lower() in {"circle", "square", "triangle"}  # a word of its world
