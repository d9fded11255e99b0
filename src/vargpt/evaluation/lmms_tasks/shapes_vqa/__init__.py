"""Shapes-world VQA as a local lmms-eval task.

`write_shapes_vqa_task(split_jsonl, out_dir)` turns a split written by `write_sharegpt_dataset` into a folder
lmms-eval loads with `--include_path out_dir --tasks shapes_vqa`: a flat document file (one VQA question per
line, absolute image paths) and a task YAML that includes this folder's `_default_template_yaml`. The documents
are the rows `vargpt eval shapes` scores for understanding (captions excluded, same `limit`), in the same order,
so both report the same accuracy for the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ....shapes.evaluate import read_rows

TEMPLATE = Path(__file__).resolve().parent / "_default_template_yaml"


def shapes_vqa_documents(split_jsonl: str | Path, *, limit: int | None = None) -> list[dict]:
    """The scored VQA rows of a shapes-world split as flat lmms-eval documents."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    docs = []
    for row in read_rows(split_jsonl):
        meta = row["meta"]
        if meta["task"] != "understanding" or meta.get("category") == "caption":
            continue
        if limit is not None and len(docs) >= limit:
            break
        docs.append(
            {
                "id": len(docs),
                "question": row["messages"][0]["content"].replace("<image>", "").strip(),
                "answer": meta["answer"],
                "category": meta["category"],
                "unseen": bool(meta.get("unseen_combination")),
                "image": str((Path(row["_root"]) / row["images"][0]).resolve()),
            }
        )
    if not docs:
        raise ValueError(f"{split_jsonl} has no VQA rows (understanding rows other than captions)")
    return docs


def write_shapes_vqa_task(
    split_jsonl: str | Path, out_dir: str | Path, *, task_name: str = "shapes_vqa", limit: int | None = None
) -> Path:
    """Write `<out_dir>/<task_name>.jsonl` and `<out_dir>/<task_name>.yaml`; return the YAML's path."""
    if not task_name.isidentifier():
        raise ValueError(f"task_name must be a plain identifier, got {task_name!r}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs_path = out / f"{task_name}.jsonl"
    with docs_path.open("w", encoding="utf-8") as handle:
        for doc in shapes_vqa_documents(split_jsonl, limit=limit):
            handle.write(json.dumps(doc) + "\n")
    yaml_path = out / f"{task_name}.yaml"
    # JSON strings are valid YAML scalars, so paths with any characters stay intact.
    yaml_path.write_text(
        f"include: {json.dumps(str(TEMPLATE))}\n"
        f"task: {json.dumps(task_name)}\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(docs_path))}\n",
        encoding="utf-8",
    )
    return yaml_path


__all__ = ["TEMPLATE", "shapes_vqa_documents", "write_shapes_vqa_task"]
