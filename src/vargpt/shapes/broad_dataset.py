"""Rows in the broad language (`broad.py`): what `write_sharegpt_dataset` writes when a recipe asks for it.

The rows have the template rows' layout and meta, so training and `vargpt eval shapes` read them alike. Prompt
texts keep to one split (by the same salted hash as scenes, held-out pairs forcing test), as template prompts do.
`held_out=True` words every row with the phrasings training never reads: the `test-paraphrase` split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from .broad import broad_instruction, broad_t2i_metadata, broad_vqa
from .language import VQAItem, mentions_held_out_pair
from .scene import Scene, has_held_out_pair, stable_unit_hash
from .world import EDIT_KINDS, GENEVAL_CATEGORIES, VQA_TYPES, ShapesWorld, T2IItem

IMAGE_TOKEN = "<image>"
IMAGE_GEN_TOKEN = "<image_gen>"
Save = Callable[[Image.Image], str]


def row(messages: list[tuple[str, str]], images: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """A sharegpt row from (user, assistant) turn pairs."""
    turns = []
    for user, assistant in messages:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": turns, "images": images, "meta": meta}


def prompt_split(text: str, world: ShapesWorld) -> str:
    """The split a prompt text belongs to, by the salted hash scenes use."""
    u = stable_unit_hash(text, world.config.split_salt)
    train, validation, _ = world.config.split_fractions
    return "train" if u < train else "validation" if u < train + validation else "test"


def broad_t2i(world: ShapesWorld, category: str, scene_split: str, held_out: bool) -> dict[str, Any]:
    """Metadata with a prompt of `scene_split` (any held-out phrasing belongs to the paraphrase split)."""
    config, rng = world.config, world.rng
    unseen = scene_split == "test" and bool(config.held_out_pairs) and rng.random() < config.test_unseen_fraction
    for _ in range(1000):
        metadata = broad_t2i_metadata(category, config, rng, unseen=unseen, held_out=held_out)
        if (
            held_out
            or mentions_held_out_pair(metadata, config)
            or prompt_split(metadata["prompt"], world) == scene_split
        ):
            return metadata
    raise RuntimeError(f"no {scene_split} prompt of {category!r} found in 1000 draws")


def broad_t2i_item(world: ShapesWorld, category: str, scene_split: str, held_out: bool) -> T2IItem:
    """A broad prompt of `scene_split` with its ground-truth scene (what generation rows and DPO pairs draw)."""
    metadata = broad_t2i(world, category, scene_split, held_out)
    scene = world.scene_for_prompt(metadata, scene_split)
    return T2IItem(metadata["prompt"], metadata, scene, scene_split, mentions_held_out_pair(metadata, world.config))


class BroadPromptWorld:
    """A shapes world whose text-to-image prompts are worded by the broad grammar (training phrasings only): what
    a broad recipe's DPO stage draws its pairs from, so preference data speaks the language its SFT data spoke."""

    def __init__(self, world: ShapesWorld) -> None:
        self.world = world

    def t2i_prompt(self, category: str, split: str = "train") -> T2IItem:
        return broad_t2i_item(self.world, category, split, held_out=False)

    def render(self, scene: Scene) -> Image.Image:
        return self.world.render(scene)


def understanding_rows(
    world: ShapesWorld,
    split: str,
    scene_split: str,
    n: int,
    caption_fraction: float,
    save: Save,
    questions: Callable[[Scene], list[VQAItem]],
) -> list[dict]:
    """Captions and questions about drawn scenes; `questions` words them (the templates' `world.vqa`, or the broad
    grammar), so both languages draw scenes, captions and question types in the same order."""
    rows = []
    for index in range(n):
        scene = world.sample_scene(scene_split)
        meta = {"task": "understanding", "split": split, "scene": scene.to_dict()}
        if world.rng.random() < caption_fraction:
            question, answer = "Describe the image.", world.caption(scene)
            meta.update(category="caption", unseen_combination=has_held_out_pair(scene, world.config))
        else:
            wanted = VQA_TYPES[index % len(VQA_TYPES)]
            item = next(q for q in questions(scene) if q.qtype == wanted)
            question, answer = item.question, item.answer
            meta.update(category=item.qtype, form=item.form, unseen_combination=item.unseen_combination)
        meta["answer"] = answer
        rows.append(row([(IMAGE_TOKEN + question, answer)], [save(world.render(scene))], meta))
    return rows


def broad_questions(world: ShapesWorld, scene_split: str, held_out: bool) -> Callable[[Scene], list[VQAItem]]:
    """The broad grammar's questions about a scene, drawn from the world's generator."""

    def questions(scene: Scene) -> list[VQAItem]:
        return broad_vqa(scene, world.config, world.rng, include_held_out=scene_split == "test", held_out=held_out)

    return questions


def generation_rows(world: ShapesWorld, split: str, scene_split: str, n: int, save: Save, held_out: bool) -> list[dict]:
    rows = []
    for index in range(n):
        item = broad_t2i_item(world, GENEVAL_CATEGORIES[index % len(GENEVAL_CATEGORIES)], scene_split, held_out)
        metadata, scene = item.metadata, item.scene
        meta = {
            "task": "generation",
            "split": split,
            "category": metadata["tag"],
            "tags": [metadata["tag"]],
            "geneval": metadata,
            "unseen_combination": item.unseen_combination,
            "scene": scene.to_dict(),
        }
        rows.append(row([(metadata["prompt"], IMAGE_GEN_TOKEN)], [save(world.render(scene))], meta))
    return rows


def editing_rows(world: ShapesWorld, split: str, scene_split: str, n: int, save: Save, held_out: bool) -> list[dict]:
    rows = []
    for index in range(n):
        triple = world.edit_triple(scene_split, EDIT_KINDS[index % len(EDIT_KINDS)])
        instruction = broad_instruction(triple.instruction, world.rng, held_out)
        meta = {
            "task": "editing",
            "split": split,
            "category": triple.kind,
            "tags": [triple.kind],
            "instruction": instruction,
            "unseen_combination": triple.unseen_combination,
            "source_scene": triple.source.to_dict(),
            "target_scene": triple.target.to_dict(),
        }
        images = [save(world.render(triple.source)), save(world.render(triple.target))]
        rows.append(row([(IMAGE_TOKEN + instruction, IMAGE_GEN_TOKEN)], images, meta))
    return rows
