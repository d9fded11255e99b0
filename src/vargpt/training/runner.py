"""`vargpt train --recipe NAME`: data, tokenizer, then every stage, resumable at each level.

Layout of a run folder:
    data/                 shapes-world splits (sharegpt JSONL + PNGs), one JSONL per task as well
    tokenizer/            vae.safetensors, metrics.json, loss.png, samples.png (originals over reconstructions)
    vision/               visual.safetensors (the scene-reading pretrained ViT), metrics.json, loss.png
    stages/NN-name/       model/ (checkpoint in the original layout), metrics.json, loss.png, samples.png,
                          trainer/checkpoint-N (resumable; only complete ones are resumed)
    final/                model + processor: loadable with VARGPTPipeline.from_pretrained
    summary.json

A finished step is skipped on a re-run; an interrupted stage resumes from its last complete checkpoint
with the same data order and random state (transformers' Trainer restores both). Staging folders of saves
killed midway (`.final.writing-*`, `.model.writing-*`, ...) are removed when the run starts or resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments, set_seed
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

from ..checkpoint import atomic_directory_write, remove_staging_folders
from ..configuration import VARGPTConfig
from ..data.formats import load_preference_dataset, load_sft_dataset
from ..generation.config import DEFAULT_IMAGE_PRESET, ImageGenerationConfig
from ..modeling import VARGPTForConditionalGeneration
from ..pipeline import VARGPTPipeline
from ..processing import VARGPTProcessor, postprocess_generated, preprocess_generation_target
from ..shapes.broad_dataset import BroadPromptWorld
from ..shapes.scene import GRID_SIZE, Scene
from ..shapes.splits import recipe_world_config, write_recipe_splits
from ..shapes.world import ShapesWorld
from ..tokenization import (
    DEFAULT_SYSTEM_PROMPT,
    SHAREGPT_IMAGE_GEN_PLACEHOLDER,
    SHAREGPT_IMAGE_PLACEHOLDER,
    build_tiny_tokenizer,
    learn_tiny_merges,
)
from .plots import image_rows, loss_curve
from .precision import warn_if_bf16_is_slow_here
from .preference_pairs import PromptScorer, build_preference_pairs, draws_own_samples
from .recipe import GENEVAL_CATEGORIES, RecipeSpec, StageSpec
from .stage_trainer import StageSetup, build_stage_trainer, stage_training_arguments, train_resuming
from .stages import STAGES, apply_stage, get_stage
from .vae_training import psnr_db, reconstruct, train_vae
from .vision_pretraining import (
    RenderedScenes,
    SceneLabels,
    SceneReadingCollator,
    cells_aligned,
    pretrain_scene_reading,
)

DONE = "DONE"


class StageValidation(Protocol):
    """A stage's validation: scores `pipeline` (the stage's model with its image settings) on the run's
    `data`, may draw a sample grid to `samples_path`, and returns the report stored as the stage's
    `metrics["validation"]`."""

    def __call__(
        self, pipeline: VARGPTPipeline, data: Path, *, rows: int, samples_path: Path, seed: int, progress: bool
    ) -> dict[str, Any]: ...


class SceneReadBack(Protocol):
    """The share of `images` (reconstructions) read back as exactly their `scenes`."""

    def __call__(self, images: Sequence[Image.Image], scenes: Sequence[Scene]) -> float: ...


@dataclass(frozen=True)
class RecipeJudges:
    """The judgements a recipe run asks of its world, passed in by the caller so that training holds no
    evaluation code: whether an image satisfies a prompt (DPO losers), each stage's validation, and how many
    of the image tokenizer's reconstructions still read as their scenes. `vargpt.shapes.recipe` has the shapes
    world's."""

    scorer: PromptScorer
    validate: StageValidation
    read_back: SceneReadBack


def _done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def _mark_done(folder: Path, metrics: dict[str, Any]) -> None:
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))


def build_processor(spec: RecipeSpec, data: Path | None = None) -> VARGPTProcessor:
    """The tiny tokenizer (with the merges learned from `data`'s training split, if the recipe asks for them)
    and a ViT input size fixed by the recipe (small images, a few patches)."""
    merges: list[tuple[str, str]] = []
    if spec.text_tokenizer_merges:
        if data is None:
            raise ValueError("this recipe learns tokenizer merges from its data: pass the data folder")
        merges = learn_text_merges(spec, data)
    pixels = spec.processor_pixels
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    return VARGPTProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(merges))


