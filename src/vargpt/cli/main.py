"""The `vargpt` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..generation.config import UNCOND_MODES
from ..pipeline import default_model_name
from .inference import add_model_arguments, model_load_kwargs

DEFAULT_MODEL = default_model_name()


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_checkpoint, inspect_training

    if args.train is not None:
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
    print(inspect_checkpoint(args.model, full_size=args.preset, revision=args.revision, device=args.device))
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.web:
        from ..serving.web import launch_web_demo

        launch_web_demo(args.model, host=args.host, port=args.port, **model_load_kwargs(args))
        return 0
    from .demo import run_demo

    path = run_demo(args.model, args.out, seed=args.seed, **model_load_kwargs(args))
    print(f"report written to {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..training.data_recipe import data_recipe_flags_given, is_data_recipe, run_data_recipe_from_args

    if is_data_recipe(args.recipe):
        summary = run_data_recipe_from_args(args)
        stages = {s["stage"]: s["status"] for s in summary["stages"]}
        print(json.dumps({"stages": stages, "complete": summary["complete"], "final": summary["final"]}, indent=2))
        return 0
    flags = data_recipe_flags_given(args)
    if flags:
        raise ValueError(f'{", ".join(flags)}: only for fine-tuning recipes ("kind": "finetune"), not {args.recipe}')
    from ..training.recipe import load_recipe
    from ..training.runner import run_recipe

    out = args.out or f"runs/{Path(args.recipe).stem}"
    summary = run_recipe(load_recipe(args.recipe), out, progress=not args.quiet)
    print(json.dumps({"stages": [s["stage"] for s in summary["stages"]], "final": f"{out}/final"}, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from ..training.finetune import from_namespace, run_finetune

    result = run_finetune(from_namespace(args))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"} | {"last_loss": result["losses"][-1:]}))
    return 0


def _eval_shapes(args: argparse.Namespace) -> int:
    from ..pipeline import VARGPTPipeline
    from ..shapes.evaluate import evaluate_split

    data = Path(args.data)
    split_file = data / f"{args.split}.jsonl" if data.is_dir() else data
    if not split_file.is_file():
        raise FileNotFoundError(f"no split file {split_file}: write one with the shapes-world data writer")
    pipe = VARGPTPipeline.from_pretrained(args.model, image_preset=args.preset, **model_load_kwargs(args))
    pipe.image_config = pipe.image_config.updated(
        cfg_scale=args.cfg, tau=args.tau, top_p=args.top_p, uncond_mode=args.uncond_mode
    )
    grid = Path(args.json).with_suffix(".png") if args.json else None
    report = evaluate_split(
        pipe,
        split_file,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        grid_path=grid,
        progress=not args.quiet,
    )
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vargpt", description="VARGPT-v1.1-style unified models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="chat, generate and edit on a model; write an HTML report")
    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument("--out", default="vargpt-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--web", action="store_true", help="serve the interactive web demo instead (needs gradio)")
    p.add_argument("--host", default="127.0.0.1", help="web demo interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="web demo port (default: %(default)s)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="run a training recipe (resumes an interrupted run in the same --out)")
    p.add_argument("--recipe", default="shapes-tiny", help="packaged recipe name or JSON file (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from ..training.data_recipe import add_data_recipe_arguments

    add_data_recipe_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("finetune", help="SFT or DPO of a checkpoint on sharegpt data (one stage)")
    from ..training.finetune import add_arguments

    add_arguments(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("eval", help="evaluate a model")
    evals = p.add_subparsers(dest="suite", required=True)
    e = evals.add_parser("shapes", help="shapes-world generation / understanding / editing scores")
    add_model_arguments(e, DEFAULT_MODEL)
    e.add_argument("--data", required=True, help="folder with <split>.jsonl (a run's data/ folder) or a JSONL file")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--json", default=None, help="write the report here (and a sample grid PNG beside it)")
    e.add_argument("--limit", type=int, default=None, help="rows per task (default: all)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--preset", default=None, help="image settings preset (default: the model's own settings)")
    e.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    e.add_argument("--tau", type=float, default=None)
    e.add_argument("--top-p", type=float, default=None)
    e.add_argument("--uncond-mode", default=None, choices=UNCOND_MODES, help="guidance's unconditional branch")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_eval_shapes)
    from .evaluate import register_bench_command, register_eval_commands

    register_eval_commands(evals)
    register_bench_command(sub)
    from .inference import register_commands

    register_commands(sub)
    from ..training.dpo_pairs import register_dpo_pairs_command

    register_dpo_pairs_command(sub)
    from .data import register_data_commands

    register_data_commands(sub)

    p = sub.add_parser("inspect", help="parameters per module, dtypes, layout problems, memory estimates")
    p.add_argument(
        "model", nargs="?", default=None, help="checkpoint folder, shipped model, preset or Hub repo id (owner/name)"
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id (default: main)")
    p.add_argument("--preset", default=None, help="describe a preset's architecture instead (e.g. vargpt-v1.1)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="estimate memory for a GPU or a CPU run")
    t = p.add_argument_group("training memory plan (per rank; --train STAGE prints it instead of the inference table)")
    from ..training.memory_plan import SHARDINGS
    from ..training.stages import STAGES

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
    p.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        # a quiet command also hides transformers' own bars (loading and writing weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vargpt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
