"""The shapes world's judgements for training: what `vargpt.training` asks of a world and may not import itself.

A recipe run (`training.runner`) scores its DPO losers, validates each stage and checks the image tokenizer's
reconstructions through `RecipeJudges`; `vargpt dpo-pairs --scorer shapes` drops losers through `ShapesScorer`.
Both are built here from the world's detector and GenEval rules, so training code holds no evaluation code and a
world other than this one plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..training.preference_pairs import PromptRow
from ..training.runner import RecipeJudges
from .detector import matches_scene, read_scene
from .evaluate import evaluate_split
from .scene import Scene
from .scoring import evaluate_generated_image


class ShapesScorer:
    """The shapes-world detector and GenEval rules on the row's metadata (`tag`, `include`, `exclude`)."""

    def __init__(self, world_config: Any = None) -> None:
        self.world_config = world_config

    def check(self, row: PromptRow) -> None:
        """Refuse a row without GenEval metadata before any model loads."""
        if not isinstance(row.metadata.get("include"), list):
            raise ValueError(
                f"scorer 'shapes' reads GenEval metadata, and prompt {row.index} ({row.prompt!r}) has no "
                '"include" list: give the prompts as JSONL rows with tag/include/exclude'
            )

    def __call__(self, image: Image.Image, row: PromptRow) -> bool:
        correct, _ = evaluate_generated_image(image, row.metadata, self.world_config)
        return correct


def validate_stage(
    pipeline: Any, data: Path, *, rows: int, samples_path: Path, seed: int, progress: bool
) -> dict[str, Any]:
    """A stage's validation: the shapes report on the run's validation split, `rows` rows per task."""
    return evaluate_split(
        pipeline, data / "validation.jsonl", limit=rows, grid_path=samples_path, progress=progress, seed=seed
    )


def detector_exact_match(images: Sequence[Image.Image], scenes: Sequence[Scene]) -> float:
    """The share of `images` the detector reads back as exactly their `scenes`."""
    return sum(matches_scene(read_scene(image), scene) for image, scene in zip(images, scenes, strict=True)) / len(
        scenes
    )


def shapes_judges() -> RecipeJudges:
    """The judges of a shapes-world recipe run (what `vargpt train` passes to `training.runner.run_recipe`)."""
    return RecipeJudges(scorer=ShapesScorer(), validate=validate_stage, read_back=detector_exact_match)
