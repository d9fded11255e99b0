"""The shapes world: a procedurally drawn world in which every picture has an exact symbolic description.

`ShapesWorld(seed)` samples scenes (1-4 coloured circles, squares and triangles in a 3x3 grid, on a white,
light grey or striped background) and turns them into every kind of training and evaluation item the project
needs: captions, VQA with exact answers, GenEval-style text-to-image prompts, editing triples and preference
pairs. All randomness flows from the seed; the split of a scene or prompt does not depend on it.

Splits. A scene belongs to exactly one split (`split_of_scene`): test if it shows a held-out (colour, shape)
pair, otherwise train / validation / test by a salted hash of its canonical key. A prompt belongs to exactly
one split by its text (held-out pairs again force test); its target scene is drawn until it belongs to the
same split, so pictures and prompt texts are both disjoint across splits. Different phrasings of the same
content can land in different splits: prompt texts are disjoint, prompt contents need not be.

Text-to-image targets are laid out like any scene by default; `ShapesWorldConfig(generation_layout="canonical")`
draws them in one fixed layout per object count or asked relation (large shapes on white), which concentrates a
generator's training signal on what the prompt says. Such a target takes its prompt's split (see
`scene_for_prompt`).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .language import (
    GENEVAL_CATEGORIES,
    VQA_TYPES,
    VQAItem,
    add_instruction,
    caption,
    enumerate_prompts,
    mentions_held_out_pair,
    move_instruction,
    recolour_instruction,
    remove_instruction,
    restyle_instruction,
    vqa_items,
)
from .render import render
from .scene import (
    SPLITS,
    Scene,
    ShapeInstance,
    ShapesWorldConfig,
    all_cells,
    cell_name,
    has_held_out_pair,
    split_of_scene,
    stable_unit_hash,
)

EDIT_KINDS = ("recolour", "move", "add", "remove", "restyle")
_MAX_ATTEMPTS = 10_000

# The canonical layout of text-to-image targets: cells by object count, or (subject, anchor) cells by relation.
# The prompt then decides the picture up to the colours it leaves open, so a model's image loss is about the
# prompt and not about where shapes happen to lie.
_CANONICAL_CELLS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((1, 1),),
    2: ((1, 0), (1, 2)),
    3: ((1, 0), (1, 1), (1, 2)),
    4: ((0, 0), (0, 2), (2, 0), (2, 2)),
}
_CANONICAL_RELATION_CELLS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "left of": ((1, 0), (1, 2)),
    "right of": ((1, 2), (1, 0)),
    "above": ((0, 1), (2, 1)),
    "below": ((2, 1), (0, 1)),
}

# The varied layout: a few cell sets per object count, and every row (left/right) or column (above/below) for a
# relation. With the background free too, one prompt has 6-9 pictures instead of the canonical one.
_VARIED_CELLS: dict[int, tuple[tuple[tuple[int, int], ...], ...]] = {
    1: (((1, 1),), ((0, 1),), ((2, 1),)),
    2: (((1, 0), (1, 2)), ((0, 0), (0, 2)), ((2, 0), (2, 2))),
    3: (((1, 0), (1, 1), (1, 2)), ((0, 0), (0, 1), (0, 2)), ((2, 0), (2, 1), (2, 2))),
    4: (((0, 0), (0, 2), (2, 0), (2, 2)), ((0, 1), (1, 0), (1, 2), (2, 1))),
}

__all__ = [
    "EDIT_KINDS",
    "GENEVAL_CATEGORIES",
    "SPLITS",
    "VQA_TYPES",
    "EditTriple",
    "PreferencePair",
    "Scene",
    "ShapeInstance",
    "ShapesWorld",
    "ShapesWorldConfig",
    "T2IItem",
    "VQAItem",
    "cell_name",
    "split_of_scene",
]


@dataclass(frozen=True)
class T2IItem:
    """A text-to-image prompt, its GenEval-format metadata and one ground-truth scene that satisfies it."""

    prompt: str
    metadata: dict[str, Any]
    scene: Scene
    split: str
    unseen_combination: bool


@dataclass(frozen=True)
class EditTriple:
    """source --instruction--> target; exactly one thing differs (kind: recolour/move/add/remove/restyle)."""

    source: Scene
    instruction: str
    target: Scene
    kind: str
    split: str
    unseen_combination: bool


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a scene that satisfies it (chosen) and one that does not (rejected)."""

    prompt: str
    metadata: dict[str, Any]
    chosen: Scene
    rejected: Scene
    unseen_combination: bool


