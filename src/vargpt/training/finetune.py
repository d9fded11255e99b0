"""`vargpt finetune`: SFT (or DPO) of any checkpoint on your own sharegpt data, one stage at a time.

Runs under `accelerate launch` unchanged (the Trainer handles the processes); an interrupted run resumes
from its last complete checkpoint when started again with the same `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import parse_flag_from_env
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_fsdp_enabled
from transformers.modeling_utils import is_local_dist_rank_0

from ..rope_index import FORWARD_POSITIONS
from .resume import CompleteCheckpointCallback, last_complete_checkpoint
from .stages import STAGES, StagePlan, apply_stage
from .trainer import ImageDPOTrainer, VARGPTTrainer, device_arguments

TRAINING_DTYPES = ("float32", "bfloat16")
DPO_REFERENCES = ("auto", "snapshot", "adapter", "copy")


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
    dtype: str | None = None
    gradient_checkpointing: bool = False
    report_to: list[str] | None = None
    dataloader_workers: int = 0
    deepspeed: str | None = None
    warmup_ratio: float = 0.1
    # a prepared dataset (vargpt.data.sources: rows in memory or an endless stream) used instead of `data`
    train_dataset: Any = None
    dpo_reference: str = "auto"
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_parts: str = "both"
    quantize: str | None = None


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
    parser.add_argument(
        "--dtype",
        default=None,
        choices=TRAINING_DTYPES,
        help="dtype the weights load in; default: bfloat16 under DeepSpeed with bf16 (it keeps fp32 master weights in "
        "its optimizer), else float32 (mixed precision autocasts from fp32 weights)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the LLM layers' and the visual decoder blocks' activations in the backward pass",
    )
    parser.add_argument(
        "--report-to",
        nargs="+",
        default=None,
        help="experiment trackers (transformers' names: tensorboard, wandb, ...; default: none)",
    )
    parser.add_argument("--dataloader-workers", type=int, default=0, help="data loading worker processes per rank")
    parser.add_argument(
        "--dpo-reference",
        default="auto",
        choices=DPO_REFERENCES,
        help="how DPO holds its reference: auto (the LoRA base with adapters off, else a snapshot of the trained "
        "tensors), snapshot, adapter, or copy (a whole second model)",
    )
    parser.add_argument(
        "--lora", action="store_true", help="train LoRA adapters instead of the stage's weights; saved merged"
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--lora-parts", default="both", help="llm, decoder or both (default: both)")
    parser.add_argument(
        "--quantize",
        default=None,
        choices=("int8", "int4"),
        help="load the frozen base quantized (bitsandbytes); with --lora and int4 this is QLoRA",
    )
    parser.add_argument(
        "--deepspeed",
        default=None,
        help="a DeepSpeed JSON config, for launchers other than `accelerate launch` with a DeepSpeed config "
        "(torchrun, deepspeed)",
    )


def from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    return FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in FinetuneArgs.__dataclass_fields__})


def training_arguments(args: FinetuneArgs, plan: StagePlan) -> TrainingArguments:
    """The run's `TrainingArguments`. Built before the model: creating them sets up the process group and, under
    DeepSpeed ZeRO-3, the config that makes `from_pretrained` partition each tensor as it loads; under FSDP with
    CPU-RAM-efficient loading, only local rank 0 reads weights and the others wait on the meta device."""
    if args.dataloader_workers < 0:
        raise ValueError(f"--dataloader-workers must not be negative, got {args.dataloader_workers}")
    return TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate if args.learning_rate is not None else plan.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of max_steps
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=args.report_to or "none",
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        **device_arguments(force_cpu=args.cpu),
        remove_unused_columns=False,
        dataloader_num_workers=args.dataloader_workers,
        disable_tqdm=args.quiet,
        deepspeed=args.deepspeed,
        # a streamed dataset: each process keeps its own rows of every global batch (accelerate's default for an
        # IterableDataset, dispatching, slices collated tensors by row, which splits pixel_values wrongly)
        accelerator_config={"dispatch_batches": False},
    )


def training_dtype(requested: str | None, training_args: TrainingArguments) -> torch.dtype:
    """fp32 weights unless asked otherwise, except under DeepSpeed with bf16: DeepSpeed casts the model to bf16
    and keeps its own fp32 master copy, so loading in fp32 would only double the load's memory."""
    if requested is not None:
        return getattr(torch, requested)
    deepspeed_bf16 = training_args.deepspeed_plugin is not None and (
        training_args.bf16 or os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    )
    return torch.bfloat16 if deepspeed_bf16 else torch.float32


def load_for_training(name_or_path: str, dtype: torch.dtype, seed: int, quantization: str | None = None):
    """The model and processor, left where they load (the Trainer places them): a preset builds a seeded random
    model, a checkpoint (folder, shipped name or Hub id) loads through `from_pretrained`, which under ZeRO-3 or
    FSDP never holds the whole model in more than one process."""
    from ..configuration import PRESETS, VARGPTConfig
    from ..hub import resolve_checkpoint
    from ..modeling import VARGPTForConditionalGeneration
    from ..pipeline import preset_processor
    from ..processing import VARGPTProcessor

    if name_or_path in PRESETS and not Path(name_or_path).is_dir():
        if quantization is not None:
            raise ValueError(f"a preset builds random weights: save it first to load it quantized ({name_or_path!r})")
        torch.manual_seed(seed)
        # `_from_config` builds under deepspeed.zero.Init when ZeRO-3 is on
        model = VARGPTForConditionalGeneration._from_config(VARGPTConfig.from_preset(name_or_path), dtype=dtype)
        return model, preset_processor(name_or_path)
    path = resolve_checkpoint(name_or_path)
    if receives_weights_from_rank0():
        # parameters on the meta device, buffers (rotary tables and the like, which no state dict carries) real:
        # FSDP fills the parameters' shards from local rank 0
        config = VARGPTConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = VARGPTForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = VARGPTForConditionalGeneration.from_pretrained(path, dtype=dtype, quantization=quantization)
    return model, VARGPTProcessor.from_pretrained(path)


