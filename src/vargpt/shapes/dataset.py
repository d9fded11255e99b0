"""Shapes-world datasets on disk in the sharegpt layout the trainers read.

One JSONL row per item: {"messages": [user, assistant], "images": [...], "meta": {...}}. Image placeholders
appear in the order of the "images" list: understanding rows put "<image>" in the user turn, generation rows
put "<image_gen>" in the assistant turn, editing rows do both (source first, then target). "meta" carries what
scoring needs later: task, category, split, the unseen-combination flag and the symbolic scene(s), plus the
GenEval metadata of generation rows and the question type, form and answer of understanding rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from . import broad_dataset
from .broad import LANGUAGES
from .conversations import conversation_rows
from .scene import ShapesWorldConfig
from .world import EDIT_KINDS, GENEVAL_CATEGORIES, SPLITS, ShapesWorld

# Test scenes worded only with the broad language's held-out phrasings (see `vargpt.shapes.broad`)
PARAPHRASE_SPLIT = "test-paraphrase"
DATA_SPLITS = (*SPLITS, PARAPHRASE_SPLIT)
# keeps the paraphrase split's random stream apart from every (seed, split) stream of the three splits
_PARAPHRASE_SEED_OFFSET = 1_000_003

IMAGE_TOKEN = "<image>"
IMAGE_GEN_TOKEN = "<image_gen>"


class _ImageWriter:
    """Saves PNGs as images/<split>/000001.png, ... and returns paths relative to the dataset folder."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split, self.count = root, split, 0
        (root / "images" / split).mkdir(parents=True, exist_ok=True)

    def __call__(self, image: Image.Image) -> str:
        self.count += 1
        relative = f"images/{self.split}/{self.count:06d}.png"
        image.save(self.root / relative)
        return relative


def _row(user: str, assistant: str, images: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages, "images": images, "meta": meta}


def _understanding_rows(world: ShapesWorld, split: str, n: int, caption_fraction: float, save) -> list[dict]:
    return broad_dataset.understanding_rows(world, split, split, n, caption_fraction, save, world.vqa)


def _generation_rows(world: ShapesWorld, split: str, n: int, save) -> list[dict]:
    rows = []
    for index in range(n):
        item = world.t2i_prompt(GENEVAL_CATEGORIES[index % len(GENEVAL_CATEGORIES)], split)
        meta = {
            "task": "generation",
            "split": split,
            "category": item.metadata["tag"],
            "tags": [item.metadata["tag"]],
            "geneval": item.metadata,
            "unseen_combination": item.unseen_combination,
            "scene": item.scene.to_dict(),
        }
        rows.append(_row(item.prompt, IMAGE_GEN_TOKEN, [save(world.render(item.scene))], meta))
    return rows


def _editing_rows(world: ShapesWorld, split: str, n: int, save) -> list[dict]:
    rows = []
    for index in range(n):
        triple = world.edit_triple(split, EDIT_KINDS[index % len(EDIT_KINDS)])
        meta = {
            "task": "editing",
            "split": split,
            "category": triple.kind,
            "tags": [triple.kind],
            "instruction": triple.instruction,
            "unseen_combination": triple.unseen_combination,
            "source_scene": triple.source.to_dict(),
            "target_scene": triple.target.to_dict(),
        }
        images = [save(world.render(triple.source)), save(world.render(triple.target))]
        rows.append(_row(IMAGE_TOKEN + triple.instruction, IMAGE_GEN_TOKEN, images, meta))
    return rows


