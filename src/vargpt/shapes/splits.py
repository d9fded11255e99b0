"""A recipe's data step on its own: the shapes-world splits it trains and is scored on, without training.

`vargpt train` writes these splits into its run folder before the tokenizer; `vargpt data shapes` writes the very
same rows and images (same seeds, same per-task files) into any folder, so `vargpt eval shapes --data DIR` scores
a model on a fresh install without the recipe's hour of training.

Layout of the folder (as a run's `data/`): `<split>.jsonl`, `<split>-<task>.jsonl` for every task (the same rows
split by `meta.task`, which stages pick their mixture from) and the PNGs under `images/<split>/`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..training.recipe import TASKS, DataSpec
from .dataset import write_sharegpt_dataset
from .scene import SPLITS, ShapesWorldConfig


def recipe_world_config(image_size: int, generation_layout: str) -> ShapesWorldConfig:
    """The world a recipe's data step draws from: its image size and its text-to-image layout."""
    return ShapesWorldConfig(image_size=image_size, generation_layout=generation_layout)


def split_rows(data_spec: DataSpec, split: str) -> dict[str, int]:
    """Rows per task of one split of a recipe's `DataSpec` (tasks it leaves out: 0)."""
    sizes = getattr(data_spec, split)
    return {task: int(sizes.get(task, 0)) for task in TASKS}


def write_recipe_splits(
    data_spec: DataSpec,
    seed: int,
    folder: str | Path,
    splits: Sequence[str] = SPLITS,
    *,
    progress: bool = False,
) -> dict[str, dict[str, int]]:
    """Write `splits` of a recipe's data (`data_spec`: its `DataSpec`, `seed`: the recipe's seed) into `folder`.

    Returns the rows written per split and task. Each split depends only on (seed, split), so writing `test`
    alone gives the same test rows as the recipe's full data step. The bar counts rows, advancing a split at a
    time (the writer does not report single rows).
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be some of {SPLITS}, got {list(splits)}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    world = recipe_world_config(data_spec.image_size, data_spec.generation_layout)
    ordered = [s for s in SPLITS if s in splits]  # the data step's order, whatever order they were asked in
    counts: dict[str, dict[str, int]] = {}
    bar = _bar(sum(sum(split_rows(data_spec, s).values()) for s in ordered), progress)
    try:
        for split in ordered:
            rows = split_rows(data_spec, split)
            bar.set_description(f"writing {split}")
            path = write_sharegpt_dataset(
                root,
                split,
                rows["understanding"],
                rows["generation"],
                rows["editing"],
                seed=seed,
                image_size=data_spec.image_size,
                config=world,
            )
            counts[split] = _write_task_files(path, root, split)
            bar.update(sum(counts[split].values()))
    finally:
        bar.close()
    return counts


def _write_task_files(split_file: Path, root: Path, split: str) -> dict[str, int]:
    """`<split>-<task>.jsonl`: the split's lines, byte for byte, grouped by task in their original order."""
    by_task: dict[str, list[str]] = {task: [] for task in TASKS}
    for line in split_file.read_text(encoding="utf-8").splitlines():
        by_task[json.loads(line)["meta"]["task"]].append(line)
    for task, lines in by_task.items():
        (root / f"{split}-{task}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {task: len(lines) for task, lines in by_task.items()}


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", file=sys.stderr, disable=not enabled)
