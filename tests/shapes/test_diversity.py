"""The distinct-sample rate (issue 28, item 3) and the varied layout that gives a prompt several pictures."""

from __future__ import annotations

import json

import pytest

from vargpt.shapes.diversity import distinct_samples
from vargpt.shapes.scene import ShapesWorldConfig
from vargpt.shapes.world import ShapesWorld


class _Sampler:
    """Draws each prompt's ground truth afresh per sample (varied) or the same picture every time (fixed)."""

    def __init__(self, metadata_by_prompt, layout: str) -> None:
        self.world = ShapesWorld(0, config=ShapesWorldConfig(generation_layout=layout))
        self.metadata = metadata_by_prompt

    def generate(self, prompts, num_images, seed):
        images = []
        for prompt in prompts:
            for _ in range(num_images):
                images.append(self.world.render(self.world.scene_for_prompt(self.metadata[prompt], "train")))
        return images


def _rows(n=5):
    world = ShapesWorld(1)
    items = [world.t2i_prompt("colors", "train") for _ in range(n)]
    return [{"messages": [{"role": "user", "content": i.prompt}], "meta": {"geneval": i.metadata}} for i in items], {
        i.prompt: i.metadata for i in items
    }


@pytest.mark.parametrize(("layout", "varies"), [("canonical", False), ("varied", True)])
def test_varied_samples_differ_and_still_follow_the_prompt(layout, varies):
    rows, metadata = _rows()
    report = distinct_samples(
        _Sampler(metadata, layout), rows, samples_per_prompt=4, prompts=3, batch_size=8, seed=0, to_world=lambda i: i
    )
    assert report["accuracy"] == 1.0 and report["prompts"] == len({r["messages"][0]["content"] for r in rows[:3]})
    if varies:
        assert report["distinct_images"] > 0.5 and report["distinct_correct_scenes"] > 0.5
    else:
        assert report["distinct_images"] == report["distinct_scenes"] == 0.25


def test_one_sample_per_prompt_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        distinct_samples(None, [], samples_per_prompt=1, prompts=1, batch_size=1, seed=0, to_world=None)


def test_the_varied_layout_keeps_relations_and_counts():
    world = ShapesWorld(2, config=ShapesWorldConfig(generation_layout="varied"))
    metadata = {
        "tag": "position",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["above", 0]}],
    }
    scenes = {world.scene_for_prompt(metadata, "train").key for _ in range(60)}
    assert len(scenes) > 6
    for key in scenes:
        assert json.dumps(key)  # scene keys are plain strings
