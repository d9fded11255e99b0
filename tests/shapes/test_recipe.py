"""The shapes world's judges, as a recipe run and `vargpt dpo-pairs --scorer shapes` receive them."""

from __future__ import annotations

import pytest

from vargpt.shapes.recipe import ShapesScorer, detector_exact_match, shapes_judges
from vargpt.shapes.world import ShapesWorld
from vargpt.training.dpo_pairs import load_scorer
from vargpt.training.preference_pairs import PromptRow
from vargpt.training.runner import RecipeJudges


def test_the_judges_score_prompts_and_read_scenes_back():
    judges = shapes_judges()
    assert isinstance(judges, RecipeJudges) and isinstance(judges.scorer, ShapesScorer)
    world = ShapesWorld(5, image_size=32)
    item = world.t2i_prompt("colors", "train")
    row = PromptRow(0, item.prompt, item.metadata)
    assert judges.scorer(world.render(item.scene), row) is True
    other = world.t2i_prompt("counting", "train")
    assert judges.scorer(world.render(other.scene), row) is False or other.metadata == item.metadata
    scenes = [world.sample_scene("train") for _ in range(3)]
    assert judges.read_back([world.render(s) for s in scenes], scenes) == detector_exact_match(
        [world.render(s) for s in scenes], scenes
    )
    assert judges.read_back([world.render(s) for s in scenes], scenes) == 1.0  # clean renders read back exactly


def test_the_built_in_dpo_pairs_scorer_is_the_shapes_scorer_and_checks_its_rows():
    scorer = load_scorer("shapes")
    assert isinstance(scorer, ShapesScorer)
    with pytest.raises(ValueError, match='has no "include" list'):
        scorer.check(PromptRow(3, "a red circle"))
