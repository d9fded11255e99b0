"""Multi-turn rows: a follow-up question about the same image, a drawing after a question, a question after a
drawing. Trained with the understanding rows (meta.task "understanding", category "conversation"), so a stage
that trains understanding learns that later turns still answer in the world.

Chat does not feed a drawn image back into the history (the template has no slot for it), so a question after
a drawing asks only what the prompt fixed (the count of a named shape, the colour it named): the answer follows
from the conversation's text as well as from the picture.
"""

from __future__ import annotations

import random
from typing import Any

from .broad import Phrasings, broad_vqa
from .broad_dataset import IMAGE_GEN_TOKEN, IMAGE_TOKEN, Save, broad_t2i, row
from .language import VQAItem, plural
from .scene import Scene, has_held_out_pair
from .world import GENEVAL_CATEGORIES, ShapesWorld

CONVERSATION_KINDS = ("follow-up", "draw-after-question", "question-after-drawing")
AFTER_DRAWING: dict[str, Phrasings] = {
    "count": Phrasings(
        ("How many {p} did you draw?", "How many {p} are in your picture?"), ("Can you count the {p} you drew?",)
    ),
    "colour": Phrasings(
        ("What colour is the {s} you drew?", "Which colour did you give the {s}?"),
        ("Tell me the colour of the {s} you drew.",),
    ),
}


def _two_questions(world: ShapesWorld, scene: Scene, scene_split: str, held_out: bool) -> tuple[VQAItem, VQAItem]:
    items = broad_vqa(scene, world.config, world.rng, include_held_out=scene_split == "test", held_out=held_out)
    first, second = world.rng.sample(items, 2)
    return first, second


def after_drawing_question(
    metadata: dict[str, Any], scene: Scene, rng: random.Random, held_out: bool
) -> tuple[str, str, str]:
    """(question, answer, form) about a drawing that the prompt's words already decide."""
    clause = rng.choice(metadata["include"])
    shape = clause["class"]
    if clause.get("color") and clause["count"] == 1 and sum(o.shape == shape for o in scene.objects) == 1:
        return AFTER_DRAWING["colour"].pick(rng, held_out).format(s=shape), clause["color"], "colour"
    count = sum(o.shape == shape for o in scene.objects)
    return AFTER_DRAWING["count"].pick(rng, held_out).format(p=plural(shape)), str(count), "count"


def conversation_row(world: ShapesWorld, split: str, scene_split: str, kind: str, save: Save, held_out: bool) -> dict:
    """One conversation of `kind`; meta.turns holds what each assistant turn must say or draw."""
    meta: dict[str, Any] = {"task": "understanding", "split": split, "category": "conversation", "form": kind}
    if kind == "question-after-drawing":
        metadata = broad_t2i(world, world.rng.choice(GENEVAL_CATEGORIES), scene_split, held_out)
        target = world.scene_for_prompt(metadata, scene_split)
        question, answer, qtype = after_drawing_question(metadata, target, world.rng, held_out)
        meta.update(
            scene=target.to_dict(),
            answer=answer,
            qtype=qtype,
            unseen_combination=has_held_out_pair(target, world.config),
        )
        meta["turns"] = [{"geneval": metadata}, {"answer": answer, "qtype": qtype}]
        return row([(metadata["prompt"], IMAGE_GEN_TOKEN), (question, answer)], [save(world.render(target))], meta)
    scene = world.sample_scene(scene_split)
    first, second = _two_questions(world, scene, scene_split, held_out)
    meta.update(scene=scene.to_dict(), unseen_combination=first.unseen_combination or second.unseen_combination)
    turns = [(IMAGE_TOKEN + first.question, first.answer)]
    if kind == "follow-up":
        meta.update(answer=second.answer, qtype=second.qtype)
        meta["turns"] = [
            {"answer": first.answer, "qtype": first.qtype},
            {"answer": second.answer, "qtype": second.qtype},
        ]
        return row([*turns, (second.question, second.answer)], [save(world.render(scene))], meta)
    if kind != "draw-after-question":
        raise ValueError(f"unknown conversation kind {kind!r}; known: {CONVERSATION_KINDS}")
    metadata = broad_t2i(world, world.rng.choice(GENEVAL_CATEGORIES), scene_split, held_out)
    target = world.scene_for_prompt(metadata, scene_split)
    meta["turns"] = [{"answer": first.answer, "qtype": first.qtype}, {"geneval": metadata}]
    meta["unseen_combination"] |= has_held_out_pair(target, world.config)
    images = [save(world.render(scene)), save(world.render(target))]
    return row([*turns, (metadata["prompt"], IMAGE_GEN_TOKEN)], images, meta)


def conversation_rows(
    world: ShapesWorld, split: str, scene_split: str, n: int, save: Save, held_out: bool
) -> list[dict]:
    """`n` conversations, the kinds in turn."""
    return [
        conversation_row(world, split, scene_split, CONVERSATION_KINDS[i % len(CONVERSATION_KINDS)], save, held_out)
        for i in range(n)
    ]
