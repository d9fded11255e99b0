"""One training stage's Trainer, built the same way for `vargpt finetune` and for the recipe runners.

A stage is a freeze plan (`stages.StagePlan`, whose kind picks SFT or DPO), rows, and `TrainingArguments`; what
differs between callers is where those come from (command-line flags, a recipe file), not how the Trainer, its
collator and its checkpoint bookkeeping are put together. Keeping that in one place means a fix to one (the
collator's pad-token count, the complete-checkpoint marker, the resume rule) reaches every entry point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainingArguments

from ..data.collator import PreferenceCollator, SFTCollator
from .resume import CompleteCheckpointCallback, last_complete_checkpoint
from .trainer import ImageDPOTrainer, VARGPTTrainer, device_arguments


def stage_training_arguments(
    output_dir: str | os.PathLike,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    bf16: bool,
    warmup_ratio: float = 0.1,
    force_cpu: bool = False,
    **extra: Any,
) -> TrainingArguments:
    """`TrainingArguments` with the conventions every stage shares (the report's cosine schedule with warm-up, no
    weight decay, two checkpoints kept, data order seeded like the model, collators that need every column);
    `extra` adds or sets the rest (logging and save steps, trackers, DeepSpeed, ...)."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": warmup_ratio,  # a float below 1 is a ratio of max_steps
        "weight_decay": 0.0,
        "save_total_limit": 2,
        "seed": seed,
        "data_seed": seed,
        "bf16": bf16,
        **device_arguments(force_cpu=force_cpu),
        "remove_unused_columns": False,
    }
    return TrainingArguments(**(settings | extra))


@dataclass(frozen=True)
class StageSetup:
    """How a stage's rows become batches and what its loss is: the kind ("sft" or "dpo", from the freeze plan),
    the generation targets' resolution and resize ratio, the SFT prompt dropout, and DPO's settings."""

    kind: str
    resolution: int
    resize_ratio: float = 1.125
    prompt_dropout: float = 0.0
    dpo_beta: float = 0.1
    dpo_chosen_nll_weight: float = 0.0
    dpo_reference: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("sft", "dpo"):
            raise ValueError(f"a stage's kind is 'sft' or 'dpo', got {self.kind!r}")


def collator_settings(model: nn.Module, resolution: int) -> dict[str, Any]:
    """The collator arguments a model decides: its generation pad tokens at `resolution` and its context length
    (a PEFT-wrapped model is read through its base model)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return {
        "image_gen_resolution": resolution,
        "num_image_gen_pad_tokens": base.num_image_gen_pad_tokens(base.generation_schedule(resolution)),
        "max_length": base.config.text_config.max_position_embeddings,
    }


def build_stage_trainer(
    model: nn.Module,
    processor: Any,
    dataset: Any,
    args: TrainingArguments,
    setup: StageSetup,
    callbacks: list[TrainerCallback] | tuple[TrainerCallback, ...] = (),
) -> VARGPTTrainer:
    """A `VARGPTTrainer` (SFT) or `ImageDPOTrainer` (DPO) over `dataset`, with the matching collator and the
    callback that marks complete checkpoints (what `train_resuming` resumes from). The model's freeze plan is
    already applied: a DPO reference snapshots the tensors that train now."""
    collator = collator_settings(model, setup.resolution) | {"resize_ratio": setup.resize_ratio}
    common = {
        "model": model,
        "args": args,
        "train_dataset": dataset,
        "callbacks": [CompleteCheckpointCallback(), *callbacks],
    }
    if setup.kind == "dpo":
        return ImageDPOTrainer(
            **common,
            data_collator=PreferenceCollator(processor, **collator),
            beta=setup.dpo_beta,
            chosen_nll_weight=setup.dpo_chosen_nll_weight,
            reference=setup.dpo_reference,
        )
    sft_collator = SFTCollator(processor, **collator, prompt_dropout=setup.prompt_dropout)
    return VARGPTTrainer(**common, data_collator=sft_collator)


def train_resuming(trainer: VARGPTTrainer, output_dir: str | os.PathLike) -> None:
    """Train from the newest complete checkpoint in `output_dir`, if any. Only the main process removes
    incomplete ones (the others only look), so processes of one launch never race over a folder."""
    resume = last_complete_checkpoint(output_dir) if trainer.is_world_process_zero() else None
    if resume is None:
        resume = last_complete_checkpoint(output_dir, remove_incomplete=False)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
