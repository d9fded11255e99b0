"""`vargpt eval shapes`: generation (GenEval rules), understanding (exact match) and editing on a split.

Reads a split written by `vargpt.shapes.dataset.write_sharegpt_dataset` (every row carries its exact
symbolic scene in `meta`), runs the model through `VARGPTPipeline`, scores with the programmatic detector,
and reports the held-out colour-shape combinations separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..data.jsonl import read_jsonl
from .detector import read_scene
from .diversity import distinct_samples
from .multiturn import conversation_summary, score_conversations
from .scene import Scene
from .scoring import (
    edit_check,
    evaluate_generated_image,
    geneval_summary,
    scene_overlap,
    understanding_by_form,
    vqa_accuracy,
)

_OVERLAP_KEYS = ("object_recall", "object_precision", "background")


def read_rows(jsonl: str | Path) -> list[dict[str, Any]]:
    path = Path(jsonl)
    rows = []
    for number, row in read_jsonl(path):
        if "meta" not in row or "task" not in row["meta"]:
            raise ValueError(f"{path} line {number}: a shapes-world row needs meta.task (written by vargpt)")
        row["_root"] = str(path.parent)
        rows.append(row)
    return rows


def _image_path(row: dict[str, Any], index: int) -> Path:
    return Path(row["_root"]) / row["images"][index]


def _question(row: dict[str, Any]) -> str:
    return row["messages"][0]["content"].replace("<image>", "").strip()


def _batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prompt_shuffled_baseline(drawn: list[tuple[dict[str, Any], Image.Image]]) -> dict[str, float]:
    """GenEval scores of the same images judged against another prompt of their category (the next one, cyclically).

    GenEval's rules only ask for what a prompt names, so an image full of crisp shapes passes many prompts it was
    not drawn for. This is the score a model that ignores its prompt would get on this split; generation is
    prompt following only as far as `generation.overall` exceeds it. Categories with one prompt are left out.
    """
    by_tag: dict[str, list[tuple[dict[str, Any], Image.Image]]] = {}
    for row, image in drawn:
        by_tag.setdefault(row["meta"]["category"], []).append((row, image))
    results = []
    for tag, items in by_tag.items():
        if len(items) < 2:
            continue
        for i, (_, image) in enumerate(items):
            other = items[(i + 1) % len(items)][0]
            results.append({"tag": tag, "correct": evaluate_generated_image(image, other["meta"]["geneval"])[0]})
    return geneval_summary(results) if results else {}


def editing_baselines(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Partial editing scores (`scene_overlap` against each row's target) of two images that need no model.

    `source_copied`: the source image returned as is: every edit changes one thing, so it keeps most of the
    scene and is what a model that ignores the instruction could reach. `other_row_target`: the next row's
    target, a well-drawn scene that ignores this row's source. A model edits only as far as its partial scores
    exceed both.
    """
    if not rows:
        return {}
    scored: dict[str, list[dict[str, float]]] = {"source_copied": [], "other_row_target": []}
    for i, row in enumerate(rows):
        target = Scene.from_dict(row["meta"]["target_scene"])
        other = rows[(i + 1) % len(rows)]
        with Image.open(_image_path(row, 0)) as source, Image.open(_image_path(other, 1)) as other_target:
            scored["source_copied"].append(scene_overlap(read_scene(source.convert("RGB")), target))
            scored["other_row_target"].append(scene_overlap(read_scene(other_target.convert("RGB")), target))
    return {name: _mean_overlap(values) for name, values in scored.items()}


def _mean_overlap(values: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: sum(v[key] for v in values) / len(values) for key in _OVERLAP_KEYS}


def evaluate_split(
    pipe,
    jsonl: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    grid_path: str | Path | None = None,
    progress: bool = True,
    samples_per_prompt: int = 0,
    diversity_prompts: int = 32,
) -> dict[str, Any]:
    """Score a model on one split; `limit` caps the rows of each task (conversations count as their own task).

    Conversation rows (broad-language recipes) add `conversation`, the multi-turn accuracy; `samples_per_prompt`
    >= 2 adds `distinct_samples`: that many samples of each of the first `diversity_prompts` prompts, the share
    of them that differ and their accuracy. Returns the report dict."""
    rows = read_rows(jsonl)
    by_task = _rows_by_task(rows, limit)
    report: dict[str, Any] = {
        "split_file": Path(jsonl).name,
        "counts": {k: len(v) for k, v in by_task.items() if v or k != "conversation"},
        "image_settings": pipe.image_config.to_dict(),
    }
    with Image.open(_image_path(rows[0], 0)) as first:
        world_size = first.size  # models drawing at a lower resolution are scored at the world's size

    def to_world(image: Image.Image) -> Image.Image:
        return image if image.size == world_size else image.resize(world_size, Image.NEAREST)

    run = _TaskRun(pipe, batch_size, seed, to_world, progress)
    gen_results, drawn, samples = run.generation(by_task["generation"])
    vqa_preds, vqa_items = run.understanding(by_task["understanding"])
    edit_results, edit_samples = run.editing(by_task["editing"])

    report.update(_summaries(gen_results, vqa_preds, vqa_items, edit_results))
    if drawn:
        report["generation_prompt_shuffled"] = prompt_shuffled_baseline(drawn)
    if by_task["editing"]:
        report["editing_baselines"] = editing_baselines(by_task["editing"])
    report.update(_turn_and_sample_scores(run, by_task, samples_per_prompt, diversity_prompts))
    report["unseen_combinations"] = _summaries(
        [r for r in gen_results if r["unseen"]],
        [p for p, i in zip(vqa_preds, vqa_items, strict=True) if i["unseen"]],
        [i for i in vqa_items if i["unseen"]],
        [r for r in edit_results if r["unseen"]],
    )
    if grid_path is not None:
        report.update(_save_grids(grid_path, samples, edit_samples))
    return report


