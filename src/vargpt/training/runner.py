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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments, set_seed
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

from ..checkpoint import atomic_directory_write, remove_staging_folders
from ..configuration import VARGPTConfig
from ..modeling import VARGPTForConditionalGeneration
from ..processing import VARGPTProcessor, preprocess_generation_target
from ..tokenization import (
    DEFAULT_SYSTEM_PROMPT,
    SHAREGPT_IMAGE_GEN_PLACEHOLDER,
    SHAREGPT_IMAGE_PLACEHOLDER,
    build_tiny_tokenizer,
    learn_tiny_merges,
)
from .plots import image_rows, loss_curve
from .recipe import RecipeSpec, StageSpec
from .resume import CompleteCheckpointCallback, last_complete_checkpoint
from .stages import STAGES, apply_stage
from .trainer import ImageDPOTrainer, VARGPTTrainer, device_arguments
from .vae_training import TokenizerTrainingModel, psnr_db, reconstruct

DONE = "DONE"


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


def _world_config(spec: RecipeSpec):
    from ..shapes.splits import recipe_world_config

    return recipe_world_config(spec.data.image_size, spec.data.generation_layout)


def prepare_data(spec: RecipeSpec, folder: Path) -> Path:
    """Write the shapes-world splits once, plus one JSONL per task so stages can pick their mixture (the same
    files `vargpt data shapes` writes)."""
    from ..shapes.splits import write_recipe_splits

    if _done(folder):
        return folder
    _mark_done(folder, {"rows": write_recipe_splits(spec.data, spec.seed, folder)})
    return folder


def _training_args(spec: RecipeSpec, folder: Path, steps: int, batch: int, lr: float, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=float(extra.pop("warmup_ratio", 0.1)),  # a float below 1 is a ratio of max_steps
        weight_decay=0.0,
        logging_steps=extra.pop("logging_steps", 10),
        save_steps=extra.pop("save_steps", 200),
        save_total_limit=2,
        report_to=[],
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=spec.bf16,
        **device_arguments(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **extra,
    )


def _pre_stage_trainer(spec: RecipeSpec, step, model, dataset, collator, folder: Path, progress: bool):
    """The Trainer of a step before the stages (image tokenizer, vision pretraining): `step` gives its steps,
    batch size and learning rate; checkpoints go to `folder/trainer`."""
    args = _training_args(
        spec,
        folder / "trainer",
        step.steps,
        step.batch_size,
        step.learning_rate,
        logging_steps=20,
        disable_tqdm=not progress,
    )
    return VARGPTTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[CompleteCheckpointCallback()]
    )


def _train(trainer, folder: Path) -> None:
    resume = last_complete_checkpoint(folder)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)


# -- tokenizer ------------------------------------------------------------------------------------------


class _Renders(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index]}


def _render_scenes(spec: RecipeSpec, split: str, count: int, seed_offset: int):
    from ..shapes.world import ShapesWorld

    world = ShapesWorld(spec.seed * 1000 + seed_offset, image_size=spec.data.image_size)
    scenes = [world.sample_scene(split) for _ in range(count)]
    images = [world.render(s) for s in scenes]
    size, ratio = spec.data.image_size, spec.target_resize_ratio
    tensor = torch.stack([preprocess_generation_target(i, size, resize_ratio=ratio) for i in images])
    return scenes, images, tensor


