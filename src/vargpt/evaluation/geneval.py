"""GenEval: sampling into its official folder layout, and scoring that layout with a pluggable detector.

Layout (djghosh13/geneval README, "Image generation"; read by its `evaluation/evaluate_images.py`)::

    OUT/00000/metadata.jsonl      the prompt's line of evaluation_metadata.jsonl (one JSON object)
    OUT/00000/samples/0000.png    images of the prompt; the scorer takes every `\\d+\\.png` in samples/
    OUT/00001/...                 folders are the prompt's index in the metadata file, zero padded to 5

The rules (include / exclude clauses, colour, position, the six-category mean) are those of
`vargpt.evaluation.geneval_rules.evaluate_geneval`; this module adds what the official evaluator does before
them, with the detector as a parameter:

* `Detector`: image -> `ObjectDetection`s (class, colour, box, confidence). GenEval's own pipeline is
  Mask2Former boxes + a CLIP colour classifier; `geneval_judge.Mask2FormerCLIPDetector` (`--detector geneval`)
  runs them through transformers.
  `--detector shapes` names the shapes world's exact detector (`vargpt.shapes.judges.ShapesDetector`).
* `DetectionFilter`: the official confidence thresholds (0.3, or 0.9 for counting prompts), at most 16
  objects per class and optional box NMS (`max_overlap`, off at 1.0 as in the official default).
  The shapes detector reports a colour-majority share rather than a confidence, so the shapes scorer runs
  with `NO_FILTER`.
* Results: one JSON line per image with the official fields (filename, tag, prompt, correct, reason,
  metadata, details) and a summary like `evaluation/summary_scores.py` (totals, per task, overall = mean of
  the task scores).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from ..atomic_files import save_png_atomic, write_jsonl_atomic, write_text_atomic
from ..data.jsonl import first_rows, read_jsonl
from .geneval_rules import evaluate_geneval, geneval_summary
from .sampling import (
    PromptJob,
    SamplingOptions,
    is_readable_png,
    sample_prompts,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

FOLDER_DIGITS = 5
SAMPLE_DIGITS = 4
_SAMPLE_PATTERN = re.compile(r"\d+\.png")  # the official evaluator's re.match on file names


# ---------------------------------------------------------------- prompts


def default_metadata_path() -> Path:
    """The packaged copy of GenEval's evaluation_metadata.jsonl (553 prompts)."""
    return Path(
        str(resources.files("vargpt.evaluation").joinpath("prompt_sets", "geneval", "evaluation_metadata.jsonl"))
    )


