"""Training recipes: one JSON file names the model, the data, the tokenizer run and every stage.

Recipes ship inside the package (`vargpt/recipes/<name>.json`) so `vargpt train --recipe NAME` works from
an installed copy; `--recipe PATH` takes any file of the same shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..generation.config import ImageGenerationConfig
from ..shapes.broad import LANGUAGES
from ..shapes.scene import GENERATION_LAYOUTS
from ..shapes.world import GENEVAL_CATEGORIES
from .preference_pairs import DPO_LOSERS
from .stages import STAGES

TASKS = ("understanding", "generation", "editing")
__all__ = ["DPO_LOSERS", "GENEVAL_CATEGORIES", "TASKS", "DataSpec", "RecipeSpec", "StageSpec", "load_recipe"]


@dataclass(frozen=True)
class DataSpec:
    """Rows per split and task of the shapes world (written once, deterministic by seed)."""

    train: dict[str, int]
    validation: dict[str, int]
    test: dict[str, int]
    image_size: int = 32
    # text-to-image targets: "random" (laid out like every other scene) or "canonical" (one layout per object
    # count or relation, large shapes on white: the image loss is then about the prompt; see `vargpt.shapes.world`)
    generation_layout: str = "random"
    # the words of prompts, questions and instructions: "templates" (the first language, a few fixed phrasings
    # per category; exactly the rows it always wrote) or "broad" (a grammar of many phrasings, see
    # `vargpt.shapes.broad`). "broad" allows "conversation" rows in a split (multi-turn rows, trained with the
    # understanding rows) and the `test_paraphrase` split (test scenes in phrasings training never reads).
    language: str = "templates"
    test_paraphrase: dict[str, int] = field(default_factory=dict)


DATA_ROW_KINDS = (*TASKS, "conversation")


def _data_problem(data: DataSpec) -> str | None:
    """What is wrong with a recipe's data section (None: nothing)."""
    if data.generation_layout not in GENERATION_LAYOUTS:
        return f"data.generation_layout must be one of {GENERATION_LAYOUTS}, got {data.generation_layout!r}"
    if data.language not in LANGUAGES:
        return f"data.language must be one of {LANGUAGES}, got {data.language!r}"
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    splits["test_paraphrase"] = data.test_paraphrase
    for name, rows in splits.items():
        if not isinstance(rows, dict):
            return f"data.{name} must map row kinds to counts"
        unknown = sorted(set(rows) - set(DATA_ROW_KINDS))
        if unknown:
            return f"data.{name}: unknown row kinds {unknown}; choose from {DATA_ROW_KINDS}"
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in rows.values()):
            return f"data.{name}: row counts must be non-negative integers, got {rows}"
        if data.language != "broad" and (rows.get("conversation") or (name == "test_paraphrase" and rows)):
            return f"data.{name}: conversation rows and the test_paraphrase split need data.language 'broad'"
    return None


@dataclass(frozen=True)
class TokenizerSpec:
    steps: int
    batch_size: int
    learning_rate: float
    scenes: int = 4096


@dataclass(frozen=True)
class VisionSpec:
    """Scene-reading pretraining of the ViT before the stages (`training.vision_pretraining`): the stand-in for
    the pretrained vision encoder the full model starts from."""

    steps: int
    batch_size: int
    learning_rate: float
    scenes: int = 4096
    # also teach each merged token which cell of the scene grid it lies in (see `vision_pretraining`)
    position_target: bool = False


