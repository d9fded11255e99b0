"""lmms-eval hooks of the shapes-world VQA task (loaded by lmms-eval from this file's path, so imports are absolute).

A document is one row written by `write_shapes_vqa_task`: question, answer, category, unseen flag and the
absolute path of its image.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from vargpt.image_io import load_image
from vargpt.shapes.scoring import normalize_answer


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [load_image(doc["image"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    """The question as `vargpt eval shapes` asks it; pre/post prompts only when a model's task settings add them."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match after `normalize_answer` ('Two.' == '2'), the rule of `vargpt eval shapes`."""
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
