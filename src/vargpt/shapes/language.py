"""Words for shapes-world scenes: captions, questions with exact answers, GenEval-style prompts, edit instructions.

Every function here is pure given a `random.Random` and the scene, so the world that owns the generator stays
deterministic. Text never names a held-out (colour, shape) pair unless the caller allows it, so the training
text is as free of the held-out combinations as the training pictures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import permutations
from typing import Any

from ..evaluation.geneval_rules import GENEVAL_CATEGORIES
from .scene import (
    COLUMN_WORDS,
    ROW_WORDS,
    Scene,
    ShapeInstance,
    ShapesWorldConfig,
    all_cells,
    cell_name,
)

VQA_TYPES = ("colour", "shape", "count", "position", "existence")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
BACKGROUND_ADJECTIVES = {"white": "white", "grey": "light grey", "stripes": "striped"}
BACKGROUND_NOUNS = {"white": "white", "grey": "light grey", "stripes": "stripes"}

# GenEval's own phrasing ("a photo of ...") comes first in every list; the others vary the wording.
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": ("a photo of {a}", "an image of {a}", "{a}", "draw {a}", "a picture showing {a}"),
    "two_object": (
        "a photo of {a} and {b}",
        "an image of {a} and {b}",
        "{a} and {b}",
        "draw {a} and {b}",
        "a picture containing {a} and {b}",
    ),
    "counting": (
        "a photo of {a}",
        "an image of {a}",
        "{a}",
        "draw {a}",
        "a picture with exactly {a}",
    ),
    "colors": ("a photo of {a}", "an image of {a}", "{a}", "draw {a}", "a picture showing {a}"),
    "position": ("a photo of {a} {rel} {b}", "an image of {a} {rel} {b}", "{a} {rel} {b}", "draw {a} {rel} {b}"),
    "color_attr": ("a photo of {a} and {b}", "an image of {a} and {b}", "{a} and {b}", "draw {a} and {b}"),
}


@dataclass(frozen=True)
class VQAItem:
    """One question about a scene with its exact short answer (a word, a digit, 'yes' or 'no')."""

    question: str
    answer: str
    qtype: str
    unseen_combination: bool = False
    # how the question asks (e.g. existence "shape" or "pair", position "column", "row", "relation", "cell"):
    # a model can master one form of a type and fail another, and the type's mean hides which
    form: str = ""


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(shape: str) -> str:
    return shape + "s"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _in_cell(cell: tuple[int, int]) -> str:
    return f"in the {cell_name(cell)}"


# ---------------------------------------------------------------- references to one object of a scene


def reference(scene: Scene, obj: ShapeInstance, rng: random.Random, *, mention: str = "shape") -> str:
    """A phrase that picks out `obj` alone in `scene`.

    mention='shape': the phrase names the shape ('the circle', 'the red circle', 'the circle in the top left');
    mention='colour-free': never names the colour (for 'what colour is ...'); mention='shape-free': never names
    the shape (for 'what shape is ...').
    """
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    same_colour = [o for o in scene.objects if o.colour == obj.colour]
    same_both = [o for o in same_shape if o.colour == obj.colour]
    options = []
    if mention == "shape":
        if len(same_shape) == 1:
            options.append(f"the {obj.shape}")
        if len(same_both) == 1:
            options.append(f"the {obj.colour} {obj.shape}")
        options.append(f"the {obj.shape} {_in_cell(obj.cell)}")
    elif mention == "colour-free":
        if len(same_shape) == 1:
            options.append(f"the {obj.shape}")
        options.append(f"the {obj.shape} {_in_cell(obj.cell)}")
    elif mention == "shape-free":
        if len(same_colour) == 1:
            options.append(f"the {obj.colour} object")
        options.append(f"the object {_in_cell(obj.cell)}")
    else:
        raise ValueError(f"unknown mention {mention!r}")
    return rng.choice(options)


# ---------------------------------------------------------------- captions


def caption(scene: Scene, rng: random.Random) -> str:
    """A complete description: every object with size, colour, shape and cell, and the background."""
    background = BACKGROUND_ADJECTIVES[scene.background]
    if not scene.objects:
        return f"An empty {background} background."
    parts = [f"{with_article(object_words(o))} {_in_cell(o.cell)}" for o in scene.objects]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    count = len(scene.objects)
    noun = "shape" if count == 1 else "shapes"
    template = rng.randrange(3)
    if template == 0:
        return f"{objects[0].upper()}{objects[1:]} on {with_article(background)} background."
    if template == 1:
        return f"{with_article(background).capitalize()} background with {objects}."
    return f"{number_word(count).capitalize()} {noun} on {with_article(background)} background: {objects}."


# ---------------------------------------------------------------- visual question answering


def _reference_form(ref: str, obj: ShapeInstance) -> str:
    """Whether a reference picks its object out by the cell it stands in ("by-cell") or by name ("by-name")."""
    return "by-cell" if ref.endswith(_in_cell(obj.cell)) else "by-name"


def _colour_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng, mention="colour-free")
    question = rng.choice(("What colour is {}?", "What color is {}?", "Which colour is {}?")).format(ref)
    return question, obj.colour, _reference_form(ref, obj)


def _shape_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, rng, mention="shape-free")
    return rng.choice(("What shape is {}?", "Which shape is {}?")).format(ref), obj.shape, _reference_form(ref, obj)


def _count_question(scene: Scene, config: ShapesWorldConfig, rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        question = rng.choice(("How many shapes are there?", "How many objects are in the image?"))
        return question, str(len(scene.objects)), "all"
    if kind == 1:
        shape = rng.choice(config.shapes)
        n = sum(o.shape == shape for o in scene.objects)
        return f"How many {plural(shape)} are there?", str(n), "shape"
    colour = rng.choice(config.colours)
    n = sum(o.colour == colour for o in scene.objects)
    return f"How many {colour} shapes are there?", str(n), "colour"


def cell_free_reference(scene: Scene, obj: ShapeInstance, rng: random.Random) -> str | None:
    """A phrase naming `obj` alone without giving away its cell, or None when only its cell tells it apart."""
    options = []
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        options.append(f"the {obj.shape}")
    if sum((o.shape, o.colour) == (obj.shape, obj.colour) for o in scene.objects) == 1:
        options.append(f"the {obj.colour} {obj.shape}")
    if sum(object_words(o) == object_words(obj) for o in scene.objects) == 1:
        options.append(f"the {object_words(obj)}")
    return rng.choice(options) if options else None


def object_words(obj: ShapeInstance) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"


def _position_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    named = [(o, ref) for o in scene.objects if (ref := cell_free_reference(scene, o, rng)) is not None]
    if not named:
        cell = rng.choice(all_cells())
        answer = "yes" if scene.at(cell) is not None else "no"
        return f"Is there a shape in the {cell_name(cell)}?", answer, "cell"
    obj, ref = rng.choice(named)
    kind = rng.randrange(3) if len(named) > 1 else rng.randrange(2)
    if kind == 0:
        return f"Is {ref} on the left, in the middle or on the right?", COLUMN_WORDS[obj.cell[1]], "column"
    if kind == 1:
        return f"Is {ref} at the top, in the middle or at the bottom?", ROW_WORDS[obj.cell[0]], "row"
    other, other_ref = rng.choice([(o, r) for o, r in named if o != obj])
    relation = rng.choice(RELATIONS)
    holds = {
        "left of": obj.cell[1] < other.cell[1],
        "right of": obj.cell[1] > other.cell[1],
        "above": obj.cell[0] < other.cell[0],
        "below": obj.cell[0] > other.cell[0],
    }[relation]
    return f"Is {ref} {relation} {other_ref}?", "yes" if holds else "no", "relation"


def _existence_question(
    scene: Scene, config: ShapesWorldConfig, rng: random.Random, include_held_out: bool
) -> tuple[str, str, tuple[str, str] | None]:
    """Question, answer and the (colour, shape) pair asked about (None when only a shape is asked about)."""
    templates = ("Is there {}?", "Is there {} in the image?", "Does the image contain {}?")
    present = sorted(scene.pairs())
    if rng.random() < 0.25:
        shape = rng.choice(config.shapes)
        answer = "yes" if any(o.shape == shape for o in scene.objects) else "no"
        return rng.choice(templates).format(with_article(shape)), answer, None
    absent = [p for p in config.allowed_pairs(include_held_out) if p not in present]
    if present and (not absent or rng.random() < 0.5):
        pair, answer = rng.choice(present), "yes"
    else:
        pair, answer = rng.choice(absent), "no"
    return rng.choice(templates).format(with_article(f"{pair[0]} {pair[1]}")), answer, pair


def vqa_items(scene: Scene, config: ShapesWorldConfig, rng: random.Random, include_held_out: bool) -> list[VQAItem]:
    """One question of each type (colour, shape, count, position, existence) about a scene."""
    held = set(config.held_out_pairs)
    scene_unseen = bool(scene.pairs() & held)
    items = []
    if scene.objects:
        for qtype, make in (("colour", _colour_question), ("shape", _shape_question)):
            question, answer, form = make(scene, rng)
            items.append(VQAItem(question, answer, qtype, scene_unseen, form))
    question, answer, form = _count_question(scene, config, rng)
    items.append(VQAItem(question, answer, "count", scene_unseen, form))
    if scene.objects:
        question, answer, form = _position_question(scene, rng)
        items.append(VQAItem(question, answer, "position", scene_unseen, form))
    question, answer, pair = _existence_question(scene, config, rng, include_held_out)
    form = "shape" if pair is None else "pair"
    items.append(VQAItem(question, answer, "existence", scene_unseen or pair in held, form))
    return items


# ---------------------------------------------------------------- text-to-image prompts (GenEval format)


def _clause(shape: str, count: int = 1, colour: str | None = None) -> dict[str, Any]:
    clause: dict[str, Any] = {"class": shape, "count": count}
    if colour is not None:
        clause["color"] = colour
    return clause


def _contents(category: str, config: ShapesWorldConfig) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Every (metadata without prompt, template fields) of a category."""
    shapes, colours = config.shapes, config.colours
    out: list[tuple[dict[str, Any], dict[str, str]]] = []
    if category == "single_object":
        for s in shapes:
            out.append(({"include": [_clause(s)]}, {"a": with_article(s)}))
    elif category == "two_object":
        for s1, s2 in permutations(shapes, 2):
            out.append(({"include": [_clause(s1), _clause(s2)]}, {"a": with_article(s1), "b": with_article(s2)}))
    elif category == "counting":
        for s in shapes:
            for n in range(2, min(config.max_objects, 4) + 1):
                meta = {"include": [_clause(s, n)], "exclude": [_clause(s, n + 1)]}
                out.append((meta, {"a": f"{number_word(n)} {plural(s)}"}))
    elif category == "colors":
        for c in colours:
            for s in shapes:
                out.append(({"include": [_clause(s, 1, c)]}, {"a": with_article(f"{c} {s}")}))
    elif category == "position":
        for subject, anchor in permutations(shapes, 2):
            for rel in RELATIONS:
                include = [_clause(anchor), {**_clause(subject), "position": [rel, 0]}]
                out.append(({"include": include}, {"a": with_article(subject), "rel": rel, "b": with_article(anchor)}))
    elif category == "color_attr":
        for s1, s2 in permutations(shapes, 2):
            for c1 in colours:
                for c2 in colours:
                    if c1 != c2:
                        fields = {"a": with_article(f"{c1} {s1}"), "b": with_article(f"{c2} {s2}")}
                        out.append(({"include": [_clause(s1, 1, c1), _clause(s2, 1, c2)]}, fields))
    else:
        raise ValueError(f"unknown GenEval category {category!r}; known: {GENEVAL_CATEGORIES}")
    return out