@dataclass(frozen=True)
class StageSpec:
    """One stage run. `plan` names a freeze plan in `stages.STAGES`; `trainable` overrides its prefixes."""

    name: str
    plan: str
    resolution: int
    steps: int
    batch_size: int
    tasks: tuple[str, ...]
    learning_rate: float | None = None
    trainable: tuple[str, ...] | None = None
    warmup_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    save_steps: int = 200
    dpo_pairs: int = 0
    dpo_beta: float = 0.1
    # weight of the winners' per-bit NLL added to the DPO loss (0: plain DPO); see `trainer.dpo_loss`
    dpo_chosen_nll_weight: float = 0.0
    # DPO losers: "own_samples" (the model's wrong samples, the paper's way), "other_prompts" (ground truth of
    # another prompt of the same category that fails this one) or "own_samples_or_other_prompts" (the first where
    # the model's sample is wrong, the second where it is right)
    dpo_losers: str = "own_samples"
    eval_rows: int = 32
    # share of text-to-image rows whose prompt is emptied (trains null-prompt guidance; SFT stages only)
    prompt_dropout: float = 0.0
    # image settings this stage samples with (DPO losers, its validation), over the recipe's `image_generation`
    image_generation: dict[str, Any] = field(default_factory=dict)
    # text-to-image rows of these GenEval categories only (empty: all); a curriculum stage can concentrate the
    # training signal on one attribute at a time, which a small model from scratch needs to follow prompts
    categories: tuple[str, ...] = ()
    # how many times each task's training rows enter this stage's mix (tasks not named: once). Rows are mixed in
    # proportion to their counts, so a task with few rows (editing) gets few steps unless repeated
    task_repeats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    seed: int
    model_preset: str
    processor_pixels: int
    data: DataSpec
    tokenizer: TokenizerSpec
    stages: tuple[StageSpec, ...]
    bf16: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # generation targets: short side resized to ratio x resolution, then cropped. The original uses 1.125 for
    # photos; drawn scenes at their native size need 1.0 (an upscale-and-crop blurs and shifts the shapes).
    target_resize_ratio: float = 1.125
    # BPE merges the tiny text tokenizer learns from the training split (0: bytes only). Word tokens make prompts
    # several times shorter, which a small model both reads more easily and trains on faster.
    text_tokenizer_merges: int = 0
    # image generation settings the stage evaluations use and the final model ships as its defaults
    # (`image_generation_config.json`), e.g. {"cfg_scale": 1.0} for a model trained without a null-prompt branch
    image_generation: dict[str, Any] = field(default_factory=dict)
    # torch threads for the whole run (None: torch's default). Float sums depend on the thread count, so a run
    # reproduces another bit for bit only with the same count; the shapes recipe pins it to 1.
    threads: int | None = None
    # scene-reading pretraining of the ViT after the tokenizer (None: the stages start from a random ViT)
    vision: VisionSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage(raw: dict[str, Any], index: int) -> StageSpec:
    if not isinstance(raw.get("task_repeats", {}), dict):
        raise ValueError(f"stage {index} of the recipe: task_repeats must map task names to counts")
    try:
        spec = StageSpec(
            **{
                **raw,
                "tasks": tuple(raw["tasks"]),
                "trainable": tuple(raw["trainable"]) if raw.get("trainable") else None,
                "categories": tuple(raw.get("categories", ())),
                "task_repeats": dict(raw.get("task_repeats", {})),
            }
        )
    except (TypeError, KeyError) as err:
        raise ValueError(f"stage {index} of the recipe is malformed: {err}") from err
    if spec.plan not in STAGES:
        raise ValueError(f"stage {spec.name!r}: unknown plan {spec.plan!r}; choose one of {sorted(STAGES)}")
    dpo = STAGES[spec.plan].kind == "dpo"
    for check in (_settings_problem, _categories_problem, _task_repeats_problem):
        problem = check(spec, dpo)
        if problem:
            raise ValueError(problem)
    return spec


def _settings_problem(spec: StageSpec, dpo: bool) -> str | None:
    """What is wrong with a stage's tasks, DPO settings, image settings, prompt dropout or sizes (None: nothing)."""
    where = f"stage {spec.name!r}"
    bad = set(spec.tasks) - set(TASKS)
    if bad:
        return f"{where}: unknown tasks {sorted(bad)}; choose from {TASKS}"
    if dpo and spec.dpo_pairs <= 0:
        return f"{where} is a DPO stage and needs dpo_pairs > 0"
    try:
        ImageGenerationConfig().updated(**spec.image_generation)
    except (TypeError, ValueError) as err:
        return f"{where}: image_generation: {err}"
    if spec.dpo_beta <= 0:
        return f"{where}: dpo_beta must be positive, got {spec.dpo_beta}"
    if spec.dpo_chosen_nll_weight < 0:
        return f"{where}: dpo_chosen_nll_weight must not be negative"
    if spec.dpo_losers not in DPO_LOSERS:
        return f"{where}: dpo_losers must be one of {list(DPO_LOSERS)}, got {spec.dpo_losers!r}"
    if not 0.0 <= spec.prompt_dropout < 1.0:
        return f"{where}: prompt_dropout must lie in [0, 1), got {spec.prompt_dropout}"
    if dpo and spec.prompt_dropout:
        return f"{where}: prompt_dropout applies to SFT stages, not DPO"
    return None


