"""A recipe's DPO pairs from a world, judged by the scorer the caller passes in."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from PIL import Image

import vargpt.training
from vargpt.shapes.world import GENEVAL_CATEGORIES, ShapesWorld
from vargpt.training.preference_pairs import PromptRow, build_preference_pairs


def _pairs(tmp_path, scorer, losers="other_prompts", generate=None, count=4):
    world = ShapesWorld(11, image_size=32)
    path = build_preference_pairs(
        world,
        GENEVAL_CATEGORIES,
        scorer,
        tmp_path,
        count=count,
        losers=losers,
        image_size=32,
        seed=0,
        generate=generate,
    )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, json.loads((tmp_path / "pairs_stats.json").read_text())


def test_the_scorer_decides_which_losers_make_pairs_and_sees_each_prompt_row(tmp_path):
    seen = []

    def never_satisfied(image, row):
        seen.append(row)
        return False

    rows, stats = _pairs(tmp_path / "all", never_satisfied)
    assert len(rows) == stats["pairs"] == 4 and stats["skipped_loser_satisfies_prompt"] == 0
    assert all(isinstance(r, PromptRow) and r.metadata["tag"] in GENEVAL_CATEGORIES for r in seen)
    for row in rows:
        chosen, rejected = (Image.open(tmp_path / "all" / name) for name in row["images"])
        assert chosen.size == rejected.size == (32, 32)
    rows, stats = _pairs(tmp_path / "none", lambda image, row: True)
    assert rows == [] and stats["skipped_loser_satisfies_prompt"] > 0
    assert stats["prompts_drawn"] == 4 * 4  # gives up after four prompts per pair asked for


def test_model_samples_are_drawn_exactly_when_the_losers_use_them(tmp_path):
    def generate(prompts, seed=None):
        return [Image.new("RGB", (64, 64), (255, 0, 255)) for _ in prompts]

    rows, stats = _pairs(tmp_path, lambda image, row: False, losers="own_samples", generate=generate)
    assert len(rows) == 4 and stats["losers_from_other_prompts"] is None
    assert Image.open(tmp_path / rows[0]["images"][1]).size == (32, 32)  # resized to the world's images
    with pytest.raises(ValueError, match="need model samples"):
        _pairs(tmp_path, lambda image, row: False, losers="own_samples")
    with pytest.raises(ValueError, match="take no model samples"):
        _pairs(tmp_path, lambda image, row: False, generate=generate)
    with pytest.raises(ValueError, match="losers must be one of"):
        _pairs(tmp_path, lambda image, row: False, losers="random")


def test_training_code_imports_no_scoring_or_evaluation_of_the_shapes_world():
    """The world's judgements reach training as callables (`RecipeJudges`, `--scorer`), never as imports."""
    banned = ("scoring", "detector", "evaluate", "judges", "recipe")
    for path in Path(vargpt.training.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shapes."):
                assert node.module.split(".")[1] not in banned, f"{path.name} imports {node.module}"
