"""DPG-Bench: sampling into its layout, and its question-dependency scoring with a pluggable VQA model.

Layout (ELLA README, "DPG-Bench"; read by `dpg_bench/compute_dpg_bench.py`): one PNG per prompt, named
like the prompt's file (`<id>.png` for `prompts/<id>.txt`; our prompts.jsonl carries that id), holding the
prompt's 4 images as a 2x2 grid. The scorer crops tiles (0,0), (r,0), (0,r), (r,r) with r its `--resolution`,
i.e. image 0 top left, 1 top right, 2 bottom left, 3 bottom right.

Scoring as `compute_dpg_bench.py` does it, from its question file (`dpg_bench.csv`: item_id,
proposition_id, dependency, tuple, question_natural_language, ...):

* per tile, each question scores 1 when the VQA answer is exactly "yes"; then, walking the questions in
  file order, a question whose parent (any id in `dependency`, 0 meaning none) has score 0 *at that point*
  is set to 0, so zeroing cascades down a chain (1 <- 2 <- 3: a "no" to 1 zeroes 2, hence 3); the tile's
  score is the mean over questions;
* an image's score is the mean over its tiles; the DPG-Bench score is the mean over images, x100;
* category scores (L2 = the tuple's text before "(", e.g. "entity - whole"; L1 = before the first "-":
  entity, attribute, relation, global, other) average the per-question answers of the *last* tile read,
  *before* dependency zeroing: that is what the official script aggregates (`qid2scores_orig`), kept so
  numbers compare with published ones. `write_category_csv` writes them with the overall score as one
  table (level, category, score, questions).

Judges: `resolve_vqa("shapes")` is the shapes-world VQA (`vargpt.shapes.judges.ShapesVQA`);
`resolve_vqa("hf:ID_OR_DIR")` a transformers VQA model (`dpg_judge.TransformersVQA`, BLIP family) standing in for
the official mPLUG-large.

One deliberate difference: the official loader skips the CSV's first data row (`if i == 0: continue`
after pandas has already consumed the header), which drops item 0's first question, after which its
children's parent lookup fails and the script leaves item 0 out. Here every row is read.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from ..atomic_files import save_png_atomic, write_jsonl_atomic, write_text_atomic
from ..data.jsonl import first_rows, read_jsonl
from .sampling import (
    PromptJob,
    SamplingOptions,
    is_readable_png,
    sample_prompts,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

GRID_SIDE = 2
IMAGES_PER_PROMPT = GRID_SIDE * GRID_SIDE


# ---------------------------------------------------------------- prompts and questions


def default_prompts_path() -> Path:
    """The packaged copy of DPG-Bench's 1,065 prompts as {"id", "prompt"} lines."""
    return Path(str(resources.files("vargpt.evaluation").joinpath("prompt_sets", "dpg_bench", "prompts.jsonl")))


