import json
import re

import numpy as np
import pytest

from vargpt.shapes.dataset import validate_sharegpt_dataset, write_sharegpt_dataset
from vargpt.shapes.language import enumerate_prompts
from vargpt.shapes.scene import (
    COLUMN_WORDS,
    GREY_RGB,
    ROW_WORDS,
    WHITE_RGB,
    Scene,
    ShapeInstance,
    ShapesWorldConfig,
    all_cells,
    cell_name,
    has_held_out_pair,
    split_of_scene,
)
from vargpt.shapes.world import EDIT_KINDS, GENEVAL_CATEGORIES, SPLITS, VQA_TYPES, ShapesWorld

CONFIG = ShapesWorldConfig()
HELD_OUT_PHRASES = [f"{colour} {shape}" for colour, shape in CONFIG.held_out_pairs]


def _differences(source: Scene, target: Scene) -> tuple[set, set]:
    a, b = set(source.objects), set(target.objects)
    return a - b, b - a


def test_same_seed_same_items_and_different_seed_different_items():
    def draw(seed):
        world = ShapesWorld(seed)
        scenes = [world.sample_scene(split) for split in SPLITS for _ in range(20)]
        vqa = [world.vqa(s) for s in scenes]
        prompts = [world.t2i_prompt(c, "train") for c in GENEVAL_CATEGORIES]
        edits = [world.edit_triple("validation", k) for k in EDIT_KINDS]
        return scenes, vqa, prompts, edits

    assert draw(7) == draw(7)
    assert draw(7)[0] != draw(8)[0]


def test_scene_splits_are_disjoint_and_held_out_pairs_stay_in_test():
    world = ShapesWorld(0)
    keys = {}
    for split in SPLITS:
        scenes = [world.sample_scene(split) for _ in range(400)]
        assert all(split_of_scene(s, CONFIG) == split for s in scenes)
        keys[split] = {s.key for s in scenes}
        held = [has_held_out_pair(s, CONFIG) for s in scenes]
        if split == "test":
            assert 0.15 < np.mean(held) < 0.5  # test_unseen_fraction = 0.3
        else:
            assert not any(held)
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert all(has_held_out_pair(world.sample_scene("test", unseen=True), CONFIG) for _ in range(50))
    assert not any(has_held_out_pair(world.sample_scene("test", unseen=False), CONFIG) for _ in range(50))
    with pytest.raises(ValueError, match="only in the test split"):
        world.sample_scene("train", unseen=True)


def test_split_of_a_scene_does_not_depend_on_the_world_seed():
    scenes = [ShapesWorld(1).sample_scene("train") for _ in range(5)] + [ShapesWorld(2).sample_scene("test")]
    for scene in scenes:
        assert ShapesWorld(99).split_of(scene) == split_of_scene(scene, CONFIG)


def test_scene_is_a_canonical_value():
    a = ShapeInstance((2, 0), "circle", "red", "small")
    b = ShapeInstance((0, 1), "square", "blue", "large")
    assert Scene((a, b), "grey") == Scene((b, a), "grey")
    assert Scene((a, b), "grey").key == Scene((b, a), "grey").key
    assert Scene.from_dict(json.loads(json.dumps(Scene((a, b), "grey").to_dict()))) == Scene((a, b), "grey")
    with pytest.raises(ValueError, match="one shape per cell"):
        Scene((a, ShapeInstance((2, 0), "square", "blue")), "white")
    with pytest.raises(ValueError, match="cell"):
        ShapeInstance((3, 0), "circle", "red")


def test_bad_configuration_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorld(0, image_size=8)
    with pytest.raises(ValueError, match="shapes"):
        ShapesWorldConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="held-out pair"):
        ShapesWorldConfig(held_out_pairs=(("pink", "circle"),))
    world = ShapesWorld(0)
    with pytest.raises(ValueError, match="split"):
        world.sample_scene("dev")
    with pytest.raises(ValueError, match="GenEval category"):
        world.t2i_prompt("shapes", "train")
    with pytest.raises(ValueError, match="unknown colour"):
        world.render(Scene((ShapeInstance((0, 0), "circle", "pink"),), "white"))


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_uses_only_palette_and_background_colours(image_size):
    world = ShapesWorld(3, image_size=image_size)
    allowed = {tuple(rgb) for _, rgb in CONFIG.palette} | {WHITE_RGB, GREY_RGB}
    for _ in range(20):
        scene = world.sample_scene("train")
        image = world.render(scene)
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        used = {tuple(p) for p in np.asarray(image).reshape(-1, 3).tolist()}
        assert used <= allowed
        assert {CONFIG.colour_rgb[o.colour] for o in scene.objects} <= used