def train_tokenizer(
    spec: RecipeSpec, model: VARGPTForConditionalGeneration, folder: Path, progress: bool = True
) -> dict[str, Any]:
    """Train `model.vae_local` on rendered scenes (or load it if this step is done)."""
    from ..processing import postprocess_generated
    from ..shapes.detector import matches_scene, read_scene

    weights = folder / "vae.safetensors"
    if _done(folder):
        model.vae_local.load_state_dict(load_file(str(weights)))
        return json.loads((folder / "metrics.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, _, train_images = _render_scenes(spec, "train", spec.tokenizer.scenes, 1)
    val_scenes, val_images, val_tensor = _render_scenes(spec, "validation", 256, 2)
    vae = model.vae_local
    wrapper = TokenizerTrainingModel(vae)
    trainer = _pre_stage_trainer(
        spec,
        spec.tokenizer,
        wrapper,
        _Renders(train_images),
        lambda rows: {"pixel_values": torch.stack([r["pixel_values"] for r in rows])},
        folder,
        progress,
    )
    _train(trainer, folder / "trainer")
    vae.eval()
    recon_B3HW = reconstruct(vae, val_tensor)
    recon = postprocess_generated(recon_B3HW)
    exact = sum(matches_scene(read_scene(img), scene) for img, scene in zip(recon, val_scenes, strict=True))
    metrics = {
        "steps": spec.tokenizer.steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "validation_psnr_db": round(psnr_db(recon_B3HW, val_tensor), 2),
        "validation_detector_exact_match": exact / len(val_scenes),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(weights))
    loss_curve(trainer.state.log_history, folder / "loss.png", "image tokenizer")
    image_rows([val_images[:12], recon[:12]]).save(folder / "samples.png")
    _mark_done(folder, metrics)
    return metrics


# -- vision encoder -------------------------------------------------------------------------------------


def pretrain_vision(
    spec: RecipeSpec, model: VARGPTForConditionalGeneration, processor: VARGPTProcessor, folder: Path, progress: bool
) -> dict[str, Any]:
    """Scene-reading pretraining of `model.visual` (or load it if this step is done); see `vision_pretraining`."""
    from ..shapes.scene import GRID_SIZE
    from ..shapes.world import ShapesWorld
    from .vision_pretraining import (
        RenderedScenes,
        SceneLabels,
        SceneReadingCollator,
        VisionPretrainingModel,
        cells_aligned,
        reading_accuracy,
    )

    weights = folder / "visual.safetensors"
    if _done(folder):
        model.visual.load_state_dict(load_file(str(weights)))
        return json.loads((folder / "metrics.json").read_text())
    vision = spec.vision
    if vision is None:
        raise ValueError(f"recipe {spec.name!r} has no vision step to run")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def rendered(split: str, count: int, seed_offset: int) -> RenderedScenes:
        world = ShapesWorld(spec.seed * 1000 + seed_offset, image_size=spec.data.image_size)
        scenes = [world.sample_scene(split) for _ in range(count)]  # understanding scenes; held-out pairs stay out
        return RenderedScenes(scenes, [world.render(s) for s in scenes])

    world_config = ShapesWorld(0, image_size=spec.data.image_size).config
    labels = SceneLabels(world_config)
    collator = SceneReadingCollator(processor.image_processor, labels)
    validation = rendered("validation", 256, 4)
    validation_batch = collator([validation[i] for i in range(len(validation))])
    # seeded here, not by the run: whether the tokenizer step trained in this process or was loaded from an
    # earlier one changes the global random state, and the read-out head's initial weights must not depend on it
    set_seed(spec.seed)
    wrapper = VisionPretrainingModel(
        model.visual, model.config.vision_config.hidden_size, labels, position_target=vision.position_target
    )
    grid_h, grid_w = wrapper.token_grid(validation_batch["image_grid_thw"])
    aligned = cells_aligned(grid_h, grid_w)
    if not aligned:
        warnings.warn(
            f"processor_pixels={spec.processor_pixels} gives {grid_h} x {grid_w} merged ViT tokens, which do not tile "
            f"the scene's {GRID_SIZE} x {GRID_SIZE} cells: tokens on cell borders get labels they only half show "
            f"(a multiple of {GRID_SIZE} tokens a side reads scenes far better, e.g. 168 x 168 = 28224 pixels)",
            stacklevel=2,
        )
    wrapper.eval()
    before = reading_accuracy(wrapper, validation_batch)
    wrapper.train()
    trainer = _pre_stage_trainer(spec, vision, wrapper, rendered("train", vision.scenes, 3), collator, folder, progress)
    _train(trainer, folder / "trainer")
    wrapper.eval()
    metrics = {
        "steps": vision.steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "token_grid": [grid_h, grid_w],
        "cells_aligned": aligned,
        "validation_reading_before": before,
        "validation_reading": reading_accuracy(wrapper, validation_batch),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }
    save_file({k: t.contiguous() for k, t in model.visual.state_dict().items()}, str(weights))
    loss_curve(trainer.state.log_history, folder / "loss.png", "ViT scene reading")
    _mark_done(folder, metrics)
    return metrics


# -- stages ---------------------------------------------------------------------------------------------


def _pad_tokens(model, resolution: int) -> int:
    return model.num_image_gen_pad_tokens(model.generation_schedule(resolution))


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
    import datasets

    from ..data.formats import load_sft_dataset

    parts, reports = [], {}
    for task in tasks:
        path = data / f"train-{task}.jsonl"
        if task == "generation" and categories:
            path = _rows_of_categories(path, categories)
        dataset, report = load_sft_dataset(path)
        parts.extend([dataset] * (repeats or {}).get(task, 1))
        reports[task] = report.to_dict()
    return datasets.concatenate_datasets(parts), reports


def _image_settings(spec: RecipeSpec):
    from ..generation.config import DEFAULT_IMAGE_PRESET, ImageGenerationConfig

    return ImageGenerationConfig.from_preset(DEFAULT_IMAGE_PRESET, **spec.image_generation)


def _stage_pipeline(spec: RecipeSpec, model, processor, stage: StageSpec):
    """The pipeline a stage samples with (DPO losers, validation): the recipe's image settings with the
    stage's own overrides, at the stage's resolution."""
    from ..pipeline import VARGPTPipeline

    settings = _image_settings(spec).updated(**stage.image_generation, resolution=stage.resolution)
    return VARGPTPipeline(model, processor, image_config=settings)


def _build_preference_pairs(spec: RecipeSpec, stage_index: int, model, processor, folder: Path) -> Path:
    """Winners: the renderer's ground truth for a prompt. Losers (`stage.dpo_losers`): "own_samples", the
    model's own wrong samples for it (the paper's construction); "other_prompts", the ground truth of another
    prompt of the same category that this prompt rejects, which rewards following the prompt rather than drawing
    any clean scene; or "own_samples_or_other_prompts", the model's sample where it is wrong and another prompt's
    ground truth where it is right, so that categories the model already draws right keep pairs (and the
    winners' NLL term) instead of drifting while the round trains only on the others."""
    from ..shapes.scoring import GENEVAL_CATEGORIES, evaluate_generated_image
    from ..shapes.world import ShapesWorld

    folder.mkdir(parents=True, exist_ok=True)
    # each DPO round (iterative DPO) draws fresh prompts: the world's seed moves on with every earlier DPO stage
    stage = spec.stages[stage_index]
    rounds_before = sum(STAGES[s.plan].kind == "dpo" for s in spec.stages[:stage_index])
    world = ShapesWorld(
        spec.seed * 1000 + 7 + 1000 * rounds_before, image_size=spec.data.image_size, config=_world_config(spec)
    )
    samples = stage.dpo_losers in ("own_samples", "own_samples_or_other_prompts")
    others = stage.dpo_losers in ("other_prompts", "own_samples_or_other_prompts")
    pipe = _stage_pipeline(spec, model.eval(), processor, stage) if samples else None
    rows, skipped, index = [], 0, 0
    attempts = 0
    from_other_prompts = 0
    previous: dict[str, Any] = {}  # category -> the last prompt item drawn for it
    while len(rows) < stage.dpo_pairs and attempts < stage.dpo_pairs * 4:
        items = [world.t2i_prompt(GENEVAL_CATEGORIES[(attempts + i) % 6], "train") for i in range(16)]
        attempts += len(items)
        other_items = []  # per item: the previous prompt of its category (its scene is rendered only when used)
        for item in items:
            other_items.append(previous.get(item.metadata["tag"]) if others else None)
            previous[item.metadata["tag"]] = item
        if pipe is not None:
            losers = [
                s.resize((spec.data.image_size,) * 2)
                for s in pipe.generate([it.prompt for it in items], seed=spec.seed + attempts)
            ]
        else:
            losers = [None if other is None else world.render(other.scene) for other in other_items]
        for item, loser, other in zip(items, losers, other_items, strict=True):
            if loser is None:
                continue
            correct, _ = evaluate_generated_image(loser, item.metadata)
            if correct and pipe is not None and other is not None:
                loser = world.render(other.scene)  # the model draws this prompt right: another prompt's scene loses
                correct, _ = evaluate_generated_image(loser, item.metadata)
                from_other_prompts += not correct
            if correct:
                skipped += 1  # the loser satisfies this prompt too: no preference signal
                continue
            chosen, rejected = f"pair{index:05d}_chosen.png", f"pair{index:05d}_rejected.png"
            world.render(item.scene).save(folder / chosen)
            loser.save(folder / rejected)
            rows.append(
                {
                    "conversations": [{"role": "user", "content": item.prompt}],
                    "chosen": {"role": "assistant", "content": "<image_gen>"},
                    "rejected": {"role": "assistant", "content": "<image_gen>"},
                    "images": [chosen, rejected],
                }
            )
            index += 1
    rows = rows[: stage.dpo_pairs]  # the last batch of 16 prompts may overshoot
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = {
        "pairs": len(rows),
        "prompts_drawn": attempts,
        "losers": stage.dpo_losers,
        "skipped_loser_satisfies_prompt": skipped,
        "losers_from_other_prompts": from_other_prompts if pipe is not None and others else None,
    }
    (folder / "pairs_stats.json").write_text(json.dumps(stats))
    return path


def _save_loadable(spec: RecipeSpec, model, processor, target: Path) -> None:
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if spec.image_generation:
            _image_settings(spec).save_pretrained(staging)

    atomic_directory_write(target, write)


def run_stage(
    spec: RecipeSpec, stage_index: int, model, processor, data: Path, folder: Path, progress: bool
) -> dict[str, Any]:
    from ..data.collator import PreferenceCollator, SFTCollator
    from ..data.formats import load_preference_dataset
    from ..shapes.evaluate import evaluate_split

    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage = spec.stages[stage_index]
    plan = STAGES[stage.plan]
    if stage.trainable:
        plan = plan.with_trainable(*stage.trainable)
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
    collator_args = {
        "image_gen_resolution": stage.resolution,
        "num_image_gen_pad_tokens": _pad_tokens(model, stage.resolution),
        "max_length": model.config.text_config.max_position_embeddings,
        "resize_ratio": spec.target_resize_ratio,
    }
    extra: dict[str, Any] = {}
    if plan.kind == "dpo":
        pairs = _build_preference_pairs(spec, stage_index, model, processor, folder / "pairs")
        dataset, report = load_preference_dataset(pairs)
        extra["data_report"] = report.to_dict()
        model.train()
        trainer = ImageDPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=PreferenceCollator(processor, **collator_args),
            callbacks=[CompleteCheckpointCallback()],
            beta=stage.dpo_beta,
            chosen_nll_weight=stage.dpo_chosen_nll_weight,
        )
    else:
        dataset, reports = _sft_dataset(data, stage.tasks, stage.categories, stage.task_repeats)
        extra["data_report"] = reports
        trainer = VARGPTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=SFTCollator(processor, **collator_args, prompt_dropout=stage.prompt_dropout),
            callbacks=[CompleteCheckpointCallback()],
        )
    _train(trainer, folder / "trainer")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    pipe = _stage_pipeline(spec, model, processor, stage)
    evaluation = evaluate_split(
        pipe,
        data / "validation.jsonl",
        limit=stage.eval_rows,
        grid_path=folder / "samples.png",
        progress=progress,
        seed=spec.seed,
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
        "validation": evaluation,
        **extra,
    }
    loss_curve(history, folder / "loss.png", f"{stage.name} ({plan.name}, {stage.resolution}px)")
    # model, processor and image settings together, atomically: every stage's checkpoint loads on its own
    # (`VARGPTPipeline.from_pretrained`, `vargpt eval shapes --model .../model`)
    _save_loadable(spec, model, processor, folder / "model")
    _mark_done(folder, metrics)
    return metrics