def _turn_and_sample_scores(
    run: _TaskRun, by_task: dict[str, list[dict[str, Any]]], samples_per_prompt: int, diversity_prompts: int
) -> dict[str, Any]:
    """The multi-turn score of the conversation rows and, when asked, the distinct-sample rate."""
    out: dict[str, Any] = {}
    conversations = score_conversations(
        run.pipe, by_task["conversation"], batch_size=run.batch_size, seed=run.seed, to_world=run.to_world
    )
    if conversations:
        out["conversation"] = conversation_summary(conversations)
        unseen = [r for r in conversations if r["unseen"]]
        if unseen:
            out["unseen_conversation"] = conversation_summary(unseen)
    if samples_per_prompt and by_task["generation"]:
        out["distinct_samples"] = distinct_samples(
            run.pipe,
            by_task["generation"],
            samples_per_prompt=samples_per_prompt,
            prompts=diversity_prompts,
            batch_size=run.batch_size,
            seed=run.seed,
            to_world=run.to_world,
        )
    return out


def _rows_by_task(rows: Sequence[dict[str, Any]], limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """The rows of each task in file order, at most `limit` each; free-form captions are left out, and
    conversation rows (understanding rows of several turns) form a task of their own."""
    by_task: dict[str, list[dict[str, Any]]] = {
        "generation": [],
        "understanding": [],
        "editing": [],
        "conversation": [],
    }
    for row in rows:
        task, category = row["meta"]["task"], row["meta"].get("category")
        if task == "understanding" and category == "conversation":
            task = "conversation"
        elif task == "understanding" and category == "caption":
            continue  # free-form captions have no single exact answer
        if task in by_task and (limit is None or len(by_task[task]) < limit):
            by_task[task].append(row)
    return by_task


class _TaskRun:
    """The model's answers to one task's rows, batch by batch, scored as they come (one method per task)."""

    def __init__(self, pipe, batch_size: int, seed: int, to_world, progress: bool) -> None:
        self.pipe, self.batch_size, self.seed = pipe, batch_size, seed
        self.to_world, self.progress = to_world, progress

    def _chunks(self, rows: Sequence[dict[str, Any]], desc: str):
        return tqdm(list(_batches(rows, self.batch_size)), desc=desc, disable=not self.progress)

    def generation(self, rows: Sequence[dict[str, Any]]):
        """(results, (row, image) pairs drawn, up to 16 grid samples) of the text-to-image rows."""
        results, samples = [], []
        drawn: list[tuple[dict[str, Any], Image.Image]] = []
        for chunk in self._chunks(rows, "generation"):
            prompts = [_question(r) for r in chunk]
            # prompt i draws from seed + i: the splits repeat prompts (1,200 test prompts hold 149 distinct texts),
            # and a shared seed would score one image many times over instead of the model's distribution for it
            seeds = [self.seed + len(drawn) + i for i in range(len(chunk))]
            images = [self.to_world(i) for i in self.pipe.generate(prompts, seed=seeds)]
            for row, image in zip(chunk, images, strict=True):
                drawn.append((row, image))
                correct, reason = evaluate_generated_image(image, row["meta"]["geneval"])
                results.append(
                    {
                        "tag": row["meta"]["category"],
                        "correct": correct,
                        "unseen": bool(row["meta"].get("unseen_combination")),
                        "reason": reason,
                    }
                )
                if len(samples) < 16:
                    samples.append((image, _question(row), correct))
        return results, drawn, samples

    def understanding(self, rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
        """(answers, items to score them against) of the question rows."""
        preds, items = [], []
        for chunk in self._chunks(rows, "understanding"):
            answers = self.pipe.chat_batch(
                [_question(r) for r in chunk], [[str(_image_path(r, 0))] for r in chunk], max_new_tokens=12
            )
            for row, answer in zip(chunk, answers, strict=True):
                preds.append(answer)
                items.append(
                    {
                        "answer": row["meta"]["answer"],
                        "qtype": row["meta"]["category"],
                        "form": row["meta"].get("form"),  # rows written before forms were recorded have none
                        "unseen": bool(row["meta"].get("unseen_combination")),
                    }
                )
        return preds, items

    def editing(self, rows: Sequence[dict[str, Any]]):
        """(results, up to 8 grid samples) of the editing rows."""
        results: list[dict[str, Any]] = []
        samples: list[tuple[Image.Image, Image.Image, Image.Image, str, bool]] = []
        for chunk in self._chunks(rows, "editing"):
            sources = [str(_image_path(r, 0)) for r in chunk]
            instructions = [r["meta"]["instruction"] for r in chunk]
            edited = [self.to_world(i) for i in self.pipe.edit_batch(sources, instructions, self.seed)]
            for row, image in zip(chunk, edited, strict=True):
                target = Scene.from_dict(row["meta"]["target_scene"])
                ok, reason = edit_check(image, target, Scene.from_dict(row["meta"]["source_scene"]))
                results.append(
                    {
                        "kind": row["meta"]["category"],
                        "correct": ok,
                        "unchanged": reason.startswith("unchanged"),
                        "unseen": bool(row["meta"].get("unseen_combination")),
                        **scene_overlap(read_scene(image), target),
                    }
                )
                if len(samples) < 8:
                    with Image.open(_image_path(row, 0)) as source, Image.open(_image_path(row, 1)) as wanted:
                        samples.append(
                            (source.convert("RGB"), image, wanted.convert("RGB"), row["meta"]["instruction"], ok)
                        )
        return results, samples


def _save_grids(grid_path: str | Path, samples, edit_samples) -> dict[str, str]:
    """Write the generation grid to `grid_path` and the editing one beside it; the report's entries for them."""
    saved = {}
    if samples:
        sample_grid(samples).save(grid_path)
        saved["sample_grid"] = str(grid_path)
    if edit_samples:
        edit_path = Path(grid_path).with_name(f"{Path(grid_path).stem}-editing.png")
        edit_grid(edit_samples).save(edit_path)
        saved["editing_grid"] = str(edit_path)
    return saved


def _summaries(gen_results, vqa_preds, vqa_items, edit_results) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if gen_results:
        out["generation"] = geneval_summary(gen_results) | {"n": len(gen_results)}
    if vqa_items:
        out["understanding"] = vqa_accuracy(vqa_preds, vqa_items) | {"n": len(vqa_items)}
        forms = understanding_by_form(vqa_preds, vqa_items)
        if forms:
            out["understanding_forms"] = forms
    if edit_results:
        by_kind: dict[str, list[bool]] = {}
        for r in edit_results:
            by_kind.setdefault(r["kind"], []).append(r["correct"])
        out["editing"] = {
            "accuracy": sum(r["correct"] for r in edit_results) / len(edit_results),
            **{k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "n": len(edit_results),
            "unchanged": sum(r["unchanged"] for r in edit_results) / len(edit_results),
            **_mean_overlap(edit_results),
        }
    return out


def _wrapped(text: str, width: int, max_lines: int) -> str:
    """Text broken at spaces into lines of about `width` characters, at most `max_lines` of them."""
    line, lines = "", []
    for word in text.split():
        if line and len(line) + len(word) > width:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:max_lines])


def sample_grid(samples: Sequence[tuple[Image.Image, str, bool]], scale: int = 3, columns: int = 8) -> Image.Image:
    """Generated images with a green (correct) or red (wrong) frame, prompts underneath in small type."""
    size = samples[0][0].size[0] * scale
    label = 34
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (columns * (size + 8), rows * (size + 8 + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, prompt, correct) in enumerate(samples):
        x, y = (i % columns) * (size + 8), (i // columns) * (size + 8 + label)
        draw.rectangle((x, y, x + size + 7, y + size + 7), fill=(40, 160, 60) if correct else (200, 40, 40))
        sheet.paste(image.resize((size, size), Image.NEAREST), (x + 4, y + 4))
        draw.multiline_text((x + 2, y + size + 9), _wrapped(prompt, 18, 3), fill="black", spacing=0)
    return sheet


def edit_grid(
    samples: Sequence[tuple[Image.Image, Image.Image, Image.Image, str, bool]], scale: int = 3
) -> Image.Image:
    """One row per edit: source, the model's image (green frame when exactly right, red otherwise), target, and
    the instruction beside them."""
    size = samples[0][0].size[0] * scale
    text_width, gap = 200, 8
    sheet = Image.new("RGB", (3 * (size + gap) + text_width, len(samples) * (size + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (source, edited, target, instruction, correct) in enumerate(samples):
        y = i * (size + gap)
        for j, image in enumerate((source, edited, target)):
            x = j * (size + gap)
            if j == 1:
                draw.rectangle(
                    (x, y, x + size + gap - 1, y + size + gap - 1), fill=(40, 160, 60) if correct else (200, 40, 40)
                )
            sheet.paste(image.resize((size, size), Image.NEAREST), (x + gap // 2, y + gap // 2))
        draw.multiline_text((3 * (size + gap) + 4, y + 4), _wrapped(instruction, 30, 4), fill="black", spacing=2)
    return sheet
