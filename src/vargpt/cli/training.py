"""`vargpt train`, `vargpt finetune` and `vargpt dpo-pairs`: the commands that train or prepare training.

The flags and their translation into the library's arguments live here; the work itself is `vargpt.training`'s
(`run_recipe`, `run_data_recipe`, `run_finetune`, `build_dpo_pairs`), which never imports the command line. A
recipe run's judges (the shapes world's scorer, validation and read-back) are chosen here too, so that training
holds no evaluation code.

The training modules load when a parser is built or a command runs, not when `vargpt.cli` is imported: the
server imports `vargpt.cli.options` and has no use for the Trainer, peft or `datasets`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import add_image_arguments, add_model_arguments, add_quiet_argument, image_settings, model_load_kwargs

if TYPE_CHECKING:
    from ..training.dpo_pairs import DPOPairsConfig
    from ..training.finetune import FinetuneArgs

# `vargpt train`'s fine-tuning-recipe flags and their unset values: any other value on a shapes-world recipe is
# an error, since that runner would ignore it
_DATA_RECIPE_FLAGS: Mapping[str, Any] = {
    "data_root": None,
    "model": None,
    "max_steps": None,
    "resolution": None,
    "batch_size": None,
    "gradient_accumulation_steps": None,
    "stop_after": None,
    "strict_data": False,
    "cpu": False,
    "no_bf16": False,
}
# the image settings `vargpt dpo-pairs` may set on every checkpoint's samples (ImageGenerationConfig fields)
DPO_PAIRS_IMAGE_SETTINGS = ("cfg_scale", "tau", "top_k", "top_p", "resolution", "uncond_mode")


def register_training_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `train`, `finetune` and `dpo-pairs` to a `vargpt` sub-command parser."""
    p = subparsers.add_parser("train", help="run a training recipe (resumes an interrupted run in the same --out)")
    p.add_argument("--recipe", default="shapes-tiny", help="packaged recipe name or JSON file (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    add_quiet_argument(p)
    add_data_recipe_arguments(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("finetune", help="SFT or DPO of a checkpoint on sharegpt data (one stage)")
    add_finetune_arguments(p)
    p.set_defaults(func=run_finetune_command)

    register_dpo_pairs_command(subparsers)


# -- train ---------------------------------------------------------------------------------------------------------
def add_data_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """`vargpt train` flags for fine-tuning recipes (`"kind": "finetune"`)."""
    group = parser.add_argument_group('fine-tuning recipes ("kind": "finetune")')
    group.add_argument("--data-root", default=None, help="folder the recipe's data paths are relative to")
    group.add_argument("--model", default=None, help="starting checkpoint (default: the recipe's model)")
    group.add_argument("--max-steps", type=int, default=None, help="cap every stage's steps (run the recipe small)")
    group.add_argument("--resolution", type=int, default=None, help="generation resolution of every stage")
    group.add_argument(
        "--batch-size", type=int, default=None, help="per-device batch of every stage (accumulation becomes 1)"
    )
    group.add_argument("--gradient-accumulation-steps", type=int, default=None, help="of every stage")
    group.add_argument("--stop-after", default=None, help="end after this stage (a later run continues)")
    group.add_argument("--strict-data", action="store_true", help="fail on the first bad row instead of skipping")
    group.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    group.add_argument(
        "--no-bf16",
        action="store_true",
        help="full precision even where the recipe asks for bf16 (any recipe; the numbers then differ from bf16 runs)",
    )


def data_recipe_flags_given(args: argparse.Namespace) -> list[str]:
    """The fine-tuning-recipe flags set on the command line (an error for a shapes-world recipe)."""
    return [f"--{k.replace('_', '-')}" for k, unset in _DATA_RECIPE_FLAGS.items() if getattr(args, k, unset) != unset]


def run_data_recipe_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`vargpt train --recipe R` for a fine-tuning recipe (`args.out` None: runs/<recipe name>)."""
    from ..training.data_recipe import ScaleDown, load_data_recipe, run_data_recipe

    for name in ("max_steps", "resolution", "batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    scale = ScaleDown(args.max_steps, args.resolution, args.batch_size, args.gradient_accumulation_steps)
    recipe = load_data_recipe(args.recipe)
    return run_data_recipe(
        recipe,
        args.out or Path("runs") / recipe.name,
        data_root=args.data_root,
        model=args.model,
        scale=scale,
        strict_data=args.strict_data,
        cpu=args.cpu,
        bf16=False if args.no_bf16 else None,
        stop_after=args.stop_after,
        quiet=args.quiet,
    )


def run_train(args: argparse.Namespace) -> int:
    """A packaged or JSON recipe: a shapes-world recipe runs its stages, a fine-tuning recipe its own data."""
    from ..training.data_recipe import is_data_recipe

    if is_data_recipe(args.recipe):
        summary = run_data_recipe_from_args(args)
        stages = {s["stage"]: s["status"] for s in summary["stages"]}
        print(json.dumps({"stages": stages, "complete": summary["complete"], "final": summary["final"]}, indent=2))
        return 0
    flags = [flag for flag in data_recipe_flags_given(args) if flag != "--no-bf16"]  # --no-bf16 serves both kinds
    if flags:
        raise ValueError(f'{", ".join(flags)}: only for fine-tuning recipes ("kind": "finetune"), not {args.recipe}')
    # loaded only for a shapes-world run: the runner, the world's detector and its scoring take seconds to import
    from ..shapes.recipe import shapes_judges
    from ..training.recipe import load_recipe
    from ..training.runner import run_recipe

    out = args.out or f"runs/{Path(args.recipe).stem}"
    spec = load_recipe(args.recipe)
    if args.no_bf16 and spec.bf16:
        spec = dataclasses.replace(spec, bf16=False)
    summary = run_recipe(spec, out, progress=not args.quiet, judges=shapes_judges())
    print(json.dumps({"stages": [s["stage"] for s in summary["stages"]], "final": f"{out}/final"}, indent=2))
    return 0


# -- finetune ------------------------------------------------------------------------------------------------------
def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """`vargpt finetune`'s flags: what to train on and for how long, then how to run it, then LoRA and loading."""
    _add_stage_arguments(parser)
    _add_runtime_arguments(parser)
    _add_adapter_arguments(parser)


def _add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.stages import STAGES

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


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    from ..rope_index import FORWARD_POSITIONS
    from ..training.finetune import DPO_REFERENCES, TRAINING_DTYPES

    add_quiet_argument(parser)
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


def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
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


def finetune_args_from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    """The parsed flags as `FinetuneArgs`: each flag's destination is the field of the same name (the parser's
    own entries, such as the command's handler, are left out)."""
    from ..training.finetune import FinetuneArgs

    return FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in FinetuneArgs.__dataclass_fields__})


