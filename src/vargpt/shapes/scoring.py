"""Scores for the shapes world: GenEval rules for generation, exact match for VQA, exact scene match for edits.

Generation is scored by GenEval's own rules (`vargpt.evaluation.geneval_rules`, re-exported here) on the exact
detector's readings. Our detector has no confidence: its colour-majority share stands in for it (1.0 on clean
images), ties broken by larger area, then raster order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from ..evaluation.geneval_rules import (
    GENEVAL_CATEGORIES,
    POSITION_THRESHOLD,
    evaluate_geneval,
    geneval_summary,
    relative_position,
)
from .detector import SceneReading, matches_scene, object_key, read_scene
from .scene import Scene, ShapesWorldConfig

__all__ = [
    "GENEVAL_CATEGORIES",
    "POSITION_THRESHOLD",
    "edit_check",
    "edit_correct",
    "evaluate_generated_image",
    "evaluate_geneval",
    "geneval_summary",
    "normalize_answer",
    "relative_position",
    "scene_overlap",
    "understanding_by_form",
    "vqa_accuracy",
]

_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
}
_ARTICLES = {"a", "an", "the"}


# ---------------------------------------------------------------- generation


def evaluate_generated_image(
    image: Image.Image, metadata: Mapping[str, Any], world_config: ShapesWorldConfig | None = None
) -> tuple[bool, str]:
    """Detect the shapes in a generated image and apply the GenEval rules of its prompt."""
    reading = read_scene(image, world_config)
    return evaluate_geneval(reading.detections, metadata, image.size[0])


# ---------------------------------------------------------------- understanding


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, number words to digits, articles dropped: 'Two.' -> '2'."""
    words = re.sub(r"[^0-9a-z]+", " ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def _answer_and_type(item: Any) -> tuple[str, str]:
    if isinstance(item, Mapping):
        return item["answer"], item.get("qtype", item.get("category", "unknown"))
    return item.answer, item.qtype


def _type_and_form(item: Any) -> str | None:
    """`"existence/pair"`, or None for an item without a form."""
    form = item.get("form") if isinstance(item, Mapping) else item.form
    return f"{_answer_and_type(item)[1]}/{form}" if form else None


def _tallies(predictions: Sequence[str], items: Sequence[Any], key: Callable[[Any], str | None]) -> dict:
    """`{key(item): [right, asked]}` under exact match after `normalize_answer`; items whose key is None skipped."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    tallies: dict[str, list[int]] = {}
    for prediction, item in zip(predictions, items, strict=True):
        name = key(item)
        if name is None:
            continue
        tally = tallies.setdefault(name, [0, 0])
        tally[0] += normalize_answer(prediction) == normalize_answer(_answer_and_type(item)[0])
        tally[1] += 1
    return tallies


def vqa_accuracy(predictions: Sequence[str], items: Sequence[Any]) -> dict[str, float]:
    """Exact-match accuracy after `normalize_answer`, overall ('accuracy') and per question type.

    Items are VQAItem objects or mappings with 'answer' and 'qtype' (or 'category').
    """
    per_type = _tallies(predictions, items, lambda item: _answer_and_type(item)[1])
    if not items:
        raise ValueError("vqa_accuracy needs at least one item")
    hits = sum(h for h, _ in per_type.values())
    return {"accuracy": hits / len(items), **{t: h / n for t, (h, n) in per_type.items()}}


def understanding_by_form(predictions: Sequence[str], items: Sequence[Any]) -> dict[str, dict]:
    """Accuracy and count per question type and form (`"existence/pair": {"accuracy": .., "n": ..}`), sorted.

    A type's mean can hide a form the model cannot do at all (in the shapes recipe, colour-shape existence and
    left-right position stayed near chance while shape existence and top-bottom position did better). Items
    (VQAItem objects or mappings) without a form, such as rows written before forms were recorded, are left out;
    no item with a form gives an empty dict.
    """
    tallies = _tallies(predictions, items, _type_and_form)
    return {key: {"accuracy": hits / n, "n": n} for key, (hits, n) in sorted(tallies.items())}


# ---------------------------------------------------------------- editing


def edit_check(
    edited_image: Image.Image,
    target_scene: Scene,
    source_scene: Scene,
    world_config: ShapesWorldConfig | None = None,
) -> tuple[bool, str]:
    """(correct, reason): the edited image must show exactly the target scene (objects and background)."""
    if target_scene == source_scene:
        raise ValueError("target and source scenes are equal: there is no edit to check")
    reading = read_scene(edited_image, world_config)
    if matches_scene(reading, target_scene):
        return True, ""
    if matches_scene(reading, source_scene):
        return False, "unchanged: the image still shows the source scene"
    detected = [d.key() for d in reading.detections]
    expected = [object_key(o) for o in target_scene.objects]
    missing = [k for k in expected if k not in detected]
    extra = [k for k in detected if k not in expected]
    reasons = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in extra]
    if reading.background != target_scene.background:
        reasons.append(f"background {reading.background}, expected {target_scene.background}")
    return False, "; ".join(reasons) or "duplicated objects"


def scene_overlap(reading: SceneReading, scene: Scene) -> dict[str, float]:
    """How much of a scene an image shows, for edits that are not exactly right.

    Exact editing accuracy stays at 0 until a model redraws whole scenes; these say how far it is. Objects are
    compared as a multiset of (cell, shape, colour, size): `object_recall` is the share of the scene's objects
    drawn, `object_precision` the share of drawn objects that belong to the scene (0 when nothing is drawn but
    the scene has objects; 1 for an empty reading of an empty scene), `background` 1.0 when it matches.
    """
    expected = Counter(object_key(o) for o in scene.objects)
    detected = Counter(d.key() for d in reading.detections)
    shared = sum((expected & detected).values())
    n_expected, n_detected = sum(expected.values()), sum(detected.values())
    return {
        "object_recall": shared / n_expected if n_expected else 1.0,
        "object_precision": shared / n_detected if n_detected else float(n_expected == 0),
        "background": float(reading.background == scene.background),
    }


def edit_correct(
    edited_image: Image.Image,
    target_scene: Scene,
    source_scene: Scene,
    world_config: ShapesWorldConfig | None = None,
) -> bool:
    """True when the edit was made and nothing else changed (see `edit_check` for the reason)."""
    return edit_check(edited_image, target_scene, source_scene, world_config)[0]
