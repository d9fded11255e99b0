"""The prompt-shuffled baseline of the shapes evaluation: what ignoring the prompt scores."""

from __future__ import annotations

from vargpt.data.shapes import ShapesWorld
from vargpt.evaluation.shapes_eval import prompt_shuffled_baseline
from vargpt.evaluation.shapes_scoring import evaluate_generated_image


def _rows(world: ShapesWorld, category: str, count: int):
    items = [world.t2i_prompt(category, "validation") for _ in range(count)]
    rows = [{"meta": {"category": category, "geneval": item.metadata}} for item in items]
    return rows, [world.render(item.scene) for item in items]


def test_ground_truth_passes_its_own_prompts_and_fewer_shuffled_ones():
    world = ShapesWorld(3, image_size=32)
    drawn = []
    for category in ("colors", "position", "counting"):
        rows, images = _rows(world, category, 12)
        assert all(evaluate_generated_image(i, r["meta"]["geneval"])[0] for r, i in zip(rows, images, strict=True))
        drawn += list(zip(rows, images, strict=True))
    baseline = prompt_shuffled_baseline(drawn)
    assert set(baseline) == {"overall", "colors", "position", "counting"}
    assert baseline["overall"] < 0.6  # another prompt's scene rarely satisfies this prompt


def test_a_prompt_independent_image_scores_the_same_either_way():
    world = ShapesWorld(4, image_size=32)
    rows, images = _rows(world, "single_object", 10)
    same = images[0]
    own = sum(evaluate_generated_image(same, r["meta"]["geneval"])[0] for r in rows) / len(rows)
    assert prompt_shuffled_baseline([(r, same) for r in rows])["overall"] == own
    assert prompt_shuffled_baseline([(rows[0], same)]) == {}  # a lone prompt has no other to be judged against
