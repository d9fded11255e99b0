"""`vargpt eval ...` and `vargpt bench` (wired into `vargpt.cli.main`).

`register_eval_group(subparsers)` adds `vargpt eval` with `shapes`, `geneval-sample`, `dpg-sample`,
`geneval-score`, `dpg-score` and `fit` (`register_eval_commands(eval_subparsers)` adds those to an existing
`eval`); `register_bench_command(subparsers)` adds `vargpt bench`. Each sets `func(args) -> int` like the other
commands.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..evaluation.teacher_forced import SWAPS, THROUGH
from ..generation.config import POSITION_MODES
from ..rope_index import FORWARD_POSITIONS
from .options import (
    add_device_arguments,
    add_image_arguments,
    add_model_arguments,
    add_quiet_argument,
    image_settings,
    model_load_kwargs,
)

# the image settings `eval shapes` takes (the model's own settings otherwise)
SHAPES_SETTINGS = ("cfg_scale", "tau", "top_p", "uncond_mode")
# the settings of the distribution `eval fit --through inference` scores
FIT_SETTINGS = ("resolution", "cfg_scale", "tau", "uncond_mode")


def register_eval_group(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` with every evaluation below it to a `vargpt` sub-command parser."""
    evals = subparsers.add_parser("eval", help="evaluate a model").add_subparsers(dest="suite", required=True)
    register_eval_commands(evals)


def register_eval_commands(eval_subparsers: argparse._SubParsersAction) -> None:
    """Add the shapes-world scores, the GenEval and DPG-Bench samplers and scorers, and the teacher-forced fit."""
    _register_shapes(eval_subparsers)
    _register_samplers(eval_subparsers)
    _register_geneval_score(eval_subparsers)
    _register_dpg_score(eval_subparsers)
    _register_fit(eval_subparsers)


# -- shapes world ------------------------------------------------------------------------------------------------
def _register_shapes(evals: argparse._SubParsersAction) -> None:
    e = evals.add_parser("shapes", help="shapes-world generation / understanding / editing scores")
    add_model_arguments(e)
    e.add_argument("--data", required=True, help="folder with <split>.jsonl (a run's data/ folder) or a JSONL file")
    e.add_argument(
        "--split",
        default="test",
        choices=("train", "validation", "test", "test-paraphrase"),
        help="split file to score (default: %(default)s; test-paraphrase: held-out wordings, broad-language recipes)",
    )
    e.add_argument("--json", default=None, help="write the report here (and a sample grid PNG beside it)")
    e.add_argument("--limit", type=int, default=None, help="rows per task (default: all)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--samples-per-prompt",
        type=int,
        default=0,
        help="also draw N samples (N >= 2) of the first --diversity-prompts prompts and report the share of "
        "distinct images among them with their accuracy (default: off)",
    )
    e.add_argument("--diversity-prompts", type=int, default=32, help="prompts for --samples-per-prompt")
    add_image_arguments(e, SHAPES_SETTINGS, preset_help="image settings preset (default: the model's own settings)")
    add_quiet_argument(e)
    e.set_defaults(func=_eval_shapes)


def _eval_shapes(args: argparse.Namespace) -> int:
    from ..pipeline import VARGPTPipeline
    from ..shapes.evaluate import evaluate_split

    if args.samples_per_prompt == 1 or args.samples_per_prompt < 0 or args.diversity_prompts < 1:
        raise ValueError("--samples-per-prompt must be 0 (off) or at least 2, and --diversity-prompts positive")
    data = Path(args.data)
    split_file = data / f"{args.split}.jsonl" if data.is_dir() else data
    if not split_file.is_file():
        raise FileNotFoundError(f"no split file {split_file}: write one with the shapes-world data writer")
    pipe = VARGPTPipeline.from_pretrained(args.model, image_preset=args.preset, **model_load_kwargs(args))
    pipe.image_config = pipe.image_config.updated(**image_settings(args, SHAPES_SETTINGS))
    grid = Path(args.json).with_suffix(".png") if args.json else None
    report = evaluate_split(
        pipe,
        split_file,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        grid_path=grid,
        progress=not args.quiet,
        samples_per_prompt=args.samples_per_prompt,
        diversity_prompts=args.diversity_prompts,
    )
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