def run_recipe(spec: RecipeSpec, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a whole recipe; returns the summary that is also written to summary.json.

    `progress=False` also hides transformers' own bars (loading and writing checkpoints) for the run."""
    previous = torch.get_num_threads()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _run_recipe(spec, out_dir, progress)
    finally:
        torch.set_num_threads(previous)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _run_recipe(spec: RecipeSpec, out_dir: str | Path, progress: bool) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_staging_folders(out)
    started = time.perf_counter()
    set_seed(spec.seed)
    (out / "recipe.json").write_text(json.dumps(spec.to_dict(), indent=2))
    data = prepare_data(spec, out / "data")
    processor = build_processor(spec, data)
    config = VARGPTConfig.from_preset(spec.model_preset, **spec.model_overrides)
    model = VARGPTForConditionalGeneration(config)
    tokenizer_metrics = train_tokenizer(spec, model, out / "tokenizer", progress)
    summary: dict[str, Any] = {"recipe": spec.name, "tokenizer": tokenizer_metrics}
    if spec.vision is not None:
        summary["vision"] = pretrain_vision(spec, model, processor, out / "vision", progress)
    summary["stages"] = []
    for index, stage in enumerate(spec.stages):
        folder = out / "stages" / f"{index:02d}-{stage.name}"
        remove_staging_folders(folder)
        if _done(folder):
            model = VARGPTForConditionalGeneration.from_pretrained(folder / "model", dtype=torch.float32)
            summary["stages"].append(json.loads((folder / "metrics.json").read_text()))
            continue
        set_seed(spec.seed + index)
        summary["stages"].append(run_stage(spec, index, model, processor, data, folder, progress))
    _save_loadable(spec, model, processor, out / "final")
    summary["wall_seconds_this_run"] = round(time.perf_counter() - started, 1)
    summary["total_stage_seconds"] = math.fsum(s.get("wall_seconds", 0) for s in summary["stages"]) + math.fsum(
        summary[step].get("wall_seconds", 0) for step in ("tokenizer", "vision") if step in summary
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
