"""Command-line entries of the benchmark samplers, scorers and `vargpt bench` (wired into `vargpt.cli`).

`register_eval_commands(eval_subparsers)` adds `geneval-sample`, `dpg-sample`, `geneval-score`,
`dpg-score` and `fit` under `vargpt eval`; `register_bench_command(subparsers)` adds `vargpt bench`. Each sets
`func(args) -> int` like the other commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..evaluation.teacher_forced import SWAPS, THROUGH
from ..generation.config import POSITION_MODES, UNCOND_MODES
from ..pipeline import default_model_name
from ..rope_index import FORWARD_POSITIONS
from .inference import add_model_arguments, model_load_kwargs

DEFAULT_MODEL = default_model_name()
_SETTINGS = ("cfg_scale", "tau", "top_k", "top_p", "resolution", "aspect_ratio", "position_mode", "uncond_mode")


def _add_generation_arguments(p: argparse.ArgumentParser, batch_default: int = 16) -> None:
    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="output folder (an interrupted run resumes in the same folder)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--batch-size", type=int, default=batch_default, help="images per model call (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--preset", default=None, help="image setting preset: original-code or paper")
    p.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--aspect-ratio", type=float, default=None)
    p.add_argument("--position-mode", default=None, choices=("mrope", "cache"))
    p.add_argument("--uncond-mode", default=None, choices=UNCOND_MODES, help="guidance's unconditional branch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}


def _pipeline(args: argparse.Namespace):
    from accelerate import PartialState

    from ..pipeline import VARGPTPipeline

    state = PartialState()
    device = args.device or (state.device if state.device.type != "mps" else "cpu")
    pipe = VARGPTPipeline.from_pretrained(
        args.model, device=device, dtype=args.dtype, seed=args.seed, **model_load_kwargs(args)
    )
    return pipe, state


def _geneval_sample(args: argparse.Namespace) -> int:
    from ..evaluation.geneval import read_geneval_metadata, sample_geneval

    metadata = read_geneval_metadata(args.metadata, args.limit)
    pipe, state = _pipeline(args)
    manifest = sample_geneval(
        pipe,
        args.out,
        metadata,
        model_name=str(args.model),
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
        preset=args.preset,
        settings=_settings(args),
        state=state,
        progress=not args.quiet,
    )
    if state.is_main_process:
        print(json.dumps({"out": args.out, "prompts": len(manifest.get("prompts", {}))}))
    return 0


def _dpg_sample(args: argparse.Namespace) -> int:
    from ..evaluation.dpg import read_dpg_prompts, sample_dpg

    prompts = read_dpg_prompts(args.prompts, args.limit)
    pipe, state = _pipeline(args)
    manifest = sample_dpg(
        pipe,
        args.out,
        prompts,
        model_name=str(args.model),
        batch_size=args.batch_size,
        seed=args.seed,
        preset=args.preset,
        settings=_settings(args),
        state=state,
        progress=not args.quiet,
    )
    if state.is_main_process:
        print(json.dumps({"out": args.out, "prompts": len(manifest.get("prompts", {}))}))
    return 0


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
    summary_path = results_path.with_name(results_path.stem + "_summary.json")
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))
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
    summary_path = results_path.with_name(results_path.stem + "_summary.json")
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_category_csv(summary, results_path.with_name(results_path.stem + "_categories.csv"))
    print(json.dumps(summary, indent=2))
    return 0


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


def register_eval_commands(eval_subparsers) -> None:
    """Add the GenEval and DPG-Bench samplers and scorers, and the teacher-forced fit, under `vargpt eval`."""
    p = eval_subparsers.add_parser("geneval-sample", help="draw GenEval prompts in its official folder layout")
    _add_generation_arguments(p)
    p.add_argument("--metadata", default=None, help="GenEval-format JSONL (default: the packaged 553 prompts)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.set_defaults(func=_geneval_sample)

    p = eval_subparsers.add_parser("dpg-sample", help="draw DPG-Bench prompts as 2x2 grids named by prompt id")
    _add_generation_arguments(p)
    p.add_argument("--prompts", default=None, help="{id, prompt} JSONL (default: the packaged 1,065 prompts)")
    p.set_defaults(func=_dpg_sample)

    p = eval_subparsers.add_parser("geneval-score", help="score a GenEval-layout folder (results JSONL + summary)")
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
    p.add_argument("--device", default=None, help="geneval: cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--results", default=None, help="results JSONL (default: IMAGES/results.jsonl)")
    p.add_argument(
        "--official-thresholds",
        action="store_true",
        help="apply GenEval's confidence thresholds (0.3; 0.9 for counting) to the detector's scores",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_geneval_score)

    p = eval_subparsers.add_parser("dpg-score", help="score a DPG-Bench folder with a VQA model")
    p.add_argument("images", help="the folder dpg-sample wrote")
    p.add_argument("--questions", required=True, help="DPG-Bench question file (dpg_bench.csv)")
    p.add_argument(
        "--vqa",
        default="shapes",
        help="judge: 'shapes' (the shapes world's VQA) or 'hf:<Hub id or folder>', a transformers "
        "AutoModelForVisualQuestionAnswering model, e.g. hf:Salesforce/blip-vqa-capfilt-large (default: %(default)s)",
    )
    p.add_argument(
        "--device", default=None, help="hf: judge's device: cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    p.add_argument("--resolution", type=int, default=None, help="tile side in px (default: half the grid)")
    p.add_argument("--pic-num", type=int, default=4, help="tiles scored per grid (official default 4)")
    p.add_argument("--results", default=None, help="results JSONL (default: beside IMAGES)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_dpg_score)

    p = eval_subparsers.add_parser(
        "fit", help="teacher-forced bit cross-entropy and bit error per scale (training forward or inference loop)"
    )
    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument("--data", nargs="+", required=True, help="sharegpt JSON/JSONL rows with <image_gen> targets")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows with a generation target")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=None, help="generation-target pixels (default: the model's)")
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
        "scale loop on the targets' bits, with the sampler's --cfg and --tau (default: %(default)s)",
    )
    p.add_argument(
        "--positions",
        default=None,
        choices=(*FORWARD_POSITIONS, *(m for m in POSITION_MODES if m not in FORWARD_POSITIONS)),
        help="LLM rotary positions: mrope (as generate), sequential (the original's training forward; forward "
        "only) or cache (the original's inference; inference only); default: the model's forward_positions on "
        "the forward, mrope on the inference loop",
    )
    p.add_argument(
        "--cfg",
        dest="cfg_scale",
        type=float,
        default=1.0,
        help="guidance scale of the scored distribution (--through inference; default: %(default)s, none)",
    )
    p.add_argument(
        "--tau", type=float, default=1.0, help="sampling temperature (--through inference; default: %(default)s)"
    )
    p.add_argument(
        "--uncond-mode",
        default="original",
        choices=UNCOND_MODES,
        help="guidance's unconditional branch (--through inference with --cfg other than 1)",
    )
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--strict-data", action="store_true", help="fail on the first bad row instead of skipping")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seeds a preset's random weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_fit)


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


def register_bench_command(subparsers) -> None:
    """Add `vargpt bench`."""
    p = subparsers.add_parser("bench", help="generation / understanding speed, FLOP share and memory")
    p.add_argument(
        "--preset",
        default="tiny",
        help="model preset (tiny, bench-100m ...) or shipped model (vargpt-shapes-tiny) (default: %(default)s)",
    )
    p.add_argument("--json", required=True, help="report path (a PNG plot is written beside it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default: %(default)s)")
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_bench)
