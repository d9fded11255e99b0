"""The broad language (issue 28, item 1): many phrasings, colours on both objects of a relation, held-out wordings."""

from __future__ import annotations

import dataclasses
import random

import pytest

from vargpt.shapes.broad import (
    FRAMES,
    JOINERS,
    QUESTIONS,
    RELATION_WORDS,
    broad_instruction,
    broad_metadata,
    broad_prompt,
    broad_t2i_metadata,
    broad_vqa,
)
from vargpt.shapes.render import render
from vargpt.shapes.scene import ShapesWorldConfig
from vargpt.shapes.scoring import evaluate_generated_image
from vargpt.shapes.world import GENEVAL_CATEGORIES, ShapesWorld

CONFIG = ShapesWorldConfig(generation_layout="varied")


def _held_out_markers() -> list[str]:
    """Words and phrasings only the held-out banks contain."""
    return ["sketch", "kindly", "depict", "illustration", "give me", "as well as", "along with", "side of", "directly"]


def test_every_bank_keeps_held_out_phrasings_apart_from_trained_ones():
    banks = [FRAMES, JOINERS, *RELATION_WORDS.values(), *QUESTIONS.values()]
    for bank in banks:
        assert bank.held_out and not set(bank.held_out) & set(bank.trained)


def test_training_prompts_never_use_a_held_out_phrasing_and_paraphrases_always_do():
    rng = random.Random(0)
    trained = [
        broad_t2i_metadata(c, CONFIG, rng, unseen=False, held_out=False)["prompt"] for c in GENEVAL_CATEGORIES * 60
    ]
    held = [broad_t2i_metadata(c, CONFIG, rng, unseen=False, held_out=True)["prompt"] for c in GENEVAL_CATEGORIES * 60]
    assert not any(marker in p.lower() for p in trained for marker in _held_out_markers())
    assert all(any(marker in p.lower() for marker in _held_out_markers()) for p in held)
    assert len(set(trained)) > 250  # many phrasings, not 4-5 per category


def _relation(subject: tuple[str, str], relation: str, anchor: tuple[str, str]) -> dict:
    anchor_clause = {"class": anchor[1], "count": 1, "color": anchor[0]}
    subject_clause = {"class": subject[1], "count": 1, "color": subject[0], "position": [relation, 0]}
    return {"tag": "position", "include": [anchor_clause, subject_clause]}


def test_the_issues_prompts_are_in_the_language():
    """'two blue squares', colours on both objects of a relation, relations in several forms."""
    rng = random.Random(1)
    counting = {"tag": "counting", "include": [{"class": "square", "count": 2, "color": "blue"}]}
    left = _relation(("green", "triangle"), "left of", ("yellow", "circle"))
    above = _relation(("blue", "square"), "above", ("yellow", "triangle"))
    for metadata, wanted in (
        (counting, "two blue squares"),
        (left, "a green triangle to the left of a yellow circle"),
        (above, "a blue square above a yellow triangle"),
    ):
        prompts = {broad_prompt(metadata, rng).lower() for _ in range(3000)}
        assert any(p.endswith(wanted) for p in prompts), wanted
        assert len(prompts) > 50


@pytest.mark.parametrize("category", GENEVAL_CATEGORIES)
def test_varied_targets_pass_their_prompts_and_wrong_colours_fail(category):
    """The ground truth of a broad prompt passes GenEval's rules; a relation's target with its anchor recoloured
    fails, so the scorer checks each object's colour."""
    world = ShapesWorld(3, config=CONFIG)
    for _ in range(20):
        metadata = broad_t2i_metadata(category, CONFIG, world.rng, unseen=False, held_out=False)
        scene = world.scene_for_prompt(metadata, "train")
        assert evaluate_generated_image(render(scene, CONFIG), metadata)[0], metadata["prompt"]
        anchor = metadata["include"][0]
        if category == "position" and "color" in anchor:
            victim = next(o for o in scene.objects if o.shape == anchor["class"])
            other = next(c for c in CONFIG.colours if c != anchor["color"])
            wrong = scene.replace_object(victim, dataclasses.replace(victim, colour=other))
            assert not evaluate_generated_image(render(wrong, CONFIG), metadata)[0]


def test_broad_questions_have_the_template_types_and_exact_answers():
    world = ShapesWorld(4)
    for _ in range(50):
        scene = world.sample_scene("train")
        items = broad_vqa(scene, world.config, world.rng, include_held_out=False)
        assert [i.qtype for i in items] == ["colour", "shape", "count", "position", "existence"]
        colour, shape = items[0], items[1]
        assert colour.answer in world.config.colours and shape.answer in world.config.shapes


def test_a_prompt_with_colours_on_a_relation_names_both_colours():
    rng = random.Random(2)
    pairs = CONFIG.allowed_pairs(False)
    for _ in range(200):
        metadata = broad_metadata("position", CONFIG, rng, pairs)
        anchor, subject = metadata["include"]
        if "color" in anchor:
            text = broad_prompt(metadata, rng)
            assert anchor["color"] in text and subject["color"] in text and anchor["color"] != subject["color"]
            return
    pytest.fail("no coloured relation drawn")


def test_edit_instructions_keep_their_content():
    rng = random.Random(3)
    framed = {broad_instruction("Make the circle red.", rng) for _ in range(40)}
    assert len(framed) >= 3 and all("the circle red" in f for f in framed)
    assert all("ould you" in f or "Kindly" in f for f in (broad_instruction("Remove the square.", rng, True),))


def test_the_broad_prompt_world_gives_dpo_pairs_broad_training_prompts_whose_scenes_satisfy_them():
    from vargpt.shapes.broad_dataset import BroadPromptWorld
    from vargpt.shapes.language import enumerate_prompts

    world = BroadPromptWorld(ShapesWorld(5, image_size=32, config=CONFIG))
    templates = {m["prompt"] for c in GENEVAL_CATEGORIES for m in enumerate_prompts(c, CONFIG)}
    items = [world.t2i_prompt(GENEVAL_CATEGORIES[i % len(GENEVAL_CATEGORIES)], "train") for i in range(60)]
    assert sum(item.prompt not in templates for item in items) >= 30  # worded by the grammar, not the templates
    for item in items:
        assert not any(marker in item.prompt.lower() for marker in _held_out_markers())  # training phrasings only
        assert not item.unseen_combination
        correct, _ = evaluate_generated_image(world.render(item.scene), item.metadata, CONFIG)
        assert correct, item.prompt


def test_the_trained_grammar_uses_every_word_of_the_template_prompts():
    from vargpt.model_card import prompt_words
    from vargpt.shapes.language import enumerate_prompts

    rng = random.Random(3)
    broad_words = set()
    for index in range(3000):
        category = GENEVAL_CATEGORIES[index % len(GENEVAL_CATEGORIES)]
        metadata = broad_t2i_metadata(category, CONFIG, rng, unseen=False, held_out=False)
        broad_words.update(prompt_words(metadata["prompt"]))
    template_words = {
        w for c in GENEVAL_CATEGORIES for m in enumerate_prompts(c, CONFIG) for w in prompt_words(m["prompt"])
    }
    assert template_words <= broad_words, sorted(template_words - broad_words)