# -- GenEval and DPG-Bench samplers --------------------------------------------------------------------------------
def _register_samplers(evals: argparse._SubParsersAction) -> None:
    p = evals.add_parser("geneval-sample", help="draw GenEval prompts in its official folder layout")
    _add_sampler_arguments(p)
    p.add_argument("--metadata", default=None, help="GenEval-format JSONL (default: the packaged 553 prompts)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.set_defaults(func=_geneval_sample)

    p = evals.add_parser("dpg-sample", help="draw DPG-Bench prompts as 2x2 grids named by prompt id")
    _add_sampler_arguments(p)
    p.add_argument("--prompts", default=None, help="{id, prompt} JSONL (default: the packaged 1,065 prompts)")
    p.set_defaults(func=_dpg_sample)


def _add_sampler_arguments(p: argparse.ArgumentParser, batch_default: int = 16) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output folder (an interrupted run resumes in the same folder)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--batch-size", type=int, default=batch_default, help="images per model call (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)
    add_image_arguments(p, preset_help="image settings preset: original-code or paper")
    add_quiet_argument(p)


def _pipeline(args: argparse.Namespace):
    from accelerate import PartialState

    from ..pipeline import VARGPTPipeline

    state = PartialState()
    device = args.device or (state.device if state.device.type != "mps" else "cpu")
    pipe = VARGPTPipeline.from_pretrained(
        args.model, device=device, dtype=args.dtype, seed=args.seed, **model_load_kwargs(args)
    )
    return pipe, state


def _sample(args: argparse.Namespace, sampler: Callable[..., dict], items: Any, **extra: Any) -> int:
    """Run a benchmark's sampler over its prompts on this process's share (all processes under accelerate)."""
    pipe, state = _pipeline(args)
    manifest = sampler(
        pipe,
        args.out,
        items,
        model_name=str(args.model),
        batch_size=args.batch_size,
        seed=args.seed,
        preset=args.preset,
        settings=image_settings(args),
        state=state,
        progress=not args.quiet,
        **extra,
    )
    if state.is_main_process:
        print(json.dumps({"out": args.out, "prompts": len(manifest.get("prompts", {}))}))
    return 0


def _geneval_sample(args: argparse.Namespace) -> int:
    from ..evaluation.geneval import read_geneval_metadata, sample_geneval

    metadata = read_geneval_metadata(args.metadata, args.limit)
    return _sample(args, sample_geneval, metadata, images_per_prompt=args.images_per_prompt)


def _dpg_sample(args: argparse.Namespace) -> int:
    from ..evaluation.dpg import read_dpg_prompts, sample_dpg

    return _sample(args, sample_dpg, read_dpg_prompts(args.prompts, args.limit))


# -- scorers -------------------------------------------------------------------------------------------------------
def _geneval_score(args: argparse.Namespace) -> int:
    from ..evaluation.geneval import NO_FILTER, OFFICIAL_FILTER, geneval_images, make_detector, score_geneval_folder

    folder = Path(args.images)
    geneval_images(folder)  # a bad folder fails before any model loads
    results_path = Path(args.results) if args.results else folder / "results.jsonl"
    # The geneval judge's scores are confidences, so its thresholds are always the official ones.
    official = args.official_thresholds or args.detector == "geneval"
    detection_filter = OFFICIAL_FILTER if official else NO_FILTER
    detector = make_detector(
        args.detector, detector_model=args.detector_model, clip_model=args.clip_model, device=args.device
    )
    _, summary = score_geneval_folder(
        folder,
        detector,
        detection_filter=detection_filter,
        results_path=results_path,
        progress=not args.quiet,
    )
    _write_summary(summary, results_path)
    return 0


def _dpg_score(args: argparse.Namespace) -> int:
    from ..evaluation.dpg import read_dpg_questions, resolve_vqa, score_dpg_folder, write_category_csv
    from ..evaluation.dpg_judge import parse_vqa_spec

    parse_vqa_spec(args.vqa)  # a bad --vqa fails before any file is read or model loaded
    folder = Path(args.images)
    results_path = Path(args.results) if args.results else folder.parent / f"{folder.name}_dpg_results.jsonl"
    tile = (args.resolution, args.resolution) if args.resolution else None
    questions = read_dpg_questions(args.questions)
    _, summary = score_dpg_folder(
        folder,
        questions,
        resolve_vqa(args.vqa, device=args.device),
        tiles=args.pic_num,
        tile_size=tile,
        results_path=results_path,
        progress=not args.quiet,
    )
    summary["vqa"] = args.vqa
    write_category_csv(summary, results_path.with_name(results_path.stem + "_categories.csv"))
    _write_summary(summary, results_path)
    return 0


def _write_summary(summary: dict, results_path: Path) -> None:
    """The scores beside the per-image results (`<results>_summary.json`), and on stdout."""
    text = json.dumps(summary, indent=2)
    results_path.with_name(results_path.stem + "_summary.json").write_text(text, encoding="utf-8")
    print(text)


def _register_geneval_score(evals: argparse._SubParsersAction) -> None:
    p = evals.add_parser("geneval-score", help="score a GenEval-layout folder (results JSONL + summary)")
    p.add_argument("images", help="the folder geneval-sample wrote")
    p.add_argument(
        "--detector",
        default="shapes",
        choices=("shapes", "geneval"),
        help="'shapes' (exact shapes-world detector) or 'geneval' (the official judge's models: Mask2Former "
        "COCO instances + CLIP colours, official thresholds always on) (default: %(default)s)",
    )
    p.add_argument(
        "--detector-model",
        default=None,
        help="geneval: Mask2Former Hub id or folder (default: facebook/mask2former-swin-small-coco-instance)",
    )
    p.add_argument(
        "--clip-model", default=None, help="geneval: CLIP Hub id or folder (default: openai/clip-vit-large-patch14)"
    )
    add_device_arguments(p, with_dtype=False, role="geneval: ")
    p.add_argument("--results", default=None, help="results JSONL (default: IMAGES/results.jsonl)")
    p.add_argument(
        "--official-thresholds",
        action="store_true",
        help="apply GenEval's confidence thresholds (0.3; 0.9 for counting) to the detector's scores",
    )
    add_quiet_argument(p)
    p.set_defaults(func=_geneval_score)


def _register_dpg_score(evals: argparse._SubParsersAction) -> None:
    p = evals.add_parser("dpg-score", help="score a DPG-Bench folder with a VQA model")
    p.add_argument("images", help="the folder dpg-sample wrote")
    p.add_argument("--questions", required=True, help="DPG-Bench question file (dpg_bench.csv)")
    p.add_argument(
        "--vqa",
        default="shapes",
        help="judge: 'shapes' (the shapes world's VQA) or 'hf:<Hub id or folder>', a transformers "
        "AutoModelForVisualQuestionAnswering model, e.g. hf:Salesforce/blip-vqa-capfilt-large (default: %(default)s)",
    )
    add_device_arguments(p, with_dtype=False, role="hf: judge's device: ")
    p.add_argument("--resolution", type=int, default=None, help="tile side in px (default: half the grid)")
    p.add_argument("--pic-num", type=int, default=4, help="tiles scored per grid (official default 4)")
    p.add_argument("--results", default=None, help="results JSONL (default: beside IMAGES)")
    add_quiet_argument(p)
    p.set_defaults(func=_dpg_score)


# -- teacher-forced fit --------------------------------------------------------------------------------------------
def _register_fit(evals: argparse._SubParsersAction) -> None:
    p = evals.add_parser(
        "fit", help="teacher-forced bit cross-entropy and bit error per scale (training forward or inference loop)"
    )
    add_model_arguments(p)
    p.add_argument("--data", nargs="+", required=True, help="sharegpt JSON/JSONL rows with <image_gen> targets")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows with a generation target")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--swap",
        default="none",
        choices=SWAPS,
        help="give each row the next row's understanding images or prompt (how much the fit depends on them)",
    )
    p.add_argument(
        "--through",
        default="forward",
        choices=THROUGH,
        help="forward: the training forward, one pass (the model's own image loss); inference: generate's KV-cached "
        "scale loop on the targets' bits, with the sampler's --cfg-scale and --tau (default: %(default)s)",
    )
    p.add_argument(
        "--positions",
        default=None,
        choices=(*FORWARD_POSITIONS, *(m for m in POSITION_MODES if m not in FORWARD_POSITIONS)),
        help="LLM rotary positions: mrope (as generate), sequential (the original's training forward; forward "
        "only) or cache (the original's inference; inference only); default: the model's forward_positions on "
        "the forward, mrope on the inference loop",
    )
    add_image_arguments(
        p,
        FIT_SETTINGS,
        preset_help=None,
        defaults={"cfg_scale": 1.0, "tau": 1.0, "uncond_mode": "original"},
        helps={
            "resolution": "generation-target pixels (default: the model's)",
            "cfg_scale": "guidance scale of the scored distribution (--through inference; default: 1.0, none)",
            "tau": "sampling temperature (--through inference; default: 1.0)",
            "uncond_mode": "guidance's unconditional branch (--through inference with --cfg-scale other than 1; "
            "default: original)",
        },
    )
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--strict-data", action="store_true", help="fail on the first bad row instead of skipping")
    add_device_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seeds a preset's random weights")
    add_quiet_argument(p)
    p.set_defaults(func=_fit)


