"""The broad language of the shapes world: prompts, questions and edit instructions worded as people write them.

The template language (`language.py`) has 4-5 fixed phrasings per category, joins objects only with "and" and
never colours both objects of a relation, so a model trained on it fails on ordinary wording. This grammar
composes a phrase from independent choices (a frame with a verb or politeness, numerals or number words, a
word order for colours, a joiner, a relation form, a clause order), each drawn from a `Phrasings` bank.

Every bank keeps some phrasings out of training: `held_out=True` draws only those, which is how the
`test-paraphrase` split asks for wordings the model never read. Held-out phrasings reuse content words the
trained ones teach (left, above, red, two ...) and add only filler, so a model that learned the meaning can
answer them; the answers and GenEval metadata are the same as for the template language. The trained banks
hold every word of the templates' prompts too, so a model trained on this language has read the templates' words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .language import (
    RELATIONS,
    VQAItem,
    cell_free_reference,
    mentions_held_out_pair,
    number_word,
    plural,
    reference,
    with_article,
)
from .scene import COLUMN_WORDS, ROW_WORDS, Scene, ShapesWorldConfig, all_cells, cell_name

LANGUAGES = ("templates", "broad")


@dataclass(frozen=True)
class Phrasings:
    """Phrasings of one choice: those training reads and those only the paraphrase split uses."""

    trained: tuple[str, ...]
    held_out: tuple[str, ...] = ()

    def pick(self, rng: random.Random, held_out: bool) -> str:
        return rng.choice(self.held_out if held_out and self.held_out else self.trained)


FRAMES = Phrasings(
    (
        "{x}",
        "a photo of {x}",
        "an image of {x}",
        "a picture of {x}",
        "a picture showing {x}",
        "a picture containing {x}",
        "draw {x}",
        "please draw {x}",
        "draw me {x}, please",
        "render {x}",
        "show me {x}",
        "could you draw {x}?",
        "can you show me {x}?",
        "make an image of {x}",
        "generate {x}",
        "paint {x}",
        "create a picture with {x}",
        "i want to see {x}",
    ),
    ("sketch {x}", "would you kindly render {x}?", "depict {x}", "an illustration of {x}", "give me a picture of {x}"),
)
JOINERS = Phrasings(
    ("{a} and {b}", "{a} with {b}", "{a} plus {b}", "{a}, {b}"), ("{a} as well as {b}", "{a} along with {b}")
)
RELATION_WORDS: dict[str, Phrasings] = {
    "left of": Phrasings(("left of", "to the left of", "on the left of"), ("on the left side of",)),
    "right of": Phrasings(("right of", "to the right of", "on the right of"), ("on the right side of",)),
    "above": Phrasings(("above", "over", "on top of"), ("directly above",)),
    "below": Phrasings(("below", "under", "beneath"), ("directly below",)),
}
RELATION_ORDERS = Phrasings(("{a} {rel} {b}", "{b} and {a} {rel} it"), ("{b} with {a} {rel} it",))
# colour word orders for one object ({d}: article or number, {c}: colour, {s}: shape noun, singular or plural)
COLOUR_ORDERS = Phrasings(("{d} {c} {s}", "{d} {s} that {be} {c}"), ("{d} {s} in {c}",))

QUESTIONS: dict[str, Phrasings] = {
    "colour": Phrasings(
        ("What colour is {r}?", "What color is {r}?", "Which colour is {r}?", "What is the colour of {r}?"),
        ("Can you tell me what colour {r} is?", "What colour does {r} have?"),
    ),
    "shape": Phrasings(
        ("What shape is {r}?", "Which shape is {r}?", "What kind of shape is {r}?"),
        ("Can you tell me what shape {r} is?", "What is the shape of {r}?"),
    ),
    "count-all": Phrasings(
        ("How many shapes are there?", "How many objects are in the image?", "How many shapes do you see?"),
        ("What is the number of shapes?", "Can you count the objects?"),
    ),
    "count-shape": Phrasings(("How many {p} are there?", "How many {p} do you see?"), ("What is the number of {p}?",)),
    "count-colour": Phrasings(
        ("How many {c} shapes are there?", "How many {c} objects do you see?"), ("What is the number of {c} shapes?",)
    ),
    "column": Phrasings(
        ("Is {r} on the left, in the middle or on the right?", "Which side is {r} on: left, middle or right?"),
        ("Where is {r} horizontally: left, middle or right?",),
    ),
    "row": Phrasings(
        ("Is {r} at the top, in the middle or at the bottom?", "Which row is {r} in: top, middle or bottom?"),
        ("Where is {r} vertically: top, middle or bottom?",),
    ),
    "relation": Phrasings(("Is {r} {rel} {o}?", "Would you say {r} is {rel} {o}?"), ("Tell me, is {r} {rel} {o}?",)),
    "cell": Phrasings(
        ("Is there a shape in the {cell}?", "Is anything in the {cell}?"), ("Does the {cell} hold a shape?",)
    ),
    "existence": Phrasings(
        ("Is there {x}?", "Is there {x} in the image?", "Does the image contain {x}?", "Do you see {x}?"),
        ("Does the picture show {x}?", "Can you spot {x}?"),
    ),
}
EDIT_FRAMES = Phrasings(
    ("{i}", "Please {j}", "Could you {k}?", "{i} Thanks."), ("Kindly {j}", "Would you {k}, please?")
)


# ---------------------------------------------------------------- text-to-image prompts


def _clause(shape: str, count: int = 1, colour: str | None = None) -> dict[str, Any]:
    clause: dict[str, Any] = {"class": shape, "count": count}
    if colour is not None:
        clause["color"] = colour
    return clause


def _two_shapes(config: ShapesWorldConfig, rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(list(config.shapes), 2)
    return first, second


def _colour_for(shape: str, pairs: tuple[tuple[str, str], ...], rng: random.Random, avoid: str = "") -> str:
    colours = [c for c, s in pairs if s == shape and c != avoid]
    return rng.choice(colours)


def broad_metadata(
    category: str, config: ShapesWorldConfig, rng: random.Random, pairs: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """GenEval metadata (tag, include, exclude) of a random content of `category` drawn from `pairs` only.

    Beyond the template contents: counts may name a colour ("two blue squares") and both objects of a relation
    may carry one ("a green triangle left of a yellow circle"); GenEval's rules check every clause's colour."""
    shapes = config.shapes
    include: list[dict[str, Any]]
    exclude: list[dict[str, Any]] = []
    if category == "single_object":
        include = [_clause(rng.choice(shapes))]
    elif category == "two_object":
        include = [_clause(s) for s in _two_shapes(config, rng)]
    elif category == "counting":
        shape, n = rng.choice(shapes), rng.randint(2, min(config.max_objects, 4))
        colour = _colour_for(shape, pairs, rng) if rng.random() < 0.5 else None
        include, exclude = [_clause(shape, n, colour)], [_clause(shape, n + 1)]
    elif category == "colors":
        shape = rng.choice(shapes)
        include = [_clause(shape, 1, _colour_for(shape, pairs, rng))]
    elif category == "position":
        subject, anchor = _two_shapes(config, rng)
        coloured = rng.random() < 0.5
        colour_a = _colour_for(anchor, pairs, rng) if coloured else None
        colour_s = _colour_for(subject, pairs, rng, avoid=colour_a or "") if coloured else None
        subject_clause = {**_clause(subject, 1, colour_s), "position": [rng.choice(RELATIONS), 0]}
        include = [_clause(anchor, 1, colour_a), subject_clause]
    elif category == "color_attr":
        s1, s2 = _two_shapes(config, rng)
        c1 = _colour_for(s1, pairs, rng)
        include = [_clause(s1, 1, c1), _clause(s2, 1, _colour_for(s2, pairs, rng, avoid=c1))]
    else:
        raise ValueError(f"unknown GenEval category {category!r}")
    return {"tag": category, "include": include, **({"exclude": exclude} if exclude else {})}


def object_phrase(clause: dict[str, Any], rng: random.Random, held_out: bool) -> str:
    """'a red circle', 'one circle that is red', '2 blue squares', 'three squares in blue' ..."""
    shape, n, colour = clause["class"], clause["count"], clause.get("color")
    if n == 1:
        noun, be = shape, "is"
        determiner = rng.choice(("a", "one")) if not colour else rng.choice(("a", "a", "one"))
    else:
        noun, be = plural(shape), "are"
        determiner = rng.choice((number_word(n), str(n), f"exactly {number_word(n)}"))
    if colour is None:
        phrase = f"{determiner} {noun}"
    else:
        phrase = COLOUR_ORDERS.pick(rng, held_out).format(d=determiner, c=colour, s=noun, be=be)
    if phrase.startswith("a "):
        phrase = with_article(phrase[2:])
    return phrase


def broad_prompt(metadata: dict[str, Any], rng: random.Random, held_out: bool = False) -> str:
    """A prompt for GenEval metadata written by `broad_metadata` (or the template contents)."""
    include = metadata["include"]
    phrases = [object_phrase(clause, rng, held_out) for clause in include]
    if metadata["tag"] == "position":
        subject = next(c for c in include if "position" in c)
        relation = subject["position"][0]
        rel = RELATION_WORDS[relation].pick(rng, held_out)
        body = RELATION_ORDERS.pick(rng, held_out).format(a=phrases[1], rel=rel, b=phrases[0])
    elif len(phrases) == 2:
        first, second = phrases if rng.random() < 0.5 else phrases[::-1]
        body = JOINERS.pick(rng, held_out).format(a=first, b=second)
    else:
        body = phrases[0]
    text = FRAMES.pick(rng, held_out).format(x=body)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def broad_t2i_metadata(
    category: str, config: ShapesWorldConfig, rng: random.Random, *, unseen: bool, held_out: bool
) -> dict[str, Any]:
    """Metadata with its prompt; `unseen` asks for a held-out (colour, shape) pair (categories without colours
    cannot name one and never do)."""
    pairs = config.allowed_pairs(include_held_out=unseen)
    for _ in range(200):
        metadata = broad_metadata(category, config, rng, pairs)
        if not unseen or mentions_held_out_pair(metadata, config) or category in ("single_object", "two_object"):
            break
    return {**metadata, "prompt": broad_prompt(metadata, rng, held_out)}


# ---------------------------------------------------------------- questions


def _relation_holds(relation: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    return {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[relation]


def _position(scene: Scene, rng: random.Random, held: bool) -> tuple[str, str, str]:
    named = [(o, ref) for o in scene.objects if (ref := cell_free_reference(scene, o, rng)) is not None]
    if not named:
        cell = rng.choice(all_cells())
        answer = "yes" if scene.at(cell) is not None else "no"
        return QUESTIONS["cell"].pick(rng, held).format(cell=cell_name(cell)), answer, "cell"
    obj, ref = rng.choice(named)
    kind = rng.randrange(3) if len(named) > 1 else rng.randrange(2)
    if kind == 0:
        return QUESTIONS["column"].pick(rng, held).format(r=ref), COLUMN_WORDS[obj.cell[1]], "column"
    if kind == 1:
        return QUESTIONS["row"].pick(rng, held).format(r=ref), ROW_WORDS[obj.cell[0]], "row"
    other, other_ref = rng.choice([(o, r) for o, r in named if o != obj])
    relation = rng.choice(RELATIONS)
    rel = RELATION_WORDS[relation].pick(rng, held)
    question = QUESTIONS["relation"].pick(rng, held).format(r=ref, rel=rel, o=other_ref)
    return question, "yes" if _relation_holds(relation, obj.cell, other.cell) else "no", "relation"


def _count(scene: Scene, config: ShapesWorldConfig, rng: random.Random, held: bool) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        return QUESTIONS["count-all"].pick(rng, held), str(len(scene.objects)), "all"
    if kind == 1:
        shape = rng.choice(config.shapes)
        answer = str(sum(o.shape == shape for o in scene.objects))
        return QUESTIONS["count-shape"].pick(rng, held).format(p=plural(shape)), answer, "shape"
    colour = rng.choice(config.colours)
    answer = str(sum(o.colour == colour for o in scene.objects))
    return QUESTIONS["count-colour"].pick(rng, held).format(c=colour), answer, "colour"


def _existence(
    scene: Scene, config: ShapesWorldConfig, rng: random.Random, include_held_out: bool, held: bool
) -> tuple[str, str, tuple[str, str] | None]:
    present = sorted(scene.pairs())
    if rng.random() < 0.25:
        shape = rng.choice(config.shapes)
        answer = "yes" if any(o.shape == shape for o in scene.objects) else "no"
        return QUESTIONS["existence"].pick(rng, held).format(x=with_article(shape)), answer, None
    absent = [p for p in config.allowed_pairs(include_held_out) if p not in present]
    if present and (not absent or rng.random() < 0.5):
        pair, answer = rng.choice(present), "yes"
    else:
        pair, answer = rng.choice(absent), "no"
    phrase = object_phrase(_clause(pair[1], 1, pair[0]), rng, held)
    return QUESTIONS["existence"].pick(rng, held).format(x=phrase), answer, pair


def broad_vqa(
    scene: Scene, config: ShapesWorldConfig, rng: random.Random, *, include_held_out: bool, held_out: bool = False
) -> list[VQAItem]:
    """One question of each type, with the template language's types, forms and exact answers."""
    held_pairs = set(config.held_out_pairs)
    unseen = bool(scene.pairs() & held_pairs)
    items = []
    if scene.objects:
        obj = rng.choice(scene.objects)
        ref = reference(scene, obj, rng, mention="colour-free")
        question = QUESTIONS["colour"].pick(rng, held_out).format(r=ref)
        items.append(VQAItem(question, obj.colour, "colour", unseen, _form(ref, obj.cell)))
        obj = rng.choice(scene.objects)
        ref = reference(scene, obj, rng, mention="shape-free")
        question = QUESTIONS["shape"].pick(rng, held_out).format(r=ref)
        items.append(VQAItem(question, obj.shape, "shape", unseen, _form(ref, obj.cell)))
    question, answer, form = _count(scene, config, rng, held_out)
    items.append(VQAItem(question, answer, "count", unseen, form))
    if scene.objects:
        question, answer, form = _position(scene, rng, held_out)
        items.append(VQAItem(question, answer, "position", unseen, form))
    question, answer, pair = _existence(scene, config, rng, include_held_out, held_out)
    items.append(
        VQAItem(question, answer, "existence", unseen or pair in held_pairs, "shape" if pair is None else "pair")
    )
    return items


def _form(ref: str, cell: tuple[int, int]) -> str:
    return "by-cell" if ref.endswith(f"in the {cell_name(cell)}") else "by-name"


# ---------------------------------------------------------------- edit instructions


def broad_instruction(instruction: str, rng: random.Random, held_out: bool = False) -> str:
    """A template edit instruction ('Make the circle red.') in a frame: 'Please make the circle red.',
    'Could you make the circle red?' ..."""
    bare = instruction.rstrip(".")
    lowered = bare[0].lower() + bare[1:]
    return EDIT_FRAMES.pick(rng, held_out).format(i=instruction, j=lowered + ".", k=lowered)