def _categories_problem(spec: StageSpec, dpo: bool) -> str | None:
    where = f"stage {spec.name!r}"
    if spec.categories:
        unknown = sorted(set(spec.categories) - set(GENEVAL_CATEGORIES))
        if unknown:
            return f"{where}: unknown categories {unknown}; choose from {GENEVAL_CATEGORIES}"
        if "generation" not in spec.tasks or dpo:
            return f"{where}: categories select the generation rows of an SFT stage"
    if spec.steps <= 0 or spec.batch_size <= 0:
        return f"{where}: steps and batch_size must be positive"
    return None


def _task_repeats_problem(spec: StageSpec, dpo: bool) -> str | None:
    where = f"stage {spec.name!r}"
    for task, repeats in spec.task_repeats.items():
        if task not in spec.tasks:
            return f"{where}: task_repeats names {task!r}, which is not one of its tasks"
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            return f"{where}: task_repeats[{task!r}] must be a positive integer, got {repeats!r}"
    if spec.task_repeats and dpo:
        return f"{where}: task_repeats apply to SFT stages, not DPO"
    return None


def read_recipe_text(name_or_path: str | Path) -> tuple[str, Path | None]:
    """A recipe's JSON text and the file it came from: a `.json` path, or a packaged recipe by name (no file
    path: it lives inside the installed package)."""
    path = Path(str(name_or_path))
    if path.suffix == ".json" and path.is_file():
        return path.read_text(encoding="utf-8"), path
    packaged = resources.files("vargpt").joinpath("recipes", f"{name_or_path}.json")
    if not packaged.is_file():
        known = sorted(p.name.removesuffix(".json") for p in resources.files("vargpt").joinpath("recipes").iterdir())
        raise FileNotFoundError(f"no recipe {name_or_path!r}: give a JSON file or one of {known}")
    return packaged.read_text(encoding="utf-8"), None


def load_recipe(name_or_path: str | Path) -> RecipeSpec:
    """A packaged recipe by name (e.g. "shapes-tiny") or a JSON file path."""
    text, _ = read_recipe_text(name_or_path)
    raw = json.loads(text)
    try:
        spec = RecipeSpec(
            name=raw["name"],
            seed=int(raw["seed"]),
            model_preset=raw["model_preset"],
            processor_pixels=int(raw["processor_pixels"]),
            data=DataSpec(**raw["data"]),
            tokenizer=TokenizerSpec(**raw["tokenizer"]),
            stages=tuple(_stage(s, i) for i, s in enumerate(raw["stages"])),
            bf16=bool(raw.get("bf16", False)),
            model_overrides=raw.get("model_overrides", {}),
            target_resize_ratio=float(raw.get("target_resize_ratio", 1.125)),
            text_tokenizer_merges=int(raw.get("text_tokenizer_merges", 0)),
            image_generation=dict(raw.get("image_generation", {})),
            threads=None if raw.get("threads") is None else int(raw["threads"]),
            vision=None if raw.get("vision") is None else VisionSpec(**raw["vision"]),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"recipe {name_or_path!s} is malformed: {err}") from err
    for part, values in (("tokenizer", spec.tokenizer), ("vision", spec.vision)):
        if values is not None and min(values.steps, values.batch_size, values.scenes) < 1:
            raise ValueError(f"recipe {name_or_path!s}: {part} steps, batch_size and scenes must be positive")
        if values is not None and not values.learning_rate > 0:
            raise ValueError(f"recipe {name_or_path!s}: {part} learning_rate must be positive")
    if spec.threads is not None and spec.threads < 1:
        raise ValueError(f"recipe {name_or_path!s}: threads must be a positive count, got {spec.threads}")
    problem = _data_problem(spec.data)
    if problem:
        raise ValueError(f"recipe {name_or_path!s}: {problem}")
    ImageGenerationConfig().updated(**spec.image_generation)  # unknown or invalid settings: a clear error now
    return spec