def receives_weights_from_rank0() -> bool:
    """Whether this process leaves reading the checkpoint to local rank 0: FSDP with CPU-RAM-efficient loading
    (accelerate's `fsdp_cpu_ram_efficient_loading`), which broadcasts rank 0's weights when it shards the model.
    transformers 5 no longer skips the read on the other ranks itself."""
    return is_fsdp_enabled() and not is_local_dist_rank_0()


def distributed_kind(trainer) -> str:
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    if trainer.is_fsdp_enabled:
        return "fsdp"
    return "ddp" if trainer.args.world_size > 1 else "single"


def materialised_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this process holds (meta tensors hold none; a sharded tensor counts its local shard)."""
    total = 0
    for param in model.parameters():
        local = getattr(param, "_local_tensor", param)  # a DTensor's own shard
        local = getattr(local, "ds_tensor", local)  # a ZeRO-3 partition
        if not local.is_meta:
            total += local.numel() * local.element_size()
    return total


def save_final(trainer, model, processor, target: Path) -> None:
    """The trained model in the original layout. Every process takes part in gathering a sharded (FSDP, ZeRO-3)
    state dict; the main process writes it."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        model.save_pretrained(target, state_dict=state_dict)
        processor.save_pretrained(target)


def check_plan(args: FinetuneArgs, training_args: TrainingArguments) -> None:
    """Refuse combinations that would run as something else than asked, before a byte of weights is read."""
    if args.quantize and not args.lora:
        raise ValueError("--quantize trains adapters on a frozen quantized base: add --lora")
    if args.lora and args.trainable:
        raise ValueError("--lora trains adapters on the LLM and decoder layers: drop --trainable")
    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be positive, got {args.lora_rank}")
    sharded = training_args.deepspeed_plugin is not None or parse_flag_from_env("ACCELERATE_USE_FSDP")
    if sharded and not torch.cuda.is_available():
        # accelerate (1.16) enables FSDP and DeepSpeed only on accelerators: CPU processes would silently train
        # as DDP replicas (FSDP) or fail on a batch-size check (DeepSpeed)
        raise ValueError(
            "FSDP and DeepSpeed need GPUs under accelerate; on CPUs launch with configs/accelerate/cpu-2proc.yaml (DDP)"
        )
    if sharded and args.lora:
        raise ValueError("--lora with FSDP or ZeRO-3 is not supported: merging needs the whole model in one process")


def run_finetune(args: FinetuneArgs) -> dict:
    from ..data.collator import PreferenceCollator, SFTCollator
    from ..data.formats import load_preference_dataset, load_sft_dataset

    set_seed(args.seed)
    plan = STAGES[args.stage]
    if args.trainable:
        plan = plan.with_trainable(*args.trainable)
    training_args = training_arguments(args, plan)
    check_plan(args, training_args)
    dtype = training_dtype(args.dtype, training_args)
    model, processor = load_for_training(args.model, dtype, args.seed, quantization=args.quantize)
    loaded_bytes = materialised_bytes(model)
    if args.no_image_noise:
        model.config.bit_flip_max_prob = 0.0
        model.config.visual_decoder_config.cond_drop_rate = 0.0
    if args.positions is not None:
        model.config.forward_positions = args.positions
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        from .lora import LoraSettings, apply_lora, parameter_counts, parse_parts

        settings = LoraSettings(
            rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, parts=parse_parts(args.lora_parts)
        )
        model = apply_lora(model, settings)
        counted = parameter_counts(model)
        counts = {"trainable": counted.trainable, "frozen": counted.total - counted.trainable}
    else:
        counts = apply_stage(model, plan)
    model.train()
    base = model.get_base_model() if args.lora else model
    resolution = args.resolution or base.config.image_resolution
    collator_args = {
        "image_gen_resolution": resolution,
        "num_image_gen_pad_tokens": base.num_image_gen_pad_tokens(base.generation_schedule(resolution)),
        "max_length": base.config.text_config.max_position_embeddings,
    }
    if args.train_dataset is not None:
        dataset = args.train_dataset
    else:
        loader = load_preference_dataset if plan.kind == "dpo" else load_sft_dataset
        dataset, report = loader(args.data, strict=args.strict_data)
        if report.skipped_rows:
            print(f"data: {report}")
        if len(dataset) == 0:
            raise ValueError(f"no usable rows in {args.data}: {report}")
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
            reference=args.dpo_reference,
        )
    else:
        trainer = VARGPTTrainer(**common, data_collator=SFTCollator(processor, **collator_args))
    resume = last_complete_checkpoint(args.out) if trainer.is_world_process_zero() else None
    if resume is None:
        resume = last_complete_checkpoint(args.out, remove_incomplete=False)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "stage": plan.name,
        "trainable": counts["trainable"],
        "steps": args.steps,
        "losses": losses,
        "distributed": distributed_kind(trainer),
        "rank": trainer.args.process_index,
        "parameter_bytes_after_loading": loaded_bytes,
        "parameter_bytes_while_training": materialised_bytes(trainer.model_wrapped),
    }
    out = Path(args.out)
    if args.lora:
        from .lora import merge_lora, save_adapter

        if trainer.is_world_process_zero():
            save_adapter(model, out / "adapter")
            merged = merge_lora(model)
            merged.save_pretrained(out / "final")
            processor.save_pretrained(out / "final")
    else:
        save_final(trainer, model, processor, out / "final")
    if trainer.is_world_process_zero():
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return result