def mentions_held_out_pair(metadata: dict[str, Any], config: ShapesWorldConfig) -> bool:
    held = set(config.held_out_pairs)
    return any((c.get("color"), c["class"]) in held for c in metadata.get("include", []))


def enumerate_prompts(category: str, config: ShapesWorldConfig) -> list[dict[str, Any]]:
    """All GenEval-style metadata dicts of a category, one per (content, template), in a fixed order."""
    prompts = []
    for meta, fields in _contents(category, config):
        for template in PROMPT_TEMPLATES[category]:
            prompts.append({"tag": category, **meta, "prompt": template.format(**fields)})
    return prompts


# ---------------------------------------------------------------- edit instructions


def recolour_instruction(scene: Scene, obj: ShapeInstance, colour: str, rng: random.Random) -> str:
    ref = reference(scene, obj, rng)
    templates = ("Make {r} {c}.", "Change the colour of {r} to {c}.", "Paint {r} {c}.", "Turn {r} {c}.")
    return rng.choice(templates).format(r=ref, c=colour)


def move_instruction(scene: Scene, obj: ShapeInstance, cell: tuple[int, int], rng: random.Random) -> str:
    ref = reference(scene, obj, rng)
    templates = ("Move {r} to the {p}.", "Put {r} in the {p}.", "Shift {r} to the {p}.")
    return rng.choice(templates).format(r=ref, p=cell_name(cell))


def add_instruction(obj: ShapeInstance, rng: random.Random) -> str:
    templates = ("Add {o} in the {p}.", "Put {o} in the {p}.", "Draw {o} in the {p}.")
    return rng.choice(templates).format(o=with_article(object_words(obj)), p=cell_name(obj.cell))


def remove_instruction(scene: Scene, obj: ShapeInstance, rng: random.Random) -> str:
    templates = ("Remove {r}.", "Delete {r}.", "Take away {r}.")
    return rng.choice(templates).format(r=reference(scene, obj, rng))


def restyle_instruction(background: str, rng: random.Random) -> str:
    adjective, noun = BACKGROUND_ADJECTIVES[background], BACKGROUND_NOUNS[background]
    options = (f"Make the background {adjective}.", f"Change the background to {noun}.")
    return rng.choice((*options, f"Use {with_article(adjective)} background."))