class ShapesWorld:
    """Deterministic generator of shapes-world scenes and of every item built from them."""

    def __init__(self, seed: int = 0, image_size: int = 32, config: ShapesWorldConfig | None = None) -> None:
        self.config = dataclasses.replace(config or ShapesWorldConfig(), image_size=image_size)
        self.rng = random.Random(seed)
        self._prompt_table: dict[str, dict[str, list[dict[str, Any]]]] = {}

    # ------------------------------------------------------------ scenes

    def split_of(self, scene: Scene) -> str:
        return split_of_scene(scene, self.config)

    def _random_object(self, cell: tuple[int, int], pairs: tuple[tuple[str, str], ...]) -> ShapeInstance:
        colour, shape = self.rng.choice(pairs)
        return ShapeInstance(cell, shape, colour, self.rng.choice(self.config.size_names))

    def _random_scene(self, n_objects: int | None, forced_pair: tuple[str, str] | None, include_held: bool) -> Scene:
        config = self.config
        n = n_objects if n_objects is not None else self.rng.randint(1, config.max_objects)
        cells = self.rng.sample(all_cells(), n)
        pairs = config.allowed_pairs(include_held)
        objects = [self._random_object(cell, pairs) for cell in cells]
        if forced_pair is not None:
            colour, shape = forced_pair
            objects[0] = dataclasses.replace(objects[0], colour=colour, shape=shape)
        return Scene(tuple(objects), self.rng.choice(config.backgrounds))

    def _want_unseen(self, split: str, unseen: bool | None) -> bool:
        if unseen and split != "test":
            raise ValueError(f"unseen combinations exist only in the test split, not in {split!r}")
        if unseen is None:
            return (
                split == "test"
                and bool(self.config.held_out_pairs)
                and (self.rng.random() < self.config.test_unseen_fraction)
            )
        return unseen

    def sample_scene(self, split: str = "train", *, unseen: bool | None = None, n_objects: int | None = None) -> Scene:
        """A random scene of `split`. In test, `unseen` asks for (True) or against (False) a held-out pair;
        None draws it with probability `config.test_unseen_fraction`."""
        self.config.validate_split(split)
        if n_objects is not None and not 1 <= n_objects <= self.config.max_objects:
            raise ValueError(f"n_objects must be in [1, {self.config.max_objects}], got {n_objects}")
        if self._want_unseen(split, unseen):
            if not self.config.held_out_pairs:
                raise ValueError("this world holds out no (colour, shape) pair, so no scene is unseen")
            forced = self.rng.choice(self.config.held_out_pairs)
            return self._random_scene(n_objects, forced, include_held=True)
        for _ in range(_MAX_ATTEMPTS):
            scene = self._random_scene(n_objects, None, include_held=False)
            if self.split_of(scene) == split:
                return scene
        raise RuntimeError(f"no {split} scene found in {_MAX_ATTEMPTS} draws; check split_fractions")

    def render(self, scene: Scene) -> Image.Image:
        return render(scene, self.config)

    # ------------------------------------------------------------ understanding

    def caption(self, scene: Scene) -> str:
        return caption(scene, self.rng)

    def vqa(self, scene: Scene) -> list[VQAItem]:
        """One question per type; a train or validation scene never gets a question naming a held-out pair."""
        return vqa_items(scene, self.config, self.rng, include_held_out=self.split_of(scene) == "test")

    # ------------------------------------------------------------ text to image

    def prompts(self, category: str, split: str) -> list[dict[str, Any]]:
        """Every GenEval-format prompt (metadata dict) of a category that belongs to `split`."""
        self.config.validate_split(split)
        if category not in self._prompt_table:
            self._prompt_table[category] = self._split_prompts(category)
        return self._prompt_table[category][split]

    def _split_prompts(self, category: str) -> dict[str, list[dict[str, Any]]]:
        table: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        seen = []
        for meta in enumerate_prompts(category, self.config):
            (table["test"] if mentions_held_out_pair(meta, self.config) else seen).append(meta)
        seen.sort(key=lambda meta: stable_unit_hash(meta["prompt"], self.config.split_salt))
        _, f_validation, f_test = self.config.split_fractions
        n_validation = max(1, round(f_validation * len(seen)))
        n_test = max(1, round(f_test * len(seen)))
        table["validation"] = seen[:n_validation]
        table["test"] = seen[n_validation : n_validation + n_test] + table["test"]
        table["train"] = seen[n_validation + n_test :]
        return table

    def t2i_prompt(self, category: str, split: str = "train", *, unseen: bool | None = None) -> T2IItem:
        """A prompt of a GenEval category from `split`, with a ground-truth scene of the same split."""
        candidates = self.prompts(category, split)
        if split == "test":
            novel = [m for m in candidates if mentions_held_out_pair(m, self.config)]
            familiar = [m for m in candidates if not mentions_held_out_pair(m, self.config)]
            if unseen is None:
                unseen = bool(novel) and self.rng.random() < self.config.test_unseen_fraction
            candidates = novel if unseen else familiar
            if not candidates:
                raise ValueError(f"category {category!r} has no test prompt with unseen={unseen}")
        elif unseen:
            raise ValueError(f"unseen combinations exist only in the test split, not in {split!r}")
        metadata = copy.deepcopy(self.rng.choice(candidates))
        scene = self.scene_for_prompt(metadata, split)
        return T2IItem(metadata["prompt"], metadata, scene, split, mentions_held_out_pair(metadata, self.config))

    def scene_for_prompt(self, metadata: dict[str, Any], split: str) -> Scene:
        """A scene that satisfies the metadata with nothing else in it, drawn until it belongs to `split`.

        In the canonical layout the prompt fixes the picture up to the colours it leaves open (a fully named
        prompt has one picture), so the target takes its prompt's split instead: prompt texts stay disjoint
        across splits, but two phrasings of the same content in two splits can share their target picture."""
        self.config.validate_split(split)
        if mentions_held_out_pair(metadata, self.config) and split != "test":
            raise ValueError(f"prompt {metadata.get('prompt')!r} names a held-out pair; it belongs to test")
        if self.config.generation_layout in ("canonical", "varied"):
            return self._draw_scene_for(metadata)
        for _ in range(_MAX_ATTEMPTS):
            scene = self._draw_scene_for(metadata)
            if self.split_of(scene) == split:
                return scene
        raise RuntimeError(f"no {split} scene found for {metadata.get('prompt')!r}")

    def _colours_for(self, shape: str) -> list[str]:
        held = set(self.config.held_out_pairs)
        return [c for c in self.config.colours if (c, shape) not in held]

    def _draw_scene_for(self, metadata: dict[str, Any]) -> Scene:
        include = metadata.get("include", [])
        total = sum(clause["count"] for clause in include)
        if not include or total > self.config.max_objects:
            raise ValueError(f"metadata needs 1 to {self.config.max_objects} objects, got {total}")
        layout = self.config.generation_layout
        canonical = layout in ("canonical", "varied")  # both fill cells in order with large shapes
        if layout == "varied":
            free = list(self.rng.choice(_VARIED_CELLS[total]))
            self.rng.shuffle(free)
        elif canonical:
            free = list(_CANONICAL_CELLS[total])
        else:
            free = list(all_cells())
            self.rng.shuffle(free)
        placed: dict[int, list[tuple[int, int]]] = {}
        for index, clause in enumerate(include):
            if "position" in clause:
                relation, anchor = clause["position"]
                if clause["count"] != 1 or include[anchor]["count"] != 1:
                    raise ValueError("position clauses are drawn for single objects only")
                subject_cell, anchor_cell = self._relation_cells(relation, layout)
                placed[index], placed[anchor] = [subject_cell], [anchor_cell]
                free = [c for c in free if c not in (subject_cell, anchor_cell)]
        largest = max(self.config.sizes, key=lambda item: item[1])[0]
        objects = []
        for index, clause in enumerate(include):
            cells = placed.get(index) or [free.pop(0 if canonical else -1) for _ in range(clause["count"])]
            shared = clause.get("color") or self.rng.choice(self._colours_for(clause["class"]))
            for cell in cells:
                size = largest if canonical else self.rng.choice(self.config.size_names)
                objects.append(ShapeInstance(cell, clause["class"], shared, size))
        fixed_background = layout == "canonical"
        background = self.config.backgrounds[0] if fixed_background else self.rng.choice(self.config.backgrounds)
        return Scene(tuple(objects), background)

    def _relation_cells(self, relation: str, layout: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(subject, anchor) cells of a relation: fixed (canonical), on any row or column at the grid's two
        ends (varied), or anywhere on one line (random)."""
        if layout == "canonical":
            return self._canonical_cells_in_relation(relation)
        if layout == "random":
            return self._cells_in_relation(relation)
        subject, anchor = self._canonical_cells_in_relation(relation)
        line = self.rng.randrange(3)
        if relation in ("left of", "right of"):
            return (line, subject[1]), (line, anchor[1])
        return (subject[0], line), (anchor[0], line)

    @staticmethod
    def _canonical_cells_in_relation(relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
        if relation not in _CANONICAL_RELATION_CELLS:
            raise ValueError(f"unknown relation {relation!r}")
        return _CANONICAL_RELATION_CELLS[relation]

    def _cells_in_relation(self, relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(subject, anchor) cells on one row or column, so the relation holds with a whole cell to spare."""
        line = self.rng.randrange(3)
        first, second = sorted(self.rng.sample(range(3), 2))
        if relation in ("left of", "right of"):
            a, b = (line, first), (line, second)
        elif relation in ("above", "below"):
            a, b = (first, line), (second, line)
        else:
            raise ValueError(f"unknown relation {relation!r}")
        return (a, b) if relation in ("left of", "above") else (b, a)

    # ------------------------------------------------------------ editing

    def edit_triple(self, split: str = "train", kind: str | None = None) -> EditTriple:
        """A source scene of `split`, an instruction, and the target scene (also of `split`)."""
        self.config.validate_split(split)
        if kind is not None and kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
        kind = kind or self.rng.choice(EDIT_KINDS)
        for _ in range(_MAX_ATTEMPTS):
            source = self.sample_scene(split)
            edited = self.apply_edit(source, kind, include_held_out=split == "test")
            if edited is not None and self.split_of(edited[1]) == split:
                instruction, target = edited
                unseen = has_held_out_pair(source, self.config) or has_held_out_pair(target, self.config)
                return EditTriple(source, instruction, target, kind, split, unseen)
        raise RuntimeError(f"no {kind} edit found for split {split!r}")

    def apply_edit(self, source: Scene, kind: str, *, include_held_out: bool = False) -> tuple[str, Scene] | None:
        """(instruction, edited scene) for a random edit of `kind`, or None when the scene does not allow one
        (adding to a full scene, removing the last object). The edited scene may belong to another split."""
        if kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
        rng, config = self.rng, self.config
        empty = [c for c in all_cells() if c not in source.occupied()]
        if kind == "restyle":
            options = [b for b in config.backgrounds if b != source.background]
            if not options:
                return None
            background = rng.choice(options)
            return restyle_instruction(background, rng), Scene(source.objects, background)
        if kind == "add":
            if len(source.objects) >= config.max_objects:
                return None
            new = self._random_object(rng.choice(empty), config.allowed_pairs(include_held_out))
            return add_instruction(new, rng), Scene((*source.objects, new), source.background)
        obj = rng.choice(source.objects)
        if kind == "remove":
            if len(source.objects) < 2:
                return None
            return remove_instruction(source, obj, rng), source.replace_object(obj, None)
        if kind == "move":
            cell = rng.choice(empty)
            moved = dataclasses.replace(obj, cell=cell)
            return move_instruction(source, obj, cell, rng), source.replace_object(obj, moved)
        allowed = set(config.allowed_pairs(include_held_out))
        colours = [c for c in config.colours if c != obj.colour and (c, obj.shape) in allowed]
        if not colours:
            return None
        colour = rng.choice(colours)
        recoloured = dataclasses.replace(obj, colour=colour)
        return recolour_instruction(source, obj, colour, rng), source.replace_object(obj, recoloured)

    # ------------------------------------------------------------ preferences

    def preference_pair(self, category: str, split: str = "train") -> PreferencePair:
        """A prompt with its ground-truth scene (chosen) and a scene that breaks it (rejected)."""
        item = self.t2i_prompt(category, split)
        rejected = self.wrong_scene(item.metadata, item.scene)
        return PreferencePair(item.prompt, item.metadata, item.scene, rejected, item.unseen_combination)

    def wrong_scene(self, metadata: dict[str, Any], scene: Scene) -> Scene:
        """A variant of a scene satisfying `metadata` that fails it: wrong colour, count, shape or position.

        Used to build rejected samples for preference tests before any model samples exist.
        """
        include = metadata.get("include", [])
        tag = metadata.get("tag")
        if not include:
            raise ValueError("metadata has no include clause to violate")
        if tag == "position":
            return _swap_positions(include, scene)
        coloured = [c for c in include if "color" in c]
        if coloured:
            return self._recolour_named(coloured, scene)
        if tag == "counting":
            return self._miscount(include[0], scene)
        return self._reshape_named(include, scene)

    def _recolour_named(self, coloured: list[dict[str, Any]], scene: Scene) -> Scene:
        """One object whose colour a clause names, given another colour its shape may take."""
        clause = self.rng.choice(coloured)
        victim = next(o for o in scene.objects if o.shape == clause["class"] and o.colour == clause["color"])
        others = [c for c in self._colours_for(victim.shape) if c != clause["color"]]
        return scene.replace_object(victim, dataclasses.replace(victim, colour=self.rng.choice(others)))

    def _miscount(self, clause: dict[str, Any], scene: Scene) -> Scene:
        """One object of the counted class more (when a cell and the object budget allow, half the time) or less."""
        rng = self.rng
        matching = [o for o in scene.objects if o.shape == clause["class"]]
        empty = [c for c in all_cells() if c not in scene.occupied()]
        if rng.random() < 0.5 and empty and len(scene.objects) < self.config.max_objects:
            extra = dataclasses.replace(matching[0], cell=rng.choice(empty))
            return Scene((*scene.objects, extra), scene.background)
        return scene.replace_object(rng.choice(matching), None)

    def _reshape_named(self, include: list[dict[str, Any]], scene: Scene) -> Scene:
        """One object of a named class turned into another shape (keeping its colour where the shape allows it)."""
        rng, config = self.rng, self.config
        clause = rng.choice(include)
        victim = next(o for o in scene.objects if o.shape == clause["class"])
        # Prefer a shape the prompt does not name, so the victim cannot satisfy another clause by accident.
        present = {c["class"] for c in include}
        other_shapes = [s for s in config.shapes if s not in present] or [
            s for s in config.shapes if s != clause["class"]
        ]
        shape = rng.choice(other_shapes)
        colours = self._colours_for(shape)
        colour = victim.colour if victim.colour in colours else rng.choice(colours)
        return scene.replace_object(victim, dataclasses.replace(victim, shape=shape, colour=colour))


def _swap_positions(include: list[dict[str, Any]], scene: Scene) -> Scene:
    """The scene with the related pair's cells exchanged, so the relation a position prompt asks for turns round."""
    subject = next(c for c in include if "position" in c)
    anchor = include[subject["position"][1]]
    a = next(o for o in scene.objects if o.shape == subject["class"])
    b = next(o for o in scene.objects if o.shape == anchor["class"])
    swapped = [o for o in scene.objects if o not in (a, b)]
    swapped += [dataclasses.replace(a, cell=b.cell), dataclasses.replace(b, cell=a.cell)]
    return Scene(tuple(swapped), scene.background)
