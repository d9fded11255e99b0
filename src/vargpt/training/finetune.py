"""`vargpt finetune`: SFT (or DPO) of any checkpoint on your own sharegpt data, one stage at a time.

Runs under `accelerate launch` unchanged (the Trainer handles the processes); an interrupted run resumes
from its last complete checkpoint when started again with the same `--out`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from ..rope_index import FORWARD_POSITIONS
from .checkpointing import CompleteCheckpointCallback, last_complete_checkpoint
from .stages import STAGES, apply_stage
from .trainer import ImageDPOTrainer, VARGPTTrainer, device_arguments


@dataclass
class FinetuneArgs:
    model: str
    data: list[str]
    out: str
    stage: str = "stage3-decoder"
    trainable: list[str] | None = None
    resolution: int | None = None
    steps: int = 100
    batch_size: int = 4
    learning_rate: float | None = None
    gradient_accumulation_steps: int = 1
    save_steps: int = 50
    logging_steps: int = 1
    seed: int = 0
    bf16: bool = False
    beta: float = 0.1
    chosen_nll_weight: float = 0.0
    strict_data: bool = False
    no_image_noise: bool = False
    positions: str | None = None
    cpu: bool = False
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or preset")
    parser.add_argument("--data", required=True, action="append", help="sharegpt JSON/JSONL (repeatable)")
    parser.add_argument("--out", required=True, help="output folder (resumes if it holds checkpoints)")
    parser.add_argument("--stage", default="stage3-decoder", choices=sorted(STAGES))
    parser.add_argument("--trainable", nargs="+", default=None, help="override the stage's parameter prefixes")
    parser.add_argument("--resolution", type=int, default=None, help="generation-target pixels (default: model's)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the stage's")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (dpo stages)")
    parser.add_argument(
        "--chosen-nll-weight",
        type=float,
        default=0.0,
        help="add this multiple of the winners' per-bit NLL to the DPO loss (RPO; 0: plain DPO)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--strict-data", action="store_true", help="fail on the first bad row instead of skipping")
    parser.add_argument(
        "--no-image-noise",
        action="store_true",
        help="turn off bitwise self-correction and condition dropout (exactly reproducible across process counts)",
    )
    parser.add_argument(
        "--positions",
        default=None,
        choices=FORWARD_POSITIONS,
        help="LLM rotary positions of rows with understanding images: mrope (as generate) or sequential (what "
        "the published checkpoint was trained with); default: the model's forward_positions, saved with it",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU even where a GPU is present (CPU process groups: gloo)"
    )


def from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    return FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in FinetuneArgs.__dataclass_fields__})


def run_finetune(args: FinetuneArgs) -> dict:
    from ..data.collator import PreferenceCollator, SFTCollator
    from ..data.formats import load_preference_dataset, load_sft_dataset
    from ..pipeline import VARGPTPipeline

    set_seed(args.seed)
    pipe = VARGPTPipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32, seed=args.seed)
    model, processor = pipe.model, pipe.processor
    if args.no_image_noise:
        model.config.bit_flip_max_prob = 0.0
        model.config.visual_decoder_config.cond_drop_rate = 0.0
    if args.positions is not None:
        model.config.forward_positions = args.positions
    plan = STAGES[args.stage]
    if args.trainable:
        plan = plan.with_trainable(*args.trainable)
    counts = apply_stage(model, plan)
    model.train()
    resolution = args.resolution or model.config.image_resolution
    collator_args = {
        "image_gen_resolution": resolution,
        "num_image_gen_pad_tokens": model.num_image_gen_pad_tokens(model.generation_schedule(resolution)),
        "max_length": model.config.text_config.max_position_embeddings,
    }
    loader = load_preference_dataset if plan.kind == "dpo" else load_sft_dataset
    dataset, report = loader(args.data, strict=args.strict_data)
    if report.skipped_rows:
        print(f"data: {report}")
    if len(dataset) == 0:
        raise ValueError(f"no usable rows in {args.data}: {report}")
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate if args.learning_rate is not None else plan.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        **device_arguments(force_cpu=args.cpu),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=args.quiet,
    )
    common = {
        "model": model,
        "args": training_args,
        "train_dataset": dataset,
        "callbacks": [CompleteCheckpointCallback()],
    }
    if plan.kind == "dpo":
        trainer = ImageDPOTrainer(
            **common,
            data_collator=PreferenceCollator(processor, **collator_args),
            beta=args.beta,
            chosen_nll_weight=args.chosen_nll_weight,
        )
    else:
        trainer = VARGPTTrainer(**common, data_collator=SFTCollator(processor, **collator_args))
    resume = last_complete_checkpoint(args.out) if trainer.is_world_process_zero() else None
    if resume is None:
        resume = last_complete_checkpoint(args.out, remove_incomplete=False)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"stage": plan.name, "trainable": counts["trainable"], "steps": args.steps, "losses": losses}
    if trainer.is_world_process_zero():
        final = Path(args.out) / "final"
        model.save_pretrained(final)
        processor.save_pretrained(final)
        (Path(args.out) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return result
