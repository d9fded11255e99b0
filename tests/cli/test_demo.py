"""`vargpt demo` marks every output right or wrong with the shapes world's checks and shows measured scores."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from vargpt.cli.demo import DEMO_PROMPTS, demo_scene, mark_answer, mark_edit, mark_generation, run_demo
from vargpt.shapes.render import render
from vargpt.shapes.scene import Scene, ShapeInstance, ShapesWorldConfig

# a scene that shows what each demo prompt asks for
FAITHFUL = {
    "a photo of a red circle": [((1, 1), "circle", "red")],
    "a blue square above a yellow triangle": [((0, 1), "square", "blue"), ((2, 1), "triangle", "yellow")],
    "draw three green triangles": [((1, c), "triangle", "green") for c in range(3)],
}


def _picture(objects) -> Image.Image:
    scene = Scene(tuple(ShapeInstance(cell, shape, colour, "large") for cell, shape, colour in objects))
    return render(scene, ShapesWorldConfig(), 32)


@pytest.mark.parametrize("prompt", DEMO_PROMPTS)
def test_a_picture_of_the_prompt_is_right_and_another_is_wrong(prompt):
    assert mark_generation(_picture(FAITHFUL[prompt]), prompt).right
    other = next(p for p in DEMO_PROMPTS if p != prompt)
    wrong = mark_generation(_picture(FAITHFUL[other]), prompt)
    assert not wrong.right and "expected" in wrong.reason and "\n" not in wrong.reason


def test_answers_and_edits_are_checked_against_the_scene():
    assert mark_answer("Red.").right and not mark_answer("blue").right
    assert mark_edit(_picture([((1, 1), "circle", "blue")])).right
    unchanged = mark_edit(demo_scene())
    assert not unchanged.right and "unchanged" in unchanged.reason


def test_the_report_marks_every_output_and_shows_the_cards_scores(tmp_path):
    page = run_demo("vargpt-shapes-tiny", tmp_path).read_text()
    right, wrong = page.count("class='right'"), page.count("class='wrong'")
    assert right + wrong == len(DEMO_PROMPTS) * 4 + 2  # every drawn picture, the answer and the edit
    assert re.search(rf"\b{right} of {right + wrong} outputs right", page)
    assert "id='scores'" in page and "<b>0.776</b>" in page and "docs/shapes-tiny-results.md" in page
    assert page.count("data:image/png;base64,") == len(DEMO_PROMPTS) * 4 + 1 + 2


def test_a_model_without_a_card_shows_marks_but_no_scores(tmp_path):
    page = run_demo("tiny", tmp_path).read_text()
    assert "id='scores'" not in page and "outputs right" in page
