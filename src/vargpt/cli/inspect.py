"""`vargpt inspect`: what a checkpoint (or a preset's architecture) holds, without loading weights.

The checkpoint is named as every loader names it (a folder, a shipped model, a Hub repo id: `vargpt.hub`).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint import compare, read_tensor_shapes
from ..configuration import PRESETS, VARGPTConfig
from ..hub import resolve_checkpoint
from ..memory_plan import format_memory_table

if TYPE_CHECKING:
    from ..training.memory_plan import TrainingSetup

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}  # quantized sizes: the memory table (only some layers are)


def register_inspect_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `inspect` (with its training memory plan options) to a `vargpt` sub-command parser."""
    from ..training.memory_plan import SHARDINGS
    from ..training.stages import STAGES

    p = subparsers.add_parser("inspect", help="parameters per module, dtypes, layout problems, memory estimates")
    p.add_argument(
        "model", nargs="?", default=None, help="checkpoint folder, shipped model, preset or Hub repo id (owner/name)"
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id (default: main)")
    p.add_argument("--preset", default=None, help="describe a preset's architecture instead (e.g. vargpt-v1.1)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="estimate memory for a GPU or a CPU run")
    t = p.add_argument_group("training memory plan (per rank; --train STAGE prints it instead of the inference table)")
    t.add_argument("--train", default=None, choices=sorted(STAGES), metavar="STAGE", help="training stage to plan")
    t.add_argument("--gpus", type=int, default=1, help="data-parallel ranks (default: %(default)s)")
    t.add_argument("--zero", default="none", choices=SHARDINGS, help="2 / 3: DeepSpeed ZeRO; fsdp: full shard")
    t.add_argument("--resolution", type=int, default=512, help="generated image side in px (default: %(default)s)")
    t.add_argument("--batch", type=int, default=1, help="micro-batch per GPU (default: %(default)s)")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters on the stage's linear layers")
    t.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in backward")
    t.add_argument("--quantize", default=None, choices=("int4",), help="NF4 base weights under LoRA (QLoRA)")
    t.add_argument("--prompt-tokens", type=int, default=64, help="text tokens before the image (default: %(default)s)")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """The inference report, or with --train the training memory plan."""
    if args.train is None:
        print(inspect_checkpoint(args.model, full_size=args.preset, revision=args.revision, device=args.device))
        return 0
    from ..training.memory_plan import TrainingSetup

    setup = TrainingSetup(
        stage=args.train,
        gpus=args.gpus,
        zero=args.zero,
        resolution=args.resolution,
        batch=args.batch,
        lora_rank=args.lora_rank if args.lora else None,
        gradient_checkpointing=args.gradient_checkpointing,
        quantize=args.quantize,
        prompt_tokens=args.prompt_tokens,
        device=args.device,
    )
    print(inspect_training(args.model, setup, full_size=args.preset, revision=args.revision))
    return 0


def module_parameter_counts(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Values per top-level module (state-dict prefix before the first dot)."""
    counts: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        counts[name.split(".", 1)[0]] += math.prod(shape)
    return dict(counts)


def architecture_shapes(config: VARGPTConfig) -> dict[str, tuple[int, ...]]:
    from ..modeling import VARGPTForConditionalGeneration

    with torch.device("meta"):
        model = VARGPTForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def format_report(shapes: dict[str, tuple[int, ...]], title: str, extra: list[str] | None = None) -> str:
    counts = module_parameter_counts(shapes)
    total = sum(counts.values())
    lines = [title, f"{'module':<28}{'values':>16}"]
    for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<28}{count:>16,}")
    lines.append(f"{'total':<28}{total:>16,}")
    lines.append(
        "estimated weight memory: " + ", ".join(f"{k} {format_bytes(total * b)}" for k, b in BYTES_PER_VALUE.items())
    )
    lines.extend(extra or [])
    return "\n".join(lines)


def format_bytes(count: float) -> str:
    """GiB, or MiB under one GiB (a small model's weights would all read "0.0 GiB")."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def inspect_checkpoint(
    path: str | None, full_size: str | None = None, *, revision: str | None = None, device: str = "cuda"
) -> str:
    """The report of a checkpoint (a folder, shipped model name or Hub repo id), or of a preset's architecture
    (`full_size`, or a preset name given as `path`)."""
    if path is not None and path in PRESETS and not Path(path).is_dir():
        full_size = full_size or path
    if full_size:
        config = VARGPTConfig.from_preset(full_size)
        return format_report(
            architecture_shapes(config),
            f"preset {full_size} (architecture, no weights)",
            [format_memory_table(config, device)],
        )
    if path is None:
        raise ValueError("give a checkpoint folder, shipped model name or Hub repo id, or --preset NAME")
    directory = resolve_checkpoint(path, revision=revision)
    config = VARGPTConfig.from_pretrained(directory)
    on_disk, dtypes = read_tensor_shapes(directory)
    report = compare(on_disk, architecture_shapes(config))
    extra = ["dtypes on disk: " + ", ".join(f"{k}: {v} tensors" for k, v in sorted(dtypes.items()))]
    extra.append("layout: matches the model its config describes" if report.ok else report.describe())
    extra.append(format_memory_table(config, device))
    where = path if Path(path) == directory else f"{path} ({directory})"
    return format_report(on_disk, f"checkpoint {where}", extra)


def inspect_training(
    path: str | None, setup: TrainingSetup, full_size: str | None = None, *, revision: str | None = None
) -> str:
    """The per-rank training memory plan of a preset's architecture or of a checkpoint's config."""
    from ..training.memory_plan import format_training_memory

    if path is not None and path in PRESETS and not Path(path).is_dir():
        full_size = full_size or path
    if full_size:
        config = VARGPTConfig.from_preset(full_size)
    elif path is None:
        raise ValueError("give a checkpoint folder, shipped model name or Hub repo id, or --preset NAME")
    else:
        config = VARGPTConfig.from_pretrained(resolve_checkpoint(path, revision=revision))
    return format_training_memory(config, setup)