def test_prompt_texts_are_disjoint_across_splits_and_cover_every_prompt():
    world = ShapesWorld(0)
    for category in GENEVAL_CATEGORIES:
        texts = {split: [m["prompt"] for m in world.prompts(category, split)] for split in SPLITS}
        assert all(texts[split] for split in SPLITS)
        assert not set(texts["train"]) & set(texts["validation"])
        assert not set(texts["train"]) & set(texts["test"])
        assert not set(texts["validation"]) & set(texts["test"])
        everything = [m["prompt"] for m in enumerate_prompts(category, CONFIG)]
        assert sorted(t for split in SPLITS for t in texts[split]) == sorted(everything)
        for split in ("train", "validation"):
            assert not any(phrase in text for text in texts[split] for phrase in HELD_OUT_PHRASES)


def test_t2i_metadata_follows_the_geneval_clause_format():
    world = ShapesWorld(0)
    for category in GENEVAL_CATEGORIES:
        assert len({m["prompt"] for m in enumerate_prompts(category, CONFIG)}) >= 3 * 3  # several phrasings
        for _ in range(20):
            item = world.t2i_prompt(category, "train")
            meta = item.metadata
            assert meta["tag"] == category and meta["prompt"] == item.prompt
            assert set(meta) <= {"tag", "include", "exclude", "prompt"}
            for clause in meta["include"]:
                assert set(clause) <= {"class", "count", "color", "position"}
                assert clause["class"] in CONFIG.shapes and clause["count"] >= 1
            counts = {c["class"]: c["count"] for c in meta["include"]}
            if category == "counting":
                (clause,) = meta["include"]
                assert meta["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
                assert 2 <= clause["count"] <= 4
            if category == "position":
                assert "position" not in meta["include"][0]
                relation, target = meta["include"][1]["position"]
                assert target == 0 and relation in ("left of", "right of", "above", "below")
            if category in ("colors", "color_attr"):
                assert all(c["color"] in CONFIG.colours for c in meta["include"])
            shown = {}
            for obj in item.scene.objects:
                shown[obj.shape] = shown.get(obj.shape, 0) + 1
            assert shown == counts  # the ground truth holds exactly what was asked for
            assert split_of_scene(item.scene, CONFIG) == "train"


def test_unseen_test_prompts_name_a_held_out_pair_and_are_flagged():
    world = ShapesWorld(0)
    for category in ("colors", "color_attr"):
        unseen = world.t2i_prompt(category, "test", unseen=True)
        assert unseen.unseen_combination and any(p in unseen.prompt for p in HELD_OUT_PHRASES)
        assert has_held_out_pair(unseen.scene, CONFIG)
        seen = world.t2i_prompt(category, "test", unseen=False)
        assert not seen.unseen_combination and not has_held_out_pair(seen.scene, CONFIG)
    with pytest.raises(ValueError, match="no test prompt"):
        world.t2i_prompt("counting", "test", unseen=True)


def test_vqa_answers_are_short_and_exact():
    world = ShapesWorld(5)
    seen_types = set()
    for _ in range(200):
        scene = world.sample_scene("train")
        items = world.vqa(scene)
        assert [i.qtype for i in items] == list(VQA_TYPES)
        for item in items:
            seen_types.add(item.qtype)
            assert " " not in item.answer and item.answer == item.answer.lower()
            assert not any(p in item.question for p in HELD_OUT_PHRASES)
            if item.qtype == "colour":
                assert item.answer in {o.colour for o in scene.objects}
            if item.qtype == "shape":
                assert item.answer in {o.shape for o in scene.objects}
            if item.question == "How many shapes are there?":
                assert item.answer == str(len(scene.objects))
            if item.qtype in ("existence",):
                assert item.answer in ("yes", "no")
            if item.qtype == "position":
                ref = re.split(r" (?:on the left|at the top|left of|right of|above|below)\b", item.question)[0]
                assert " in the " not in ref or item.question.startswith("Is there a shape in the ")
        colour_q = items[0]
        if colour_q.question.startswith("What colour is the ") and " in the " not in colour_q.question:
            shape = colour_q.question.removeprefix("What colour is the ").rstrip("?")
            assert colour_q.answer == next(o.colour for o in scene.objects if o.shape == shape)
    assert seen_types == set(VQA_TYPES)


def test_every_question_names_how_it_asks():
    world = ShapesWorld(6)
    forms = set()
    for _ in range(300):
        scene = world.sample_scene("train")
        for item in world.vqa(scene):
            forms.add((item.qtype, item.form))
            cell_named = any(item.question.rstrip("?").endswith(f" in the {cell_name(c)}") for c in all_cells())
            if item.qtype in ("colour", "shape"):
                assert item.form == ("by-cell" if cell_named else "by-name"), item
            if item.qtype == "existence":
                named_colour = any(f" {c} " in item.question for c in CONFIG.colours)
                assert item.form == ("pair" if named_colour else "shape"), item
            if item.form == "column":
                assert item.answer in COLUMN_WORDS
            if item.form == "row":
                assert item.answer in ROW_WORDS
            if item.form in ("relation", "cell"):
                assert item.answer in ("yes", "no")
            if item.qtype == "count":
                asked = item.question.split()[2]
                counted = "all" if asked in ("shapes", "objects") else "colour" if asked in CONFIG.colours else "shape"
                assert item.form == counted, item
    expected = {("colour", "by-cell"), ("colour", "by-name"), ("shape", "by-cell"), ("shape", "by-name")}
    expected |= {("count", f) for f in ("all", "shape", "colour")} | {("existence", "pair"), ("existence", "shape")}
    expected |= {("position", f) for f in ("column", "row", "relation")}
    assert expected <= forms


def test_existence_answers_match_the_scene():
    world = ShapesWorld(2)
    answers = []
    for _ in range(300):
        scene = world.sample_scene("train")
        item = world.vqa(scene)[-1]
        colour, shape = re.search(r" an? (?:(\w+) )?(circle|square|triangle)\b", item.question).groups()
        present = any(o.shape == shape and colour in (None, o.colour) for o in scene.objects)
        assert item.answer == ("yes" if present else "no"), (item, scene)
        answers.append(item.answer)
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_captions_mention_every_object_and_the_background():
    world = ShapesWorld(1)
    for _ in range(50):
        scene = world.sample_scene("validation")
        text = world.caption(scene).lower()
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in text
        assert {"white": "white", "grey": "light grey", "stripes": "striped"}[scene.background] in text


@pytest.mark.parametrize("kind", EDIT_KINDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_edit_triples_change_exactly_one_thing(kind, split):
    world = ShapesWorld(4)
    for _ in range(30):
        triple = world.edit_triple(split, kind)
        source, target = triple.source, triple.target
        assert triple.kind == kind and source != target
        assert split_of_scene(source, CONFIG) == split == split_of_scene(target, CONFIG)
        assert triple.unseen_combination == (has_held_out_pair(source, CONFIG) or has_held_out_pair(target, CONFIG))
        gone, new = _differences(source, target)
        if kind == "restyle":
            assert source.objects == target.objects and source.background != target.background
            continue
        assert source.background == target.background
        if kind == "add":
            assert not gone and len(new) == 1
            (obj,) = new
            assert f"{obj.size} {obj.colour} {obj.shape}" in triple.instruction
        elif kind == "remove":
            assert len(gone) == 1 and not new
        else:
            (before,), (after,) = gone, new
            if kind == "move":
                assert (before.shape, before.colour, before.size) == (after.shape, after.colour, after.size)
                assert before.cell != after.cell
            else:
                assert before.cell == after.cell and before.colour != after.colour
                assert after.colour in triple.instruction


def test_train_text_never_names_a_held_out_pair():
    world = ShapesWorld(6)
    texts = []
    for _ in range(100):
        scene = world.sample_scene("train")
        texts.append(world.caption(scene))
        texts += [q.question for q in world.vqa(scene)]
        texts.append(world.edit_triple("train").instruction)
    texts += [world.t2i_prompt(c, "train").prompt for c in GENEVAL_CATEGORIES for _ in range(20)]
    assert not [t for t in texts if any(p in t.lower() for p in HELD_OUT_PHRASES)]


def test_preference_pairs_reject_a_different_scene():
    world = ShapesWorld(0)
    for category in GENEVAL_CATEGORIES:
        pair = world.preference_pair(category, "train")
        assert pair.chosen != pair.rejected
        assert pair.metadata["tag"] == category and pair.prompt == pair.metadata["prompt"]


def test_sharegpt_writer_output_validates(tmp_path):
    path = write_sharegpt_dataset(tmp_path, "train", n_understanding=12, n_generation=12, n_editing=10, seed=3)
    assert path == tmp_path / "train.jsonl"
    assert validate_sharegpt_dataset(path) == 34
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tasks = [r["meta"]["task"] for r in rows]
    assert tasks == ["understanding"] * 12 + ["generation"] * 12 + ["editing"] * 10
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        task = row["meta"]["task"]
        if task == "understanding":
            assert user["content"].startswith("<image>") and len(row["images"]) == 1
            assert assistant["content"] == row["meta"]["answer"]
            Scene.from_dict(row["meta"]["scene"])
        elif task == "generation":
            assert "<image" not in user["content"] and assistant["content"] == "<image_gen>"
            assert row["meta"]["geneval"]["prompt"] == user["content"]
            assert row["meta"]["category"] in GENEVAL_CATEGORIES
        else:
            assert user["content"].startswith("<image>") and assistant["content"] == "<image_gen>"
            assert len(row["images"]) == 2 and row["meta"]["category"] in EDIT_KINDS
            assert Scene.from_dict(row["meta"]["source_scene"]) != Scene.from_dict(row["meta"]["target_scene"])
        assert all((tmp_path / p).is_file() for p in row["images"])
    assert {r["meta"]["category"] for r in rows if r["meta"]["task"] == "generation"} == set(GENEVAL_CATEGORIES)


def test_sharegpt_writer_is_deterministic_and_splits_do_not_share_scenes(tmp_path):
    first = write_sharegpt_dataset(tmp_path / "a", "validation", 8, 6, 5, seed=1).read_text()
    second = write_sharegpt_dataset(tmp_path / "b", "validation", 8, 6, 5, seed=1).read_text()
    assert first == second
    assert (tmp_path / "a/images/validation/000001.png").read_bytes() == (
        tmp_path / "b/images/validation/000001.png"
    ).read_bytes()
    keys = {}
    for split in SPLITS:
        rows = [
            json.loads(x)
            for x in write_sharegpt_dataset(tmp_path / "c", split, 20, 12, 10, seed=1).read_text().splitlines()
        ]
        scenes = [r["meta"][k] for r in rows for k in ("scene", "source_scene", "target_scene") if k in r["meta"]]
        keys[split] = {Scene.from_dict(s).key for s in scenes}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_sharegpt_validator_rejects_a_placeholder_mismatch(tmp_path):
    path = write_sharegpt_dataset(tmp_path, "test", 2, 0, 0, seed=0)
    row = json.loads(path.read_text().splitlines()[0])
    row["images"].append(row["images"][0])
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="placeholders"):
        validate_sharegpt_dataset(path)


def test_canonical_targets_follow_their_prompt_in_one_layout_per_count_or_relation():
    from vargpt.shapes.scoring import evaluate_generated_image

    canonical = ShapesWorldConfig(generation_layout="canonical")
    layouts = {
        1: {((1, 1),)},
        2: {((1, 0), (1, 2)), ((0, 1), (2, 1))},  # side by side, or one above the other for "above" / "below"
        3: {((1, 0), (1, 1), (1, 2))},
        4: {((0, 0), (0, 2), (2, 0), (2, 2))},
    }
    for split in SPLITS:
        world, again = ShapesWorld(3, config=canonical), ShapesWorld(3, config=canonical)
        for index in range(60):
            item = world.t2i_prompt(GENEVAL_CATEGORIES[index % len(GENEVAL_CATEGORIES)], split)
            assert item.scene == again.t2i_prompt(GENEVAL_CATEGORIES[index % len(GENEVAL_CATEGORIES)], split).scene
            scene = item.scene
            assert scene.background == "white" and {o.size for o in scene.objects} == {"large"}
            assert tuple(sorted(o.cell for o in scene.objects)) in layouts[len(scene.objects)], item.prompt
            passed, reason = evaluate_generated_image(world.render(scene), item.metadata)
            assert passed, (item.prompt, reason)
    # the default world keeps drawing targets anywhere
    default = ShapesWorld(3)
    random_cells = {default.t2i_prompt("single_object", "train").scene.objects[0].cell for _ in range(60)}
    assert len(random_cells) > 1


def test_an_unknown_generation_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="generation_layout must be one of"):
        ShapesWorldConfig(generation_layout="centred")
    with pytest.raises(ValueError, match="canonical layout places at most 4 objects"):
        ShapesWorldConfig(generation_layout="canonical", max_objects=5)