def read_geneval_metadata(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Metadata lines (tag, include, optional exclude, prompt) of a GenEval-format file, first `limit` of them."""
    source = Path(path) if path is not None else default_metadata_path()
    rows = []
    for number, row in read_jsonl(source):
        for key in ("tag", "include", "prompt"):
            if key not in row:
                raise ValueError(f"{source} line {number}: a GenEval metadata line needs {key!r}")
        rows.append(row)
    return first_rows(rows, limit)


# ---------------------------------------------------------------- sampling


class GenEvalLayout:
    """`OUT/<index:05>/metadata.jsonl` + `OUT/<index:05>/samples/<n:04>.png`."""

    format_name = "geneval"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def prompt_dir(self, job: PromptJob) -> Path:
        return self.root / job.key

    def sample_path(self, job: PromptJob, n: int) -> Path:
        return self.prompt_dir(job) / "samples" / f"{n:0{SAMPLE_DIGITS}d}.png"

    def is_complete(self, job: PromptJob, images_per_prompt: int) -> bool:
        meta_file = self.prompt_dir(job) / "metadata.jsonl"
        try:
            if json.loads(meta_file.read_text(encoding="utf-8")) != job.metadata:
                return False
        except (OSError, json.JSONDecodeError):
            return False
        return all(is_readable_png(self.sample_path(job, n)) for n in range(images_per_prompt))

    def write(self, job: PromptJob, images: Sequence[Image.Image]) -> None:
        (self.prompt_dir(job) / "samples").mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(job.metadata) + "\n", self.prompt_dir(job) / "metadata.jsonl")
        for n, image in enumerate(images):
            save_png_atomic(image, self.sample_path(job, n))


def geneval_jobs(metadata: Sequence[Mapping[str, Any]]) -> list[PromptJob]:
    return [
        PromptJob(index=i, key=f"{i:0{FOLDER_DIGITS}d}", prompt=row["prompt"], metadata=dict(row))
        for i, row in enumerate(metadata)
    ]


def sample_geneval(
    pipe,
    out_dir: str | os.PathLike,
    metadata: Sequence[Mapping[str, Any]] | None = None,
    *,
    model_name: str,
    images_per_prompt: int = 4,
    **options: Unpack[SamplingOptions],
) -> dict[str, Any]:
    """Draw GenEval's prompts (default: all 553) into the official layout; resumable. Returns the manifest.
    `options` are `sample_prompts`' batch_size, seed, preset, settings, state and progress."""
    rows = read_geneval_metadata() if metadata is None else list(metadata)
    layout = GenEvalLayout(out_dir)
    return sample_prompts(
        pipe, geneval_jobs(rows), layout, out_dir, model_name=model_name, images_per_prompt=images_per_prompt, **options
    )


# ---------------------------------------------------------------- detectors


@dataclass(frozen=True)
class ObjectDetection:
    """One detected object: its class name, colour name (None when unknown), box (x0, y0, x1, y1) in pixels,
    and the detector's confidence."""

    label: str
    colour: str | None
    bbox: tuple[float, float, float, float]
    score: float


class Detector(Protocol):
    """What GenEval needs from a detector: every object in an image, any order."""

    def __call__(self, image: Image.Image) -> Sequence[ObjectDetection]: ...


DETECTOR_NAMES = ("shapes", "geneval")


def make_detector(
    name: str,
    *,
    detector_model: str | os.PathLike | None = None,
    clip_model: str | os.PathLike | None = None,
    device: str | None = None,
) -> Detector:
    """A built-in detector by name: `shapes` (exact, for the shapes world) or `geneval` (the official judge's
    model families, `geneval_judge.Mask2FormerCLIPDetector`; model ids or folders default to the official
    checkpoints' Hub ports)."""
    if name == "shapes":
        if detector_model is not None or clip_model is not None:
            raise ValueError("the shapes detector takes no models; --detector-model/--clip-model need 'geneval'")
        from ..shapes.judges import ShapesDetector

        return ShapesDetector()
    if name == "geneval":
        from .geneval_judge import DEFAULT_CLIP_MODEL, DEFAULT_DETECTOR_MODEL, Mask2FormerCLIPDetector

        return Mask2FormerCLIPDetector.from_pretrained(
            detector_model or DEFAULT_DETECTOR_MODEL, clip_model or DEFAULT_CLIP_MODEL, device=device
        )
    raise ValueError(f"unknown detector {name!r}; built in: {', '.join(DETECTOR_NAMES)}")


@dataclass(frozen=True)
class DetectionFilter:
    """The official evaluator's selection of detections before the rules (its `--options` defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0

    def select(self, detections: Sequence[ObjectDetection], tag: str) -> list[ObjectDetection]:
        """Per class: confidence above the threshold, most confident first, at most `max_objects`, then
        greedy box NMS when `max_overlap` < 1."""
        limit = self.counting_threshold if tag == "counting" else self.threshold
        kept: list[ObjectDetection] = []
        for label in dict.fromkeys(d.label for d in detections):
            ranked = sorted((d for d in detections if d.label == label and d.score > limit), key=lambda d: -d.score)
            ranked = ranked[: self.max_objects]
            while ranked:
                best = ranked.pop(0)
                kept.append(best)
                if self.max_overlap < 1:
                    ranked = [d for d in ranked if box_iou(best.bbox, d.bbox) < self.max_overlap]
        return kept


OFFICIAL_FILTER = DetectionFilter()
NO_FILTER = DetectionFilter(threshold=-math.inf, counting_threshold=-math.inf, max_objects=10**9, max_overlap=1.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with the official evaluator's inclusive-pixel convention (+1 on widths and heights)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


@dataclass(frozen=True)
class RuleDetection:
    """An `ObjectDetection` as the rules read it (`geneval_rules.RuleObject`): class as `shape`, the box's
    centre and area."""

    shape: str
    colour: str
    bbox: tuple[float, float, float, float]
    centre: tuple[float, float]
    area: int
    score: float

    @classmethod
    def of(cls, d: ObjectDetection) -> RuleDetection:
        x0, y0, x1, y1 = d.bbox
        area = int(max(x1 - x0, 0) * max(y1 - y0, 0))
        return cls(d.label, d.colour or "", (x0, y0, x1, y1), ((x0 + x1) / 2, (y0 + y1) / 2), area, d.score)


# ---------------------------------------------------------------- scoring


def score_detections(
    detections: Sequence[ObjectDetection],
    metadata: Mapping[str, Any],
    image_size: tuple[int, int],
    detection_filter: DetectionFilter = OFFICIAL_FILTER,
) -> tuple[bool, str, dict[str, list[list[float]]]]:
    """(correct, reason, details) of one image: the filter, then GenEval's rules. `details` lists the kept
    boxes per class, as the official `details` field does."""
    kept = detection_filter.select(detections, metadata.get("tag", ""))
    width, height = image_size
    correct, reason = evaluate_geneval([RuleDetection.of(d) for d in kept], metadata, max(width, height))
    details: dict[str, list[list[float]]] = {}
    for d in kept:
        details.setdefault(d.label, []).append([*d.bbox, d.score])
    return correct, reason, details


def geneval_images(folder: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """(image path, metadata) of every sample the official evaluator would read, in sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no GenEval image folder {root}")
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        metadata = json.loads((sub / "metadata.jsonl").read_text(encoding="utf-8"))
        samples = sub / "samples"
        for image in sorted(samples.iterdir()) if samples.is_dir() else []:
            if image.is_file() and _SAMPLE_PATTERN.match(image.name):
                found.append((image, metadata))
    if not found:
        raise ValueError(f"{root} holds no GenEval samples (<00000>/samples/<0000>.png with metadata.jsonl)")
    return found


def score_geneval_folder(
    folder: str | os.PathLike,
    detector: Detector,
    *,
    detection_filter: DetectionFilter = OFFICIAL_FILTER,
    results_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every sample of a GenEval-layout folder. Returns (per-image results, summary); with
    `results_path`, the results are written there as JSON lines (the official results.jsonl fields)."""
    results = []
    for path, metadata in tqdm(geneval_images(folder), desc="geneval scoring", disable=not progress):
        with Image.open(path) as image:
            image = image.convert("RGB")
            correct, reason, details = score_detections(detector(image), metadata, image.size, detection_filter)
        results.append(
            {
                "filename": str(path),
                "tag": metadata["tag"],
                "prompt": metadata["prompt"],
                "correct": correct,
                "reason": reason,
                "metadata": json.dumps(metadata),
                "details": json.dumps(details),
            }
        )
    if results_path is not None:
        write_jsonl_atomic(results, results_path)
    return results, summarize_geneval(results)


def summarize_geneval(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What `summary_scores.py` prints: totals, share of correct images and of prompts with at least one
    correct image, per-task accuracy (with counts) and the overall score (mean over tasks)."""
    if not results:
        raise ValueError("no results to summarise")
    by_prompt: dict[str, bool] = {}
    per_task: dict[str, list[int]] = {}
    for r in results:
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(r["correct"])
        tally = per_task.setdefault(r["tag"], [0, 0])
        tally[0] += bool(r["correct"])
        tally[1] += 1
    scores = geneval_summary(results)
    return {
        "total_images": len(results),
        "total_prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt),
        "tasks": {
            tag: {"score": scores[tag], "correct": per_task[tag][0], "total": per_task[tag][1]} for tag in per_task
        },
        "overall": scores["overall"],
    }