def write_sharegpt_dataset(
    out_dir: str | Path,
    split: str,
    n_understanding: int,
    n_generation: int,
    n_editing: int,
    seed: int = 0,
    *,
    image_size: int = 32,
    config: ShapesWorldConfig | None = None,
    caption_fraction: float = 0.2,
    language: str = "templates",
    n_conversation: int = 0,
) -> Path:
    """Write `<out_dir>/<split>.jsonl` and its PNGs under `<out_dir>/images/<split>/`; return the JSONL path.

    Rows come in blocks (understanding, generation, editing, then conversations); categories cycle so each is
    balanced. The same (seed, split) always writes the same files; different splits never share a scene or a
    prompt. `language="broad"` words rows with the broad grammar and allows `n_conversation` multi-turn rows
    and the `test-paraphrase` split (test scenes, held-out phrasings only); "templates" writes exactly the rows
    it always wrote.
    """
    _check_arguments(split, language, caption_fraction, n_understanding, n_generation, n_editing, n_conversation)
    root = Path(out_dir)
    save = _ImageWriter(root, split)
    if language == "templates":
        world = ShapesWorld(seed * len(SPLITS) + SPLITS.index(split), image_size=image_size, config=config)
        rows = _understanding_rows(world, split, n_understanding, caption_fraction, save)
        rows += _generation_rows(world, split, n_generation, save)
        rows += _editing_rows(world, split, n_editing, save)
    else:
        counts = (n_understanding, n_generation, n_editing, n_conversation)
        rows = _broad_rows(split, counts, seed, image_size, config, caption_fraction, save)
    path = root / f"{split}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _check_arguments(split: str, language: str, caption_fraction: float, *counts: int) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if split not in DATA_SPLITS or (split == PARAPHRASE_SPLIT and language != "broad"):
        known = DATA_SPLITS if language == "broad" else SPLITS
        raise ValueError(f"split must be one of {known} in the {language} language, got {split!r}")
    names = ("n_understanding", "n_generation", "n_editing", "n_conversation")
    for name, value in zip(names, counts, strict=True):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if counts[3] and language != "broad":
        raise ValueError("conversation rows are written in the broad language only (language='broad')")
    if not 0 <= caption_fraction <= 1:
        raise ValueError(f"caption_fraction must be in [0, 1], got {caption_fraction}")


def _broad_rows(
    split: str,
    counts: tuple[int, int, int, int],
    seed: int,
    image_size: int,
    config: ShapesWorldConfig | None,
    caption_fraction: float,
    save,
) -> list[dict]:
    """The rows of a split in the broad language; the paraphrase split draws test scenes."""
    held_out = split == PARAPHRASE_SPLIT
    scene_split = "test" if held_out else split
    stream = seed * len(SPLITS) + SPLITS.index(scene_split) + (_PARAPHRASE_SEED_OFFSET if held_out else 0)
    world = ShapesWorld(stream, image_size=image_size, config=config)
    n_understanding, n_generation, n_editing, n_conversation = counts
    questions = broad_dataset.broad_questions(world, scene_split, held_out)
    rows = broad_dataset.understanding_rows(
        world, split, scene_split, n_understanding, caption_fraction, save, questions
    )
    rows += broad_dataset.generation_rows(world, split, scene_split, n_generation, save, held_out)
    rows += broad_dataset.editing_rows(world, split, scene_split, n_editing, save, held_out)
    rows += conversation_rows(world, split, scene_split, n_conversation, save, held_out)
    return rows


def validate_sharegpt_dataset(jsonl_path: str | Path) -> int:
    """Check every row of a sharegpt JSONL: roles, placeholders matching images, files present. Return rows."""
    path = Path(jsonl_path)
    count = 0
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            row = json.loads(line)
            messages, images = row.get("messages"), row.get("images", [])
            expected_roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(messages or []))]
            if not messages or [m["role"] for m in messages] != expected_roles:
                raise ValueError(f"{path}:{line_number}: messages must alternate, starting with the user")
            placeholders = sum(m["content"].count(IMAGE_TOKEN) + m["content"].count(IMAGE_GEN_TOKEN) for m in messages)
            if placeholders != len(images):
                raise ValueError(f"{path}:{line_number}: {placeholders} image placeholders but {len(images)} images")
            missing = [p for p in images if not (path.parent / p).is_file()]
            if missing:
                raise ValueError(f"{path}:{line_number}: missing image files {missing}")
            count += 1
    return count
