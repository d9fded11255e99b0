"""GenEval's rules: whether one image's detections satisfy one prompt's metadata, and the summary score.

Reproduced from djghosh13/geneval, evaluation/evaluate_images.py, for any detector's objects:
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
- Objects of a class are ranked by confidence, ties broken by larger area, then by the order given.
- The overall score is the mean of the per-category accuracies.

The rules live apart from any detector so that the official pipeline (`vargpt.evaluation.geneval`) and the
shapes world's exact detector (`vargpt.shapes.scoring`) score by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

POSITION_THRESHOLD = 0.1
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")


class RuleObject(Protocol):
    """What the rules read of a detected object. `shape` is its class name (the shapes world's detections,
    which the rules were first written for, call it so); `bbox` is (x0, y0, x1, y1) and `centre` (x, y) in
    pixels; `area` breaks ties between equally confident objects."""

    @property
    def shape(self) -> str: ...

    @property
    def colour(self) -> str: ...

    @property
    def bbox(self) -> Sequence[float]: ...

    @property
    def centre(self) -> Sequence[float]: ...

    @property
    def area(self) -> float: ...

    @property
    def score(self) -> float: ...


def relative_position(a: RuleObject, b: RuleObject, image_size: int) -> set[str]:
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


def _by_class(detections: Iterable[RuleObject]) -> dict[str, list[RuleObject]]:
    ranked = sorted(detections, key=lambda d: (-d.score, -d.area))
    grouped: dict[str, list[RuleObject]] = {}
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
                if relation not in RELATIONS:
                    raise ValueError(f"include clause {index} has an unknown relation {relation!r}")


def evaluate_geneval(
    detections: Sequence[RuleObject], metadata: Mapping[str, Any], image_size: int
) -> tuple[bool, str]:
    """(correct, reason) of one image's detections against one GenEval metadata dict."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    _check_clauses(metadata)
    objects = _by_class(detections)
    correct, reasons = True, []
    matched: list[list[RuleObject] | None] = []
    for clause in metadata.get("include", []):
        found = _include_match(clause, objects, matched, image_size, reasons)
        correct &= found is not None
        matched.append(found)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


def _include_match(
    clause: Mapping[str, Any],
    objects: Mapping[str, list[RuleObject]],
    matched: Sequence[list[RuleObject] | None],
    image_size: int,
    reasons: list[str],
) -> list[RuleObject] | None:
    """The objects an include clause matched, or None (its reason appended) when it fails: count first, then
    colour, then the position relative to an earlier clause's objects."""
    name, count = clause["class"], clause["count"]
    found = objects.get(name, [])[:count]
    if len(found) < count:
        reasons.append(f"expected {name}>={count}, found {len(found)}")
        return None
    if "color" in clause:
        n_colour = sum(d.colour == clause["color"] for d in found)
        if n_colour < count:
            seen = ", ".join(sorted(d.colour for d in found))
            reasons.append(f"expected {clause['color']} {name}>={count}, found {n_colour} ({seen})")
            return None
    if "position" in clause:
        relation, target = clause["position"]
        anchors = matched[target]
        if anchors is None:
            reasons.append(f"no target for {name} to be {relation}")
            return None
        for obj in found:
            bad = next((t for t in anchors if relation not in relative_position(obj, t, image_size)), None)
            if bad is not None:
                actual = " and ".join(sorted(relative_position(obj, bad, image_size))) or "no relation"
                reasons.append(f"expected {name} {relation} target, found {actual} target")
                return None
    return found


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
