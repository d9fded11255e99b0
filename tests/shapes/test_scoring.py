import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vargpt.shapes.detector import Detection, read_scene
from vargpt.shapes.language import VQAItem
from vargpt.shapes.scoring import (
    edit_check,
    edit_correct,
    evaluate_generated_image,
    evaluate_geneval,
    geneval_summary,
    normalize_answer,
    relative_position,
    scene_overlap,
    understanding_by_form,
    vqa_accuracy,
)
from vargpt.shapes.world import EDIT_KINDS, GENEVAL_CATEGORIES, ShapesWorld

SIZE = 30  # a 30 px canvas with 10 px cells keeps the synthetic geometry readable


def det(shape, colour="red", centre=(5.0, 5.0), extent=8, score=1.0):
    """A synthetic detection: an `extent`-px box around `centre`."""
    x, y = centre
    half = extent / 2
    bbox = (round(x - half), round(y - half), round(x + half), round(y + half))
    cell = (min(int(y // 10), 2), min(int(x // 10), 2))
    return Detection(shape, colour, "large", cell, bbox, centre, extent * extent, score)


def meta(tag, include, exclude=None):
    out = {"tag": tag, "include": include, "prompt": "p"}
    if exclude:
        out["exclude"] = exclude
    return out


def test_include_count_means_at_least_count():
    rule = meta("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
    assert evaluate_geneval([det("circle"), det("square", centre=(15, 5))], rule, SIZE) == (True, "")
    extra = [det("circle"), det("circle", centre=(25, 5)), det("square", centre=(15, 5)), det("triangle")]
    assert evaluate_geneval(extra, rule, SIZE)[0]
    ok, reason = evaluate_geneval([det("circle")], rule, SIZE)
    assert not ok and reason == "expected square>=1, found 0"


def test_counting_is_exact_through_its_exclude_clause():
    rule = meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    two = [det("circle", centre=(5, 5)), det("circle", centre=(15, 5))]
    assert evaluate_geneval(two, rule, SIZE)[0]
    ok, reason = evaluate_geneval([*two, det("circle", centre=(25, 5))], rule, SIZE)
    assert not ok and reason == "expected circle<3, found 3"
    assert not evaluate_geneval(two[:1], rule, SIZE)[0]
    assert evaluate_geneval([*two, det("square", centre=(25, 5))], rule, SIZE)[0]  # other classes are free


def test_colour_is_checked_on_the_most_confident_objects():
    rule = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert evaluate_geneval([det("circle", "red")], rule, SIZE)[0]
    ok, reason = evaluate_geneval([det("circle", "blue")], rule, SIZE)
    assert not ok and reason.startswith("expected red circle>=1, found 0")
    # As in GenEval, only the top-`count` objects are looked at: a better-scored blue circle hides a red one.
    mixed = [det("circle", "red", score=0.9), det("circle", "blue", centre=(15, 5), score=1.0)]
    assert not evaluate_geneval(mixed, rule, SIZE)[0]
    swapped = [det("circle", "red", score=1.0), det("circle", "blue", centre=(15, 5), score=0.9)]
    assert evaluate_geneval(swapped, rule, SIZE)[0]
    pair = meta(
        "color_attr",
        [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
    )
    assert evaluate_geneval([det("circle", "red"), det("square", "blue", centre=(15, 5))], pair, SIZE)[0]
    assert not evaluate_geneval([det("circle", "blue"), det("square", "red", centre=(15, 5))], pair, SIZE)[0]


def test_relative_position_uses_geneval_margin():
    anchor = det("circle", centre=(15.0, 15.0), extent=8)
    # Offsets are shrunk by 0.1 x (8 + 8) px = 1.6 px before the direction test (|component| > 0.5 of |offset|).
    assert relative_position(det("square", centre=(12.0, 15.0)), anchor, SIZE) == set()  # (3 - 1.6) / 3 < 0.5
    assert relative_position(det("square", centre=(11.0, 15.0)), anchor, SIZE) == {"left of"}  # 2.4 / 4 > 0.5
    assert relative_position(det("square", centre=(25.0, 15.0)), anchor, SIZE) == {"right of"}
    assert relative_position(det("square", centre=(15.0, 5.0)), anchor, SIZE) == {"above"}
    assert relative_position(det("square", centre=(15.0, 25.0)), anchor, SIZE) == {"below"}
    assert relative_position(det("square", centre=(5.0, 5.0)), anchor, SIZE) == {"left of", "above"}
    assert relative_position(det("square", centre=(15.0, 15.0)), anchor, SIZE) == set()


def test_position_clause_checks_every_subject_against_every_anchor():
    rule = meta(
        "position", [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]
    )
    circle = det("circle", centre=(25, 15))
    assert evaluate_geneval([circle, det("square", centre=(5, 15))], rule, SIZE) == (True, "")
    ok, reason = evaluate_geneval([circle, det("square", centre=(25, 5))], rule, SIZE)
    assert not ok and reason == "expected square left of target, found above target"
    ok, reason = evaluate_geneval([det("square", centre=(5, 15))], rule, SIZE)
    assert not ok and "no target for square to be left of" in reason
    with pytest.raises(ValueError, match="earlier clause"):
        evaluate_geneval([], meta("position", [{"class": "square", "count": 1, "position": ["left of", 0]}]), SIZE)
    with pytest.raises(ValueError, match="count"):
        evaluate_geneval([], meta("single_object", [{"class": "square"}]), SIZE)


def test_geneval_summary_is_the_mean_of_category_accuracies():
    results = [{"tag": "counting", "correct": c} for c in (True, True, True, False)]
    results += [{"tag": "colors", "correct": False}]
    summary = geneval_summary(results)
    assert summary["counting"] == 0.75 and summary["colors"] == 0.0
    assert summary["overall"] == pytest.approx(0.375)  # not 3/5, the per-image mean
    assert list(summary) == ["overall", "counting", "colors"]
    with pytest.raises(ValueError):
        geneval_summary([])


@pytest.mark.parametrize("image_size", [32, 64])
def test_ground_truth_scenes_pass_and_wrong_scenes_fail_their_prompts(image_size):
    world = ShapesWorld(11, image_size=image_size)
    results = []
    for category in GENEVAL_CATEGORIES:
        for split in ("train", "test"):
            for _ in range(15):
                item = world.t2i_prompt(category, split)
                ok, reason = evaluate_generated_image(world.render(item.scene), item.metadata)
                assert ok, (item, reason)
                results.append({"tag": category, "correct": ok})
                pair = world.preference_pair(category, split)
                assert not evaluate_generated_image(world.render(pair.rejected), pair.metadata)[0], pair
    assert geneval_summary(results)["overall"] == 1.0


def test_answer_normalisation():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("  YES! ") == "yes"
    assert normalize_answer("The Red") == "red"
    assert normalize_answer("top-left") == "top left"
    assert normalize_answer("3") == normalize_answer("three")
    assert normalize_answer("no") != normalize_answer("yes")


def test_vqa_accuracy_overall_and_per_type():
    items = [
        VQAItem("What colour is the circle?", "red", "colour"),
        VQAItem("How many squares are there?", "2", "count"),
        VQAItem("How many circles are there?", "0", "count"),
        {"answer": "yes", "qtype": "existence"},
    ]
    scores = vqa_accuracy(["Red.", "two", "1", "no"], items)
    assert scores == {"accuracy": 0.5, "colour": 1.0, "count": 0.5, "existence": 0.0}
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy(["red"], items)


def test_understanding_by_form_counts_each_type_and_form_apart_and_skips_formless_items():
    items = [
        {"answer": "yes", "qtype": "existence", "form": "pair"},
        {"answer": "no", "qtype": "existence", "form": "pair"},
        {"answer": "yes", "qtype": "existence", "form": "shape"},
        {"answer": "left", "qtype": "position", "form": "column"},
        {"answer": "red", "qtype": "colour"},  # an old row without a form
    ]
    scores = understanding_by_form(["yes", "yes", "Yes.", "right", "red"], items)
    assert scores == {
        "existence/pair": {"accuracy": 0.5, "n": 2},
        "existence/shape": {"accuracy": 1.0, "n": 1},
        "position/column": {"accuracy": 0.0, "n": 1},
    }
    assert understanding_by_form(["red"], items[-1:]) == {}
    as_items = [VQAItem("Is there a red circle?", "yes", "existence", form="pair"), VQAItem("Is it red?", "no", "x")]
    assert understanding_by_form(["yes", "no"], as_items) == {"existence/pair": {"accuracy": 1.0, "n": 1}}
    with pytest.raises(ValueError, match="predictions"):
        understanding_by_form(["yes"], items)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_checker_accepts_the_target_and_rejects_source_and_wrong_edits(kind):
    world = ShapesWorld(2)
    for _ in range(10):
        triple = world.edit_triple("validation", kind)
        assert edit_correct(world.render(triple.target), triple.target, triple.source)
        blurred = world.render(triple.target).filter(ImageFilter.GaussianBlur(0.5))
        assert edit_correct(blurred, triple.target, triple.source)
        ok, reason = edit_check(world.render(triple.source), triple.target, triple.source)
        assert not ok and reason.startswith("unchanged")
        # A different edit of the same kind from the same source is wrong.
        other = world.apply_edit(triple.source, kind)
        if other is not None and other[1] != triple.target:
            assert not edit_correct(world.render(other[1]), triple.target, triple.source)


def test_edit_checker_rejects_collateral_changes():
    world = ShapesWorld(3)
    triple = world.edit_triple("train", "recolour")
    target = triple.target
    # Right recolour, but the background changed too.
    other_background = next(b for b in world.config.backgrounds if b != target.background)
    ok, reason = edit_check(
        world.render(dataclasses.replace(target, background=other_background)), target, triple.source
    )
    assert not ok and "background" in reason
    with pytest.raises(ValueError, match="no edit"):
        edit_check(world.render(target), target, target)


def test_edit_checker_rejects_a_noisy_image_with_an_extra_object():
    world = ShapesWorld(4)
    triple = world.edit_triple("train", "remove")
    pixels = np.asarray(world.render(triple.source), dtype=np.float32) / 255  # the object was not removed
    pixels += np.random.default_rng(0).normal(0, 0.05, pixels.shape)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
    ok, reason = edit_check(image, triple.target, triple.source)
    assert not ok and reason.startswith("unchanged")


def test_scene_overlap_counts_objects_as_a_multiset_and_the_background_apart():
    world = ShapesWorld(5)
    triple = world.edit_triple("validation", "add")  # target = source + one object
    target = triple.target
    assert scene_overlap(read_scene(world.render(target)), target) == {
        "object_recall": 1.0,
        "object_precision": 1.0,
        "background": 1.0,
    }
    n = len(target.objects)
    partial = scene_overlap(read_scene(world.render(triple.source)), target)
    assert partial == {"object_recall": (n - 1) / n, "object_precision": 1.0, "background": 1.0}
    other_background = next(b for b in world.config.backgrounds if b != target.background)
    moved = dataclasses.replace(target, background=other_background)
    assert scene_overlap(read_scene(world.render(moved)), target)["background"] == 0.0
    blank = Image.new("RGB", world.render(target).size, "white")
    assert scene_overlap(read_scene(blank), target)["object_precision"] == 0.0  # nothing drawn, scene not empty