def read_dpg_prompts(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """{"id", "prompt"} rows of a DPG-Bench prompt file (default: the packaged one), first `limit` of them."""
    source = Path(path) if path is not None else default_prompts_path()
    rows = []
    for number, row in read_jsonl(source):
        if not isinstance(row.get("id"), str) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{source} line {number}: a DPG-Bench prompt needs string 'id' and 'prompt'")
        if "/" in row["id"] or row["id"].startswith("."):
            raise ValueError(f"{source} line {number}: id {row['id']!r} cannot be a file name")
        rows.append(row)
    return first_rows(rows, limit)


@dataclass(frozen=True)
class DPGQuestion:
    """One question of an item: `parents` are the proposition ids it depends on (0, "none", dropped)."""

    proposition_id: int
    parents: tuple[int, ...]
    category: str
    question: str

    @property
    def l1_category(self) -> str:
        return self.category.split("-")[0].strip()


def read_dpg_questions(path: str | os.PathLike) -> dict[str, list[DPGQuestion]]:
    """Questions per item id from DPG-Bench's `dpg_bench.csv` (every row; see the module docstring)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no DPG-Bench question file {source} (dpg_bench.csv from TencentQQGYLab/ELLA)")
    items: dict[str, list[DPGQuestion]] = defaultdict(list)
    with source.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"item_id", "proposition_id", "dependency", "tuple", "question_natural_language"}
        missing = needed - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{source} lacks the columns {sorted(missing)}")
        for number, row in enumerate(reader, 2):
            try:
                parents = tuple(int(p) for p in row["dependency"].split(",") if int(p) != 0)
                qid = int(row["proposition_id"])
            except ValueError as err:
                raise ValueError(f"{source} line {number}: proposition_id and dependency must be integers") from err
            items[row["item_id"]].append(
                DPGQuestion(qid, parents, row["tuple"].split("(")[0].strip(), row["question_natural_language"])
            )
    return dict(items)


# ---------------------------------------------------------------- sampling


class DPGLayout:
    """`OUT/<id>.png`: the prompt's 4 images as a 2x2 grid (0 1 / 2 3)."""

    format_name = "dpg_bench"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, job: PromptJob) -> Path:
        return self.root / f"{job.key}.png"

    def is_complete(self, job: PromptJob, images_per_prompt: int) -> bool:
        return is_readable_png(self.path(job))

    def write(self, job: PromptJob, images: Sequence[Image.Image]) -> None:
        save_png_atomic(make_grid(images), self.path(job))


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Four equal images as DPG-Bench's 2x2 grid: image i at column i % 2, row i // 2."""
    if len(images) != IMAGES_PER_PROMPT:
        raise ValueError(f"a DPG-Bench grid holds {IMAGES_PER_PROMPT} images, got {len(images)}")
    size = images[0].size
    if any(image.size != size for image in images):
        raise ValueError(f"grid images must share one size, got {[image.size for image in images]}")
    width, height = size
    grid = Image.new("RGB", (GRID_SIDE * width, GRID_SIDE * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % GRID_SIDE) * width, (i // GRID_SIDE) * height))
    return grid


def grid_tiles(grid: Image.Image, tile_size: tuple[int, int] | None = None, count: int = IMAGES_PER_PROMPT):
    """The tiles the official scorer reads, in its order (top left, top right, bottom left, bottom right)."""
    if not 1 <= count <= IMAGES_PER_PROMPT:
        raise ValueError(f"tile count must be 1..{IMAGES_PER_PROMPT}, got {count}")
    width, height = tile_size or (grid.width // GRID_SIDE, grid.height // GRID_SIDE)
    boxes = [(0, 0), (width, 0), (0, height), (width, height)]
    return [grid.crop((x, y, x + width, y + height)) for x, y in boxes[:count]]


def dpg_jobs(prompts: Sequence[Mapping[str, str]]) -> list[PromptJob]:
    return [
        PromptJob(index=i, key=row["id"], prompt=row["prompt"], metadata=dict(row)) for i, row in enumerate(prompts)
    ]


def sample_dpg(
    pipe,
    out_dir: str | os.PathLike,
    prompts: Sequence[Mapping[str, str]] | None = None,
    *,
    model_name: str,
    **options: Unpack[SamplingOptions],
) -> dict[str, Any]:
    """Draw DPG-Bench's prompts (default: all 1,065) as 2x2 grids named by prompt id; resumable.
    `options` are `sample_prompts`' batch_size, seed, preset, settings, state and progress."""
    rows = read_dpg_prompts() if prompts is None else list(prompts)
    layout = DPGLayout(out_dir)
    return sample_prompts(
        pipe, dpg_jobs(rows), layout, out_dir, model_name=model_name, images_per_prompt=IMAGES_PER_PROMPT, **options
    )


# ---------------------------------------------------------------- scoring


class VQAModel(Protocol):
    """Answers a yes/no question about an image; DPG-Bench counts only an exact "yes"."""

    def __call__(self, image: Image.Image, question: str) -> str: ...


@dataclass(frozen=True)
class DPGItemResult:
    """One image: per tile the raw (0/1) and dependency-adjusted question scores, and the image's score."""

    item_id: str
    tile_scores: tuple[float, ...]
    score: float
    raw_scores: tuple[dict[int, float], ...]
    adjusted_scores: tuple[dict[int, float], ...]
    answers: tuple[dict[int, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "score": self.score,
            "tile_scores": list(self.tile_scores),
            "raw_scores": [dict(s) for s in self.raw_scores],
            "adjusted_scores": [dict(s) for s in self.adjusted_scores],
            "answers": [dict(a) for a in self.answers],
        }


def apply_dependencies(raw: Mapping[int, float], questions: Sequence[DPGQuestion]) -> dict[int, float]:
    """Zero every question one of whose parents has score 0, in question order and reading the scores as
    they are being zeroed, like the official loop: a parent zeroed earlier in the file zeroes its children
    too (a parent listed *after* its child is read before its own zeroing, as there)."""
    adjusted = dict(raw)
    for q in questions:
        for parent in q.parents:
            if parent not in adjusted:
                raise ValueError(f"question {q.proposition_id} depends on {parent}, which the item does not have")
            if adjusted[parent] == 0:
                adjusted[q.proposition_id] = 0.0
                break
    return adjusted


def score_answers(
    item_id: str, questions: Sequence[DPGQuestion], answers_per_tile: Sequence[Mapping[int, str]]
) -> DPGItemResult:
    """The official per-image arithmetic, from the VQA answers of each tile."""
    if not questions:
        raise ValueError(f"item {item_id!r} has no questions")
    if not answers_per_tile:
        raise ValueError(f"item {item_id!r} has no tiles")
    raws, adjusted, tile_scores = [], [], []
    for answers in answers_per_tile:
        raw = {q.proposition_id: float(answers[q.proposition_id] == "yes") for q in questions}
        kept = apply_dependencies(raw, questions)
        raws.append(raw)
        adjusted.append(kept)
        tile_scores.append(sum(kept.values()) / len(kept))
    return DPGItemResult(
        item_id,
        tuple(tile_scores),
        sum(tile_scores) / len(tile_scores),
        tuple(raws),
        tuple(adjusted),
        tuple(dict(a) for a in answers_per_tile),
    )


def score_dpg_image(
    item_id: str,
    grid: Image.Image,
    questions: Sequence[DPGQuestion],
    vqa: VQAModel,
    *,
    tiles: int = IMAGES_PER_PROMPT,
    tile_size: tuple[int, int] | None = None,
) -> DPGItemResult:
    """Ask every question of an item about each tile of its grid image and score the answers."""
    answers = [
        {q.proposition_id: vqa(tile, q.question) for q in questions} for tile in grid_tiles(grid, tile_size, tiles)
    ]
    return score_answers(item_id, questions, answers)


def summarize_dpg(results: Sequence[DPGItemResult], questions: Mapping[str, Sequence[DPGQuestion]]) -> dict[str, Any]:
    """DPG-Bench score (mean image score x100) and the official L1 / L2 category scores (x100)."""
    if not results:
        raise ValueError("no results to summarise")
    l2: dict[str, list[float]] = defaultdict(list)
    for result in results:
        last_raw = result.raw_scores[-1]
        for q in questions[result.item_id]:
            l2[q.category].append(last_raw[q.proposition_id])
    l1: dict[str, list[float]] = defaultdict(list)
    for category, values in l2.items():
        l1[category.split("-")[0].strip()].extend(values)

    def mean100(values: Sequence[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return {
        "dpg_score": mean100([r.score for r in results]),
        "images": len(results),
        "l1_categories": {k: mean100(v) for k, v in sorted(l1.items())},
        "l2_categories": {k: mean100(v) for k, v in sorted(l2.items())},
        "l1_questions": {k: len(v) for k, v in sorted(l1.items())},
        "l2_questions": {k: len(v) for k, v in sorted(l2.items())},
    }


CATEGORY_CSV_FIELDS = ("level", "category", "score", "questions")


def write_category_csv(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The overall score and the L1 / L2 category scores (x100) as one CSV, the table papers report:
    level "overall" (questions = images scored), "L1" and "L2" (questions = answers averaged)."""
    for key in ("dpg_score", "images", "l1_categories", "l2_categories", "l1_questions", "l2_questions"):
        if key not in summary:
            raise ValueError(f"not a summarize_dpg summary: it lacks {key!r}")
    rows = [("overall", "overall", summary["dpg_score"], summary["images"])]
    for level in ("l1", "l2"):
        counts = summary[f"{level}_questions"]
        rows += [(level.upper(), name, score, counts[name]) for name, score in summary[f"{level}_categories"].items()]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CATEGORY_CSV_FIELDS)
    writer.writerows((level, name, f"{score:.4f}", count) for level, name, score, count in rows)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(buffer.getvalue(), target)
    return target


def resolve_vqa(spec: str, *, device: str | None = None) -> VQAModel:
    """The judge a `--vqa` value names: "shapes" (ShapesVQA) or "hf:<Hub id or local folder>" (a transformers
    VQA model, see `dpg_judge`, on `device`: default cuda when available, else cpu)."""
    from .dpg_judge import TransformersVQA, parse_vqa_spec

    kind, target = parse_vqa_spec(spec)
    if kind == "shapes":
        from ..shapes.judges import ShapesVQA

        return ShapesVQA()
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TransformersVQA.from_pretrained(target, device=device)


def score_dpg_folder(
    folder: str | os.PathLike,
    questions: Mapping[str, Sequence[DPGQuestion]],
    vqa: VQAModel,
    *,
    tiles: int = IMAGES_PER_PROMPT,
    tile_size: tuple[int, int] | None = None,
    results_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[list[DPGItemResult], dict[str, Any]]:
    """Score every `<id>.png` of a DPG-Bench folder whose id has questions. Returns (results, summary);
    `results_path` receives one JSON line per image. Images without questions are an error (a wrong folder
    or question file), other files are ignored."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no DPG-Bench image folder {root}")
    images = sorted(p for p in root.glob("*.png") if not p.name.startswith("."))
    if not images:
        raise ValueError(f"{root} holds no <id>.png images")
    unknown = [p.name for p in images if p.stem not in questions]
    if unknown:
        raise ValueError(f"no questions for {len(unknown)} images, e.g. {unknown[:3]}; check the question file")
    results = []
    for path in tqdm(images, desc="dpg scoring", disable=not progress):
        with Image.open(path) as grid:
            results.append(
                score_dpg_image(
                    path.stem, grid.convert("RGB"), questions[path.stem], vqa, tiles=tiles, tile_size=tile_size
                )
            )
    if results_path is not None:
        write_jsonl_atomic((r.to_dict() for r in results), results_path)
    return results, summarize_dpg(results, questions)