def learn_text_merges(spec: RecipeSpec, data: Path) -> list[tuple[str, str]]:
    """Merges learned from the training conversations as the chat template writes them (roles and the default
    system prompt included); cached in `data/text_merges.json` so every stage and a resumed run agree."""
    cache = data / "text_merges.json"
    if cache.is_file():
        return [tuple(pair) for pair in json.loads(cache.read_text())]
    texts: list[str] = []
    for line in (data / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        texts.append(f"system\n{DEFAULT_SYSTEM_PROMPT}")
        for message in messages:
            content = message["content"].replace(SHAREGPT_IMAGE_PLACEHOLDER, "")
            texts.append(f"{message['role']}\n{content.replace(SHAREGPT_IMAGE_GEN_PLACEHOLDER, '')}")
    merges = learn_tiny_merges(texts, spec.text_tokenizer_merges)
    partial = cache.with_suffix(".partial")
    partial.write_text(json.dumps(merges))
    partial.replace(cache)  # atomic: a killed run never leaves a truncated merges file behind
    return merges


def prepare_data(spec: RecipeSpec, folder: Path) -> Path:
    """Write the shapes-world splits once, plus one JSONL per task so stages can pick their mixture (the same
    files `vargpt data shapes` writes)."""
    if _done(folder):
        return folder
    _mark_done(folder, {"rows": write_recipe_splits(spec.data, spec.seed, folder)})
    return folder


def _training_args(spec: RecipeSpec, folder: Path, steps: int, batch: int, lr: float, **extra) -> TrainingArguments:
    """A recipe step's arguments: the stage conventions with the recipe's seed and precision."""
    return stage_training_arguments(
        folder,
        steps=steps,
        batch_size=batch,
        learning_rate=lr,
        seed=spec.seed,
        bf16=spec.bf16,
        warmup_ratio=float(extra.pop("warmup_ratio", 0.1)),
        logging_steps=extra.pop("logging_steps", 10),
        save_steps=extra.pop("save_steps", 200),
        report_to=[],
        dataloader_num_workers=0,
        **extra,
    )


def _pre_stage_args(spec: RecipeSpec, step, folder: Path, progress: bool) -> TrainingArguments:
    """The arguments of a step before the stages (image tokenizer, vision pretraining): `step` gives its steps,
    batch size and learning rate; checkpoints go to `folder/trainer`."""
    return _training_args(
        spec,
        folder / "trainer",
        step.steps,
        step.batch_size,
        step.learning_rate,
        logging_steps=20,
        disable_tqdm=not progress,
    )


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    save_file({k: t.contiguous() for k, t in module.state_dict().items()}, str(path))


# -- tokenizer ------------------------------------------------------------------------------------------


def _render_scenes(spec: RecipeSpec, split: str, count: int, seed_offset: int):
    world = ShapesWorld(spec.seed * 1000 + seed_offset, image_size=spec.data.image_size)
    scenes = [world.sample_scene(split) for _ in range(count)]
    images = [world.render(s) for s in scenes]
    size, ratio = spec.data.image_size, spec.target_resize_ratio
    tensor = torch.stack([preprocess_generation_target(i, size, resize_ratio=ratio) for i in images])
    return scenes, images, tensor


def train_tokenizer(
    spec: RecipeSpec,
    model: VARGPTForConditionalGeneration,
    folder: Path,
    progress: bool = True,
    *,
    read_back: SceneReadBack,
) -> dict[str, Any]:
    """Train `model.vae_local` on rendered scenes (or load it if this step is done); `read_back` (e.g. the
    shapes world's detector) scores the validation reconstructions."""
    weights = folder / "vae.safetensors"
    if _done(folder):
        model.vae_local.load_state_dict(load_file(str(weights)))
        return json.loads((folder / "metrics.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, _, train_images = _render_scenes(spec, "train", spec.tokenizer.scenes, 1)
    val_scenes, val_images, val_tensor = _render_scenes(spec, "validation", 256, 2)
    trainer = train_vae(model.vae_local, train_images, _pre_stage_args(spec, spec.tokenizer, folder, progress))
    recon_B3HW = reconstruct(model.vae_local, val_tensor)
    recon = postprocess_generated(recon_B3HW)
    metrics = {
        "steps": spec.tokenizer.steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "validation_psnr_db": round(psnr_db(recon_B3HW, val_tensor), 2),
        "validation_detector_exact_match": read_back(recon, val_scenes),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }
    _save_weights(model.vae_local, weights)
    loss_curve(trainer.state.log_history, folder / "loss.png", "image tokenizer")
    image_rows([val_images[:12], recon[:12]]).save(folder / "samples.png")
    _mark_done(folder, metrics)
    return metrics


# -- vision encoder -------------------------------------------------------------------------------------


def _rendered(spec: RecipeSpec, split: str, count: int, seed_offset: int) -> RenderedScenes:
    world = ShapesWorld(spec.seed * 1000 + seed_offset, image_size=spec.data.image_size)
    scenes = [world.sample_scene(split) for _ in range(count)]  # understanding scenes; held-out pairs stay out
    return RenderedScenes(scenes, [world.render(s) for s in scenes])


def _warn_unless_aligned(spec: RecipeSpec, grid_h: int, grid_w: int) -> None:
    if not cells_aligned(grid_h, grid_w):
        warnings.warn(
            f"processor_pixels={spec.processor_pixels} gives {grid_h} x {grid_w} merged ViT tokens, which do not tile "
            f"the scene's {GRID_SIZE} x {GRID_SIZE} cells: tokens on cell borders get labels they only half show "
            f"(a multiple of {GRID_SIZE} tokens a side reads scenes far better, e.g. 168 x 168 = 28224 pixels)",
            stacklevel=3,
        )


def pretrain_vision(
    spec: RecipeSpec, model: VARGPTForConditionalGeneration, processor: VARGPTProcessor, folder: Path, progress: bool
) -> dict[str, Any]:
    """Scene-reading pretraining of `model.visual` (or load it if this step is done); see `vision_pretraining`."""
    weights = folder / "visual.safetensors"
    if _done(folder):
        model.visual.load_state_dict(load_file(str(weights)))
        return json.loads((folder / "metrics.json").read_text())
    vision = spec.vision
    if vision is None:
        raise ValueError(f"recipe {spec.name!r} has no vision step to run")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    labels = SceneLabels(ShapesWorld(0, image_size=spec.data.image_size).config)
    run = pretrain_scene_reading(
        model.visual,
        model.config.vision_config.hidden_size,
        SceneReadingCollator(processor.image_processor, labels),
        train=_rendered(spec, "train", vision.scenes, 3),
        validation=_rendered(spec, "validation", 256, 4),
        args=_pre_stage_args(spec, vision, folder, progress),
        position_target=vision.position_target,
    )
    _warn_unless_aligned(spec, *run.token_grid)
    metrics = {
        "steps": vision.steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "token_grid": list(run.token_grid),
        "cells_aligned": cells_aligned(*run.token_grid),
        "validation_reading_before": run.before,
        "validation_reading": run.after,
        "final_loss": run.trainer.state.log_history[-1].get("train_loss"),
    }
    _save_weights(model.visual, weights)
    loss_curve(run.trainer.state.log_history, folder / "loss.png", "ViT scene reading")
    _mark_done(folder, metrics)
    return metrics


# -- stages ---------------------------------------------------------------------------------------------


def _rows_of_categories(rows: Path, categories: tuple[str, ...]) -> Path:
    """A file beside `rows` (image paths are relative to it) with its lines whose text-to-image category is one
    of `categories`, in their order."""
    target = rows.with_name(f"{rows.stem}-{'-'.join(sorted(categories))}.jsonl")
    kept = [line for line in rows.read_text().splitlines() if json.loads(line)["meta"]["category"] in categories]
    if not kept:
        raise ValueError(f"{rows} holds no rows of the categories {list(categories)}")
    # written whole, then renamed: a stage of another run sharing the data folder never reads half a file
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, target)
    return target


def _sft_dataset(
    data: Path, tasks: tuple[str, ...], categories: tuple[str, ...] = (), repeats: dict[str, int] | None = None
):
    """The stage's training rows: each task's file (`repeats[task]` times, default once), concatenated."""
    parts, reports = [], {}
    for task in tasks:
        path = data / f"train-{task}.jsonl"
        if task == "generation" and categories:
            path = _rows_of_categories(path, categories)
        dataset, report = load_sft_dataset(path)
        parts.extend([dataset] * (repeats or {}).get(task, 1))
        reports[task] = report.to_dict()
    return datasets.concatenate_datasets(parts), reports


def _image_settings(spec: RecipeSpec) -> ImageGenerationConfig:
    return ImageGenerationConfig.from_preset(DEFAULT_IMAGE_PRESET, **spec.image_generation)


def _stage_pipeline(spec: RecipeSpec, model, processor, stage: StageSpec) -> VARGPTPipeline:
    """The pipeline a stage samples with (DPO losers, validation): the recipe's image settings with the
    stage's own overrides, at the stage's resolution."""
    settings = _image_settings(spec).updated(**stage.image_generation, resolution=stage.resolution)
    return VARGPTPipeline(model, processor, image_config=settings)


def build_stage_pairs(
    spec: RecipeSpec, stage_index: int, pipeline: VARGPTPipeline | None, scorer: PromptScorer, folder: Path
) -> Path:
    """The DPO stage's pairs (see `preference_pairs`): `pipeline` draws the model's samples where the stage's
    losers use them (else None). Each DPO round (iterative DPO) draws fresh prompts: the world's seed moves on
    with every earlier DPO stage."""
    stage = spec.stages[stage_index]
    rounds_before = sum(STAGES[s.plan].kind == "dpo" for s in spec.stages[:stage_index])
    world = ShapesWorld(
        spec.seed * 1000 + 7 + 1000 * rounds_before,
        image_size=spec.data.image_size,
        config=recipe_world_config(spec.data.image_size, spec.data.generation_layout),
    )
    if spec.data.language == "broad":
        world = BroadPromptWorld(world)  # the pairs' prompts in the language the recipe's SFT rows spoke
    return build_preference_pairs(
        world,
        GENEVAL_CATEGORIES,
        scorer,
        folder,
        count=stage.dpo_pairs,
        losers=stage.dpo_losers,
        image_size=spec.data.image_size,
        seed=spec.seed,
        generate=None if pipeline is None else pipeline.generate,
    )


def _save_loadable(spec: RecipeSpec, model, processor, target: Path) -> None:
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if spec.image_generation:
            _image_settings(spec).save_pretrained(staging)

    atomic_directory_write(target, write)


def _stage_rows(spec, stage_index, model, processor, data, folder, scorer) -> tuple[Any, Any]:
    """The stage's dataset and its data report: preference pairs built now for a DPO stage (sampling with the
    model where its losers need it), the recipe data's task files for an SFT stage."""
    stage = spec.stages[stage_index]
    if STAGES[stage.plan].kind != "dpo":
        return _sft_dataset(data, stage.tasks, stage.categories, stage.task_repeats)
    pipeline = _stage_pipeline(spec, model.eval(), processor, stage) if draws_own_samples(stage.dpo_losers) else None
    pairs = build_stage_pairs(spec, stage_index, pipeline, scorer, folder / "pairs")
    dataset, report = load_preference_dataset(pairs)
    model.train()
    return dataset, report.to_dict()


def run_stage(
    spec: RecipeSpec,
    stage_index: int,
    model,
    processor,
    data: Path,
    folder: Path,
    progress: bool,
    *,
    judges: RecipeJudges,
) -> dict[str, Any]:
    """Train one stage of the recipe on `model` in place, validate it with `judges.validate` and save it
    loadable in `folder/model`; returns (and writes) its metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage = spec.stages[stage_index]
    plan = get_stage(stage.plan, stage.trainable)
    counts = apply_stage(model, plan)
    model.train()
    lr = stage.learning_rate if stage.learning_rate is not None else plan.learning_rate
    args = _training_args(
        spec,
        folder / "trainer",
        stage.steps,
        stage.batch_size,
        lr,
        warmup_ratio=stage.warmup_ratio,
        save_steps=stage.save_steps,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        disable_tqdm=not progress,
    )
    dataset, report = _stage_rows(spec, stage_index, model, processor, data, folder, judges.scorer)
    setup = StageSetup(
        kind=plan.kind,
        resolution=stage.resolution,
        resize_ratio=spec.target_resize_ratio,
        prompt_dropout=stage.prompt_dropout,
        dpo_beta=stage.dpo_beta,
        dpo_chosen_nll_weight=stage.dpo_chosen_nll_weight,
    )
    trainer = build_stage_trainer(model, processor, dataset, args, setup)
    train_resuming(trainer, folder / "trainer")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    validation = judges.validate(
        _stage_pipeline(spec, model, processor, stage),
        data,
        rows=stage.eval_rows,
        samples_path=folder / "samples.png",
        seed=spec.seed,
        progress=progress,
    )
    history = trainer.state.log_history
    metrics = {
        "stage": stage.name,
        "plan": plan.name,
        "trainable_parameters": counts["trainable"],
        "frozen_parameters": counts["frozen"],
        "steps": stage.steps,
        "resolution": stage.resolution,
        "learning_rate": lr,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "final_train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "validation": validation,
        "data_report": report,
    }
    loss_curve(history, folder / "loss.png", f"{stage.name} ({plan.name}, {stage.resolution}px)")
    # model, processor and image settings together, atomically: every stage's checkpoint loads on its own
    # (`VARGPTPipeline.from_pretrained`, `vargpt eval shapes --model .../model`)
    _save_loadable(spec, model, processor, folder / "model")
    _mark_done(folder, metrics)
    return metrics


def run_recipe(spec: RecipeSpec, out_dir: str | Path, *, progress: bool = True, judges: RecipeJudges) -> dict[str, Any]:
    """Run (or resume) a whole recipe; returns the summary that is also written to summary.json.

    `progress=False` also hides transformers' own bars (loading and writing checkpoints) for the run. `judges`
    score DPO losers, validate each stage and read back the tokenizer's reconstructions; training holds no
    evaluation code, so the caller brings its world's (`vargpt.shapes.recipe.shapes_judges()` for a
    shapes-world recipe, which is what `vargpt train` passes)."""
    previous = torch.get_num_threads()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _run_recipe(spec, Path(out_dir), progress, judges)
    finally:
        torch.set_num_threads(previous)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _run_stages(spec: RecipeSpec, model, processor, data: Path, out: Path, progress: bool, judges: RecipeJudges):
    """Every stage in order, a finished one loaded instead of trained; returns the last model and the metrics."""
    metrics = []
    for index, stage in enumerate(spec.stages):
        folder = out / "stages" / f"{index:02d}-{stage.name}"
        remove_staging_folders(folder)
        if _done(folder):
            model = VARGPTForConditionalGeneration.from_pretrained(folder / "model", dtype=torch.float32)
            metrics.append(json.loads((folder / "metrics.json").read_text()))
            continue
        set_seed(spec.seed + index)
        metrics.append(run_stage(spec, index, model, processor, data, folder, progress, judges=judges))
    return model, metrics


def _run_recipe(spec: RecipeSpec, out: Path, progress: bool, judges: RecipeJudges) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    remove_staging_folders(out)
    started = time.perf_counter()
    set_seed(spec.seed)
    (out / "recipe.json").write_text(json.dumps(spec.to_dict(), indent=2))
    warn_if_bf16_is_slow_here(
        spec.bf16,
        not torch.cuda.is_available(),
        "`vargpt train --no-bf16` trains in fp32, whose numbers differ from the bf16 runs reported in the README",
    )
    data = prepare_data(spec, out / "data")
    processor = build_processor(spec, data)
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset(spec.model_preset, **spec.model_overrides))
    summary: dict[str, Any] = {
        "recipe": spec.name,
        "tokenizer": train_tokenizer(spec, model, out / "tokenizer", progress, read_back=judges.read_back),
    }
    if spec.vision is not None:
        summary["vision"] = pretrain_vision(spec, model, processor, out / "vision", progress)
    model, summary["stages"] = _run_stages(spec, model, processor, data, out, progress, judges)
    _save_loadable(spec, model, processor, out / "final")
    summary["wall_seconds_this_run"] = round(time.perf_counter() - started, 1)
    summary["total_stage_seconds"] = math.fsum(s.get("wall_seconds", 0) for s in summary["stages"]) + math.fsum(
        summary[step].get("wall_seconds", 0) for step in ("tokenizer", "vision") if step in summary
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
