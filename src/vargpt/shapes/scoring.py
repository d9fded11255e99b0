"""Scores for the shapes world: GenEval rules for generation, exact match for VQA, exact scene match for edits.

GenEval semantics (djghosh13/geneval, evaluation/evaluate_images.py), reproduced on our detections:
- include clauses are ANDed. For each, the first `count` objects of the class (most confident first) must
  exist ("at least count"); if the clause has a colour, all of those `count` objects must have it; if it has
  `position: [relation, i]`, each of them must stand in that relation to every object matched by include
  clause i (which must itself have matched).
- exclude clauses are ORed: a class seen `count` or more times fails the image. Counting prompts carry
  `exclude count = n + 1`, which is what makes their count exact; other categories allow extra objects.
- relation of A to B: offset = centre_A - centre_B; each axis is shrunk towards 0 by 0.1 x (A's + B's box
  extent on that axis) (GenEval's POSITION_THRESHOLD); divided by |offset|, an axis component below -0.5 gives
  'left of' / 'above' and above 0.5 gives 'right of' / 'below' (image y grows downwards). Nothing holds when the
  shrunk offset is ~0 (boxes normalised by the image size, tolerance 1e-3).
- Detector confidence: our detector has none, so its colour-majority share stands in for it (1.0 on clean
  images), ties broken by larger area, then raster order.
- The overall score is the mean of the per-category accuracies.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

from .detector import Detection, SceneReading, matches_scene, object_key, read_scene
from .scene import Scene, ShapesWorldConfig

POSITION_THRESHOLD = 0.1
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
}
_ARTICLES = {"a", "an", "the"}


# ---------------------------------------------------------------- GenEval rules


def relative_position(a: Detection, b: Detection, image_size: int) -> set[str]:
    """The GenEval relations ('left of', 'right of', 'above', 'below') that hold of A relative to B."""
    offset, shrunk = [], []
    for axis in (0, 1):
        extent_a = (a.bbox[axis + 2] - a.bbox[axis]) / image_size
        extent_b = (b.bbox[axis + 2] - b.bbox[axis]) / image_size
        delta = (a.centre[axis] - b.centre[axis]) / image_size
        offset.append(delta)
        shrunk.append(math.copysign(max(abs(delta) - POSITION_THRESHOLD * (extent_a + extent_b), 0.0), delta))
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _by_class(detections: Iterable[Detection]) -> dict[str, list[Detection]]:
    ranked = sorted(detections, key=lambda d: (-d.score, -d.area))
    grouped: dict[str, list[Detection]] = {}
    for d in ranked:
        grouped.setdefault(d.shape, []).append(d)
    return grouped


def _check_clauses(metadata: Mapping[str, Any]) -> None:
    for kind in ("include", "exclude"):
        for index, clause in enumerate(metadata.get(kind, [])):
            if "class" not in clause or not isinstance(clause.get("count"), int) or clause["count"] < 1:
                raise ValueError(f"{kind} clause {index} needs a 'class' and an integer 'count' >= 1: {clause}")
            if kind == "include" and "position" in clause:
                relation, target = clause["position"]
                if not isinstance(target, int) or not 0 <= target < index:
                    raise ValueError(f"include clause {index} must point at an earlier clause, got {target}")
                if relation not in ("left of", "right of", "above", "below"):
                    raise ValueError(f"include clause {index} has an unknown relation {relation!r}")


def evaluate_geneval(detections: Sequence[Detection], metadata: Mapping[str, Any], image_size: int) -> tuple[bool, str]:
    """(correct, reason) of one image's detections against one GenEval metadata dict."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    _check_clauses(metadata)
    objects = _by_class(detections)
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            n_colour = sum(d.colour == clause["color"] for d in found)
            if n_colour < count:
                ok = False
                seen = ", ".join(sorted(d.colour for d in found))
                reasons.append(f"expected {clause['color']} {name}>={count}, found {n_colour} ({seen})")
        if ok and "position" in clause:
            relation, target = clause["position"]
            anchors = matched[target]
            if anchors is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj in found:
                    bad = next((t for t in anchors if relation not in relative_position(obj, t, image_size)), None)
                    if bad is not None:
                        ok = False
                        actual = " and ".join(sorted(relative_position(obj, bad, image_size))) or "no relation"
                        reasons.append(f"expected {name} {relation} target, found {actual} target")
                        break
        correct &= ok
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


def evaluate_generated_image(
    image: Image.Image, metadata: Mapping[str, Any], world_config: ShapesWorldConfig | None = None
) -> tuple[bool, str]:
    """Detect the shapes in a generated image and apply the GenEval rules of its prompt."""
    reading = read_scene(image, world_config)
    return evaluate_geneval(reading.detections, metadata, image.size[0])


def geneval_summary(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per-category accuracy and GenEval's overall score (the unweighted mean over categories present).

    Each result needs 'tag' and 'correct'.
    """
    totals: dict[str, list[int]] = {}
    for result in results:
        tally = totals.setdefault(result["tag"], [0, 0])
        tally[0] += bool(result["correct"])
        tally[1] += 1
    if not totals:
        raise ValueError("geneval_summary needs at least one result")
    order = [t for t in GENEVAL_CATEGORIES if t in totals] + sorted(set(totals) - set(GENEVAL_CATEGORIES))
    summary = {tag: totals[tag][0] / totals[tag][1] for tag in order}
    return {"overall": sum(summary.values()) / len(summary), **summary}


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