def _fit(args: argparse.Namespace) -> int:
    from ..data.formats import load_sft_dataset
    from ..evaluation.teacher_forced import format_fit, teacher_forced_fit

    rows, report = load_sft_dataset(args.data, strict=args.strict_data)
    if report.skipped_rows:
        print(f"data: {report}")
    if len(rows) == 0:
        raise ValueError(f"no usable rows in {args.data}: {report}")
    rows = [rows[i] for i in range(len(rows))]
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        # the first N rows that have a generation target: a split that opens with understanding rows would
        # otherwise leave nothing to score
        rows = [row for row in rows if row.get("gen_images")][: args.limit]
    pipe, _ = _pipeline(args)
    fit = teacher_forced_fit(
        pipe.model,
        pipe.processor,
        rows,
        resolution=args.resolution,
        batch_size=args.batch_size,
        swap=args.swap,
        positions=args.positions,
        through=args.through,
        cfg_scale=args.cfg_scale,
        tau=args.tau,
        uncond_mode=args.uncond_mode,
        progress=not args.quiet,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(fit, indent=2), encoding="utf-8")
    print(format_fit(fit))
    return 0


# -- speed -------------------------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    from ..bench.speed import run_benchmark, write_report

    report = run_benchmark(
        args.preset,
        device=args.device,
        dtype=args.dtype,
        resolutions=args.resolutions,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        text_new_tokens=args.text_tokens,
        threads=args.threads,
        progress=not args.quiet,
        static_cache=args.static_cache,
        compile=args.compile,
    )
    plot = write_report(report, args.json)
    print(json.dumps({"json": args.json, "plot": str(plot)}))
    return 0


def register_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `vargpt bench`."""
    p = subparsers.add_parser("bench", help="generation / understanding speed, FLOP share and memory")
    p.add_argument(
        "--preset",
        default="tiny",
        help="model preset (tiny, bench-100m ...) or shipped model (vargpt-shapes-tiny) (default: %(default)s)",
    )
    p.add_argument("--json", required=True, help="report path (a PNG plot is written beside it)")
    add_device_arguments(p, device="cpu", dtype="float32")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: all the preset supports")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text-tokens", type=int, default=32, help="new tokens for the understanding timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--static-cache", action="store_true", help="time a preallocated (static) LLM KV cache")
    p.add_argument(
        "--compile",
        action="store_true",
        help="time the compiled path: static cache + torch.compile (CUDA graphs on cuda); warm-up compiles",
    )
    add_quiet_argument(p)
    p.set_defaults(func=_bench)
