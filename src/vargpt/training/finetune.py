"""`vargpt finetune`: SFT (or DPO) of any checkpoint on your own sharegpt data, one stage at a time.

Runs under `accelerate launch` unchanged (the Trainer handles the processes); an interrupted run resumes
from its last complete checkpoint when started again with the same `--out`. The flags are `vargpt.cli.training`'s;
each sets the `FinetuneArgs` field of the same name, and `run_finetune` is what the command calls.
"""

from __future__ import annotations

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

from ..configuration import PRESETS, VARGPTConfig
from ..hub import resolve_checkpoint
from ..modeling import VARGPTForConditionalGeneration
from ..pipeline import preset_processor
from ..processing import VARGPTProcessor
from .precision import warn_if_bf16_is_slow_here
from .stage_trainer import StageSetup, build_stage_trainer, stage_training_arguments, train_resuming
from .stages import StagePlan, apply_stage, get_stage

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


def training_arguments(args: FinetuneArgs, plan: StagePlan) -> TrainingArguments:
    """The run's `TrainingArguments`. Built before the model: creating them sets up the process group and, under
    DeepSpeed ZeRO-3, the config that makes `from_pretrained` partition each tensor as it loads; under FSDP with
    CPU-RAM-efficient loading, only local rank 0 reads weights and the others wait on the meta device."""
    if args.dataloader_workers < 0:
        raise ValueError(f"--dataloader-workers must not be negative, got {args.dataloader_workers}")
    return stage_training_arguments(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate if args.learning_rate is not None else plan.learning_rate,
        seed=args.seed,
        bf16=args.bf16,
        warmup_ratio=args.warmup_ratio,
        force_cpu=args.cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        report_to=args.report_to or "none",
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
    """One stage on `args.data` (or `args.train_dataset`), resumed from `args.out` where it holds checkpoints;
    returns the losses and where the weights lived (the sharded-training tests read them)."""
    set_seed(args.seed)
    plan = get_stage(args.stage, args.trainable)
    training_args = training_arguments(args, plan)
    check_plan(args, training_args)
    warn_if_bf16_is_slow_here(
        training_args.bf16, training_args.device.type == "cpu", "drop --bf16 to fine-tune in fp32 on this CPU"
    )
    model, processor = load_for_training(
        args.model, training_dtype(args.dtype, training_args), args.seed, quantization=args.quantize
    )
    loaded_bytes = materialised_bytes(model)
    model, counts = _prepare_model(model, args, plan)
    base = model.get_base_model() if args.lora else model
    setup = StageSetup(
        kind=plan.kind,
        resolution=args.resolution or base.config.image_resolution,
        dpo_beta=args.beta,
        dpo_chosen_nll_weight=args.chosen_nll_weight,
        dpo_reference=args.dpo_reference,
    )
    dataset = args.train_dataset if args.train_dataset is not None else _read_rows(args, plan)
    trainer = build_stage_trainer(model, processor, dataset, training_args, setup)
    train_resuming(trainer, args.out)
    _save_outputs(args, trainer, model, processor)
    return {
        "stage": plan.name,
        "trainable": counts["trainable"],
        "steps": args.steps,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "distributed": distributed_kind(trainer),
        "rank": trainer.args.process_index,
        "parameter_bytes_after_loading": loaded_bytes,
        "parameter_bytes_while_training": materialised_bytes(trainer.model_wrapped),
    }


def _prepare_model(model, args: FinetuneArgs, plan: StagePlan) -> tuple[torch.nn.Module, dict[str, int]]:
    """The loaded model set up as the flags ask (noise, positions, checkpointing), with the stage's parameters
    (or LoRA adapters) trainable and the rest frozen; returns it (PEFT-wrapped under --lora) and the counts."""
    if args.no_image_noise:
        model.config.bit_flip_max_prob = 0.0
        model.config.visual_decoder_config.cond_drop_rate = 0.0
    if args.positions is not None:
        model.config.forward_positions = args.positions
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        # peft loads in seconds: only runs with --lora pay for it (every `vargpt` command line imports this module)
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
    return model, counts


def _read_rows(args: FinetuneArgs, plan: StagePlan):
    """The stage's rows from `args.data`: preference pairs for a DPO plan, conversations otherwise."""
    from ..data.formats import load_preference_dataset, load_sft_dataset  # `datasets`: seconds to import

    loader = load_preference_dataset if plan.kind == "dpo" else load_sft_dataset
    dataset, report = loader(args.data, strict=args.strict_data)
    if report.skipped_rows:
        print(f"data: {report}")
    if len(dataset) == 0:
        raise ValueError(f"no usable rows in {args.data}: {report}")
    return dataset


def _save_outputs(args: FinetuneArgs, trainer, model, processor) -> None:
    """`final/` (merged under --lora, with the adapter beside it) and the log history, from the main process."""
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