def run_finetune_command(args: argparse.Namespace) -> int:
    """One SFT or DPO stage; prints the result without its loss curve (only the last loss)."""
    from ..training.finetune import run_finetune

    result = run_finetune(finetune_args_from_namespace(args))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"} | {"last_loss": result["losses"][-1:]}))
    return 0


# -- dpo-pairs -----------------------------------------------------------------------------------------------------
def register_dpo_pairs_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `dpo-pairs` to a `vargpt` sub-command parser."""
    from ..training import dpo_pairs

    # "resolve": the shared model flags stay in step with the other commands, and `--model` becomes repeatable
    p = subparsers.add_parser(
        "dpo-pairs",
        help="preference pairs for image DPO: checkpoint samples (losers) against winner images",
        description=(dpo_pairs.__doc__ or "").split("\n\n", 1)[0],
        conflict_handler="resolve",
    )
    add_model_arguments(p)
    p.add_argument(
        "--model", action="append", required=True, metavar="CKPT", help="a checkpoint to draw losers from (repeatable)"
    )
    p.add_argument(
        "--prompts", required=True, metavar="FILE|DATASET", help="text file, JSONL, or a datasets name / folder"
    )
    p.add_argument("--prompt-column", default="prompt", help="the prompt field of JSONL rows or dataset rows")
    p.add_argument("--prompt-split", default="train", help="split of a datasets dataset (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--winners", default=None, metavar="FOLDER|JSONL", help="winner images keyed by prompt")
    p.add_argument(
        "--scorer",
        default=None,
        help=f"drops losers that satisfy the prompt: {', '.join(dpo_pairs.BUILTIN_SCORERS)} or module:NAME",
    )
    p.add_argument("--out", required=True, help="output folder (an interrupted run resumes in the same folder)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default: %(default)s)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="losers per prompt and checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-shards", type=int, default=None, help="processes sharing the prompts (default: WORLD_SIZE or 1)"
    )
    p.add_argument("--shard-index", type=int, default=None, help="this process's shard (default: RANK or 0)")
    p.add_argument("--merge", action="store_true", help="only merge finished shards into pairs.jsonl")
    p.add_argument("--strict", action="store_true", help="a prompt without a winner is an error, not a skip")
    p.add_argument(
        "--response", default=dpo_pairs.DEFAULT_RESPONSE, help="assistant text of both sides (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: bf16 on CUDA, fp32 on CPU)")
    add_image_arguments(
        p,
        DPO_PAIRS_IMAGE_SETTINGS,
        preset_help="image settings preset (default: each checkpoint's own settings)",
        helps={"resolution": "sample side in pixels (default: the model's)"},
    )
    add_quiet_argument(p)
    p.set_defaults(func=run_dpo_pairs_command)


def dpo_pairs_config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> DPOPairsConfig:
    """This process's `DPOPairsConfig`: the flags, with the shard and the GPU taken from the launcher's
    WORLD_SIZE / RANK / LOCAL_RANK (`environ`, default: this process's environment) where no flag sets them."""
    from ..training.dpo_pairs import DPOPairsConfig, resolve_shard

    environ = os.environ if environ is None else environ
    num_shards, shard_index = resolve_shard(args.num_shards, args.shard_index, environ)
    return DPOPairsConfig(
        prompts=args.prompts,
        models=list(args.model),
        out=args.out,
        winners=args.winners,
        scorer=args.scorer,
        prompt_column=args.prompt_column,
        prompt_split=args.prompt_split,
        limit=args.limit,
        samples_per_prompt=args.samples_per_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
        num_shards=num_shards,
        shard_index=shard_index,
        merge_only=args.merge,
        strict=args.strict,
        progress=not args.quiet,
        preset=args.preset,
        settings=image_settings(args, DPO_PAIRS_IMAGE_SETTINGS),
        device=args.device or _rank_device(environ),
        dtype=args.dtype,
        load_kwargs=model_load_kwargs(args),
        response=args.response,
    )


def _rank_device(environ: Mapping[str, str]) -> str | None:
    """`cuda:LOCAL_RANK` for a launched process on a GPU machine, so ranks do not share one GPU."""
    if "LOCAL_RANK" not in environ:
        return None
    import torch

    return f"cuda:{int(environ['LOCAL_RANK'])}" if torch.cuda.is_available() else None


def run_dpo_pairs_command(args: argparse.Namespace) -> int:
    """Build this shard's pairs; say where they are, or that other shards have yet to finish."""
    from ..training.dpo_pairs import build_dpo_pairs

    result = build_dpo_pairs(dpo_pairs_config_from_args(args))
    where = Path(args.out) / "pairs.jsonl"
    if result["merged"]:
        stats = result["stats"]
        print(f"{stats['pairs']} pairs written to {where}; skipped: {json.dumps(stats['skipped'])}")
    else:
        shard, shards = result["shard"]
        print(f"shard index {shard} of {shards} shards done; {where} is written once every shard has finished")
    return 0
