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

from ..training.recipe import DATA_ROW_KINDS, TASKS, DataSpec
from .dataset import DATA_SPLITS, PARAPHRASE_SPLIT, write_sharegpt_dataset
from .scene import SPLITS, ShapesWorldConfig


def recipe_world_config(image_size: int, generation_layout: str) -> ShapesWorldConfig:
    """The world a recipe's data step draws from: its image size and its text-to-image layout."""
    return ShapesWorldConfig(image_size=image_size, generation_layout=generation_layout)


def split_rows(data_spec: DataSpec, split: str) -> dict[str, int]:
    """Rows per task (and conversations) of one split of a recipe's `DataSpec` (kinds it leaves out: 0)."""
    sizes = getattr(data_spec, split.replace("-", "_"))
    return {kind: int(sizes.get(kind, 0)) for kind in DATA_ROW_KINDS}


def recipe_splits(data_spec: DataSpec) -> tuple[str, ...]:
    """The splits a recipe's data step writes: the three, and `test-paraphrase` when the recipe asks for it."""
    return DATA_SPLITS if any(data_spec.test_paraphrase.values()) else SPLITS


def write_recipe_splits(
    data_spec: DataSpec,
    seed: int,
    folder: str | Path,
    splits: Sequence[str] | None = None,
    *,
    progress: bool = False,
) -> dict[str, dict[str, int]]:
    """Write `splits` of a recipe's data (`data_spec`: its `DataSpec`, `seed`: the recipe's seed) into `folder`.

    Returns the rows written per split and task. Each split depends only on (seed, split), so writing `test`
    alone gives the same test rows as the recipe's full data step. `splits` defaults to `recipe_splits`. The bar
    counts rows, advancing a split at a time (the writer does not report single rows). Conversation rows are
    understanding rows (`meta.task`), so they land in `<split>-understanding.jsonl`.
    """
    known = recipe_splits(data_spec)
    splits = known if splits is None else splits
    unknown = [s for s in splits if s not in known]
    if unknown or not splits:
        hint = (
            f" ({PARAPHRASE_SPLIT} needs a recipe with data.test_paraphrase rows)"
            if PARAPHRASE_SPLIT in unknown
            else ""
        )
        raise ValueError(f"splits must be some of {known}, got {list(splits)}{hint}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    world = recipe_world_config(data_spec.image_size, data_spec.generation_layout)
    ordered = [s for s in known if s in splits]  # the data step's order, whatever order they were asked in
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
                language=data_spec.language,
                n_conversation=rows["conversation"],
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
