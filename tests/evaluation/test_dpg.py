import csv
import json

import pytest
from PIL import Image

from vargpt.evaluation.dpg import (
    DPGQuestion,
    apply_dependencies,
    grid_tiles,
    make_grid,
    read_dpg_prompts,
    read_dpg_questions,
    sample_dpg,
    score_answers,
    score_dpg_folder,
    summarize_dpg,
)
from vargpt.shapes.judges import ShapesVQA
from vargpt.shapes.render import render
from vargpt.shapes.scene import Scene, ShapeInstance, ShapesWorldConfig

from .test_geneval import CountingPipe, SingleProcess

QUESTIONS = [
    DPGQuestion(1, (), "entity - whole", "Is there a circle?"),
    DPGQuestion(2, (1,), "attribute - color", "Is the circle red?"),
    DPGQuestion(3, (), "entity - whole", "Is there a square?"),
    DPGQuestion(4, (1, 3), "relation - spatial", "Is the circle left of the square?"),
]


def test_a_child_scores_zero_when_any_parent_is_answered_no():
    raw = {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}
    assert apply_dependencies(raw, QUESTIONS) == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}
    assert apply_dependencies({1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}, QUESTIONS) == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}


def test_image_score_is_the_mean_over_tiles_of_the_mean_over_questions():
    yes = {q.proposition_id: "yes" for q in QUESTIONS}
    no_square = {1: "yes", 2: "yes", 3: "no", 4: "yes"}  # 4 is zeroed by its parent 3
    result = score_answers("7", QUESTIONS, [yes, no_square, {**yes, 2: "Yes"}, yes])  # only exact "yes" counts
    assert result.tile_scores == (1.0, 0.5, 0.75, 1.0)
    assert result.score == pytest.approx(3.25 / 4)


def test_summary_categories_follow_the_official_script():
    # categories average the last tile's answers *before* dependency zeroing, as compute_dpg_bench.py does
    result = score_answers(
        "7", QUESTIONS, [{1: "no", 2: "no", 3: "no", 4: "no"}, {1: "yes", 2: "yes", 3: "no", 4: "yes"}]
    )
    summary = summarize_dpg([result], {"7": QUESTIONS})
    assert summary["dpg_score"] == pytest.approx(100 * (0 + 0.5) / 2)
    assert summary["l1_categories"] == {"attribute": 100.0, "entity": 50.0, "relation": 100.0}
    assert summary["l2_categories"]["entity - whole"] == 50.0


def test_question_file_is_read_in_the_official_csv_format(tmp_path):
    path = tmp_path / "dpg_bench.csv"
    fields = [
        "item_id",
        "text",
        "keywords",
        "proposition_id",
        "dependency",
        "category_broad",
        "category_detailed",
        "tuple",
        "question_natural_language",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerow(["0", "t", "k", "1", "0", "entity", "whole", "entity - whole (circle)", "Is there a circle?"])
        writer.writerow(
            ["0", "t", "k", "2", "1", "attribute", "color", "attribute - color (circle, red)", "Is it red?"]
        )
        writer.writerow(["a1", "t", "k", "1", "0", "global", "", "global - (white background)", "Is it white?"])
    questions = read_dpg_questions(path)
    assert questions["0"] == [  # the first data row is kept (the official loader drops it)
        DPGQuestion(1, (), "entity - whole", "Is there a circle?"),
        DPGQuestion(2, (1,), "attribute - color", "Is it red?"),
    ]
    assert questions["a1"][0].l1_category == "global"


def test_grid_layout_matches_the_official_crops():
    images = [Image.new("RGB", (16, 16), (60 * i, 0, 0)) for i in range(4)]
    grid = make_grid(images)
    assert grid.size == (32, 32)
    # compute_dpg_bench.py crops (0,0,r,r), (r,0,2r,r), (0,r,r,2r), (r,r,2r,2r)
    for i, (x, y) in enumerate([(0, 0), (16, 0), (0, 16), (16, 16)]):
        assert grid.getpixel((x + 3, y + 3)) == (60 * i, 0, 0)
    assert [t.getpixel((0, 0)) for t in grid_tiles(grid)] == [(60 * i, 0, 0) for i in range(4)]
    with pytest.raises(ValueError, match="4 images"):
        make_grid(images[:3])


def test_packaged_prompts_and_sampler_layout(tmp_path):
    prompts = read_dpg_prompts()
    assert len(prompts) == 1065 and prompts[0]["id"] == "0"
    pipe = CountingPipe(size=16)
    rows = [prompts[0], prompts[-1]]
    sample_dpg(pipe, tmp_path, rows, model_name="m", batch_size=8, state=SingleProcess(), progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{r['id']}.png" for r in rows)
    assert pipe.calls == [([r["prompt"] for r in rows], [0, 4])]  # one call: 2 prompts x 4 images, own seeds
    with Image.open(tmp_path / f"{rows[1]['id']}.png") as grid:
        assert grid.size == (32, 32)
        assert grid.getpixel((20, 20)) == (7, 3, 0)  # its 4th image (seed 4 + 3) in the bottom right
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "dpg_bench" and manifest["images_per_prompt"] == 4


def test_dpg_resume_redoes_a_truncated_grid_only(tmp_path):
    rows = read_dpg_prompts(limit=3)
    pipe = CountingPipe(size=16)
    sample_dpg(pipe, tmp_path, rows, model_name="m", batch_size=4, state=SingleProcess(), progress=False)
    broken = tmp_path / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    pipe.calls.clear()
    sample_dpg(pipe, tmp_path, rows, model_name="m", batch_size=4, state=SingleProcess(), progress=False)
    assert pipe.calls == [([rows[1]["prompt"]], [4])]


def test_dpg_sampler_with_the_tiny_model(tmp_path):
    from vargpt.pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", device="cpu")
    rows = read_dpg_prompts(limit=2)
    sample_dpg(
        pipe,
        tmp_path,
        rows,
        model_name="tiny",
        batch_size=8,
        settings={"resolution": 16},
        state=SingleProcess(),
        progress=False,
    )
    for row in rows:
        with Image.open(tmp_path / f"{row['id']}.png") as grid:
            assert grid.size == (32, 32)


def test_score_folder_end_to_end_with_the_shapes_vqa(tmp_path):
    config = ShapesWorldConfig()
    good = render(Scene((ShapeInstance((1, 0), "circle", "red"), ShapeInstance((1, 2), "square", "blue"))), config, 48)
    no_square = render(Scene((ShapeInstance((1, 0), "circle", "red"),)), config, 48)
    make_grid([good, good, no_square, good]).save(tmp_path / "7.png")
    questions = {
        "7": [
            DPGQuestion(1, (), "entity - whole", "Is there a circle?"),
            DPGQuestion(2, (1,), "attribute - color", "Is the circle red?"),
            DPGQuestion(3, (), "entity - whole", "Is there a square?"),
            DPGQuestion(4, (1, 3), "relation - spatial", "Is the red circle left of the blue square?"),
        ]
    }
    results, summary = score_dpg_folder(
        tmp_path, questions, ShapesVQA(config), progress=False, results_path=tmp_path / "out" / "r.jsonl"
    )
    assert results[0].tile_scores == (1.0, 1.0, 0.5, 1.0)
    assert summary["dpg_score"] == pytest.approx(100 * 3.5 / 4)
    assert json.loads((tmp_path / "out" / "r.jsonl").read_text())["item_id"] == "7"
    with pytest.raises(ValueError, match="no questions"):
        score_dpg_folder(tmp_path, {"8": questions["7"]}, ShapesVQA(config), progress=False)
