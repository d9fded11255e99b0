import json
import re
from contextlib import contextmanager

import pytest
from PIL import Image

from vargpt.evaluation.geneval import (
    NO_FILTER,
    OFFICIAL_FILTER,
    DetectionFilter,
    ObjectDetection,
    read_geneval_metadata,
    sample_geneval,
    score_detections,
    score_geneval_folder,
    summarize_geneval,
)
from vargpt.evaluation.sampling import MANIFEST_NAME
from vargpt.shapes.judges import ShapesDetector
from vargpt.shapes.render import render
from vargpt.shapes.scene import Scene, ShapeInstance, ShapesWorldConfig

SIZE = (300, 300)


class SingleProcess:
    """The part of accelerate's PartialState the sampler uses, for one rank of `world` processes."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.process_index, self.num_processes = rank, world
        self.is_main_process = self.is_local_main_process = rank == 0

    @contextmanager
    def split_between_processes(self, inputs, apply_padding=False):
        share = -(-len(inputs) // self.num_processes)
        yield inputs[self.process_index * share : (self.process_index + 1) * share]

    def wait_for_everyone(self):
        pass


class CountingPipe:
    """Stands in for VARGPTPipeline: solid images, and a record of every prompt it drew."""

    def __init__(self, size: int = 32) -> None:
        from vargpt.generation.config import ImageGenerationConfig

        self.image_config = ImageGenerationConfig()
        self.model = type("M", (), {"config": type("C", (), {"image_resolution": size})()})()
        self.size = size
        self.calls: list[tuple[list[str], int]] = []

    def generate(self, prompts, num_images=1, seed=None, **settings):
        self.calls.append((list(prompts), seed))
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        return [
            Image.new("RGB", (self.size, self.size), ((s + j) % 256, j, 0)) for s in seeds for j in range(num_images)
        ]


def box(x, y, side=40):
    return (x - side / 2, y - side / 2, x + side / 2, y + side / 2)


def obj(label, colour="red", x=150, y=150, score=1.0):
    return ObjectDetection(label, colour, box(x, y), score)


def meta(tag, include, exclude=None):
    out = {"tag": tag, "include": include, "prompt": "p"}
    if exclude:
        out["exclude"] = exclude
    return out


# ---------------------------------------------------------------- rules through the pluggable interface


def test_counting_needs_the_exact_count_through_the_exclude_clause():
    m = meta("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    two = [obj("cup", x=50), obj("cup", x=250)]
    assert score_detections(two, m, SIZE, NO_FILTER)[0]
    assert not score_detections([obj("cup")], m, SIZE, NO_FILTER)[0]
    ok, reason, _ = score_detections([*two, obj("cup", x=150, y=250)], m, SIZE, NO_FILTER)
    assert not ok and "expected cup<3, found 3" in reason


def test_counting_threshold_drops_unconfident_detections_only_for_counting_prompts():
    dets = [obj("cup", x=50, score=0.95), obj("cup", x=250, score=0.5)]
    counting = meta("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    two_object = meta("two_object", [{"class": "cup", "count": 2}])
    assert not score_detections(dets, counting, SIZE, OFFICIAL_FILTER)[0]  # 0.5 < 0.9
    assert score_detections(dets, two_object, SIZE, OFFICIAL_FILTER)[0]  # 0.5 > 0.3
    assert not score_detections([obj("cup", score=0.2)], meta("single_object", [{"class": "cup", "count": 1}]), SIZE)[0]


def test_exclude_clause_fails_an_image_with_a_forbidden_object():
    m = meta("single_object", [{"class": "dog", "count": 1}], [{"class": "cat", "count": 1}])
    assert score_detections([obj("dog")], m, SIZE, NO_FILTER)[0]
    assert not score_detections([obj("dog"), obj("cat", x=20)], m, SIZE, NO_FILTER)[0]


def test_colour_is_checked_on_the_most_confident_objects():
    m = meta("colors", [{"class": "car", "count": 1, "color": "blue"}])
    assert score_detections([obj("car", "blue")], m, SIZE, NO_FILTER)[0]
    # the red car is more confident, so it is the one whose colour counts
    ok, reason, _ = score_detections([obj("car", "blue", score=0.5), obj("car", "red", score=0.9)], m, SIZE, NO_FILTER)
    assert not ok and "expected blue car>=1" in reason


def test_position_relation_and_its_threshold():
    m = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    assert score_detections([obj("dog", x=250), obj("cat", x=50)], m, SIZE, NO_FILTER)[0]
    assert not score_detections([obj("dog", x=50), obj("cat", x=250)], m, SIZE, NO_FILTER)[0]
    # centres 20 px apart with 40 px boxes: the 0.1 x (40 + 40) shrink leaves 12 px, still left; at 12 px apart
    # the shrink (8 px) keeps 4 px but diagonal offsets need |dx| > 0.5 |offset|
    assert score_detections([obj("dog", x=170), obj("cat", x=150)], m, SIZE, NO_FILTER)[0]
    assert not score_detections([obj("dog", x=160, y=150), obj("cat", x=150, y=170)], m, SIZE, NO_FILTER)[0]


def test_position_without_its_target_fails():
    m = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["above", 0]}])
    ok, reason, _ = score_detections([obj("cat")], m, SIZE, NO_FILTER)
    assert not ok and "no target for cat" in reason


def test_filter_caps_objects_per_class_and_applies_nms():
    dets = [obj("cup", x=50 + i, score=1 - i / 100) for i in range(20)]
    assert len(DetectionFilter(threshold=0, max_objects=16).select(dets, "two_object")) == 16
    # 41 px wide boxes (inclusive pixels) 1 px apart: IoU < 0.5 from 14 px on, so #0 and #14 survive
    kept = DetectionFilter(threshold=0, max_overlap=0.5).select(dets, "two_object")
    assert [d.bbox[0] for d in kept] == [30.0, 44.0]


def test_summary_is_the_mean_over_tasks_like_the_official_script():
    results = [
        {"tag": "single_object", "correct": True, "metadata": "a"},
        {"tag": "single_object", "correct": False, "metadata": "a"},
        {"tag": "counting", "correct": False, "metadata": "b"},
        {"tag": "counting", "correct": False, "metadata": "b"},
        {"tag": "counting", "correct": True, "metadata": "c"},
        {"tag": "counting", "correct": True, "metadata": "c"},
    ]
    summary = summarize_geneval(results)
    assert summary["overall"] == pytest.approx((0.5 + 0.5) / 2)
    assert summary["tasks"]["counting"] == {"score": 0.5, "correct": 2, "total": 4}
    assert summary["total_prompts"] == 3
    assert summary["correct_prompts"] == pytest.approx(2 / 3)
    assert summary["correct_images"] == pytest.approx(0.5)


# ---------------------------------------------------------------- layout and resumability


def test_packaged_metadata_is_the_official_file():
    rows = read_geneval_metadata()
    assert len(rows) == 553
    assert {r["tag"] for r in rows} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert read_geneval_metadata(limit=3) == rows[:3]


def test_layout_is_what_the_official_evaluator_reads(tmp_path):
    from vargpt.pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", device="cpu")
    rows = read_geneval_metadata(limit=3)
    sample_geneval(
        pipe,
        tmp_path,
        rows,
        model_name="tiny",
        images_per_prompt=2,
        batch_size=4,
        state=SingleProcess(),
        progress=False,
    )
    # the official main(): numeric sub-folders, metadata.jsonl read with json.load, samples matching \d+\.png
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert folders == ["00000", "00001", "00002"]
    for i, name in enumerate(folders):
        with open(tmp_path / name / "metadata.jsonl") as handle:
            assert json.load(handle) == rows[i]
        samples = sorted(p.name for p in (tmp_path / name / "samples").iterdir() if re.match(r"\d+\.png", p.name))
        assert samples == ["0000.png", "0001.png"]
        assert sorted(p.name for p in (tmp_path / name / "samples").iterdir()) == samples  # no temporary files
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["settings"]["resolution"] == 32 and manifest["settings"]["cfg_scale"] == 3.0
    assert set(manifest["prompts"]) == set(folders)
    # each prompt has its own seeds (seed + index x images per prompt), whatever call it shared
    assert [manifest["prompts"][k]["seed"] for k in folders] == [0, 2, 4]


def test_resume_skips_complete_prompts_and_redoes_partial_ones(tmp_path):
    rows = read_geneval_metadata(limit=3)
    pipe = CountingPipe()
    sample_geneval(pipe, tmp_path, rows, model_name="m", batch_size=4, state=SingleProcess(), progress=False)
    assert len(pipe.calls) == 3
    # interruption: prompt 1 lost a sample, prompt 2's last sample is a half-written file
    (tmp_path / "00001" / "samples" / "0003.png").unlink()
    data = (tmp_path / "00002" / "samples" / "0002.png").read_bytes()
    (tmp_path / "00002" / "samples" / "0002.png").write_bytes(data[: len(data) // 2])
    untouched = (tmp_path / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    pipe.calls.clear()
    sample_geneval(pipe, tmp_path, rows, model_name="m", batch_size=8, state=SingleProcess(), progress=False)
    assert pipe.calls == [([rows[1]["prompt"], rows[2]["prompt"]], [4, 8])]  # the same seeds as the first run
    assert (tmp_path / "00000" / "samples" / "0000.png").stat().st_mtime_ns == untouched
    with Image.open(tmp_path / "00002" / "samples" / "0002.png") as image:
        image.load()
    pipe.calls.clear()
    sample_geneval(pipe, tmp_path, rows, model_name="m", state=SingleProcess(), progress=False)
    assert pipe.calls == []


def test_resume_with_other_settings_is_refused(tmp_path):
    rows = read_geneval_metadata(limit=1)
    sample_geneval(CountingPipe(), tmp_path, rows, model_name="m", state=SingleProcess(), progress=False)
    with pytest.raises(ValueError, match="written with settings"):
        sample_geneval(
            CountingPipe(),
            tmp_path,
            rows,
            model_name="m",
            settings={"cfg_scale": 1.5},
            state=SingleProcess(),
            progress=False,
        )


def test_processes_write_their_own_prompts_and_the_main_one_merges(tmp_path):
    rows = read_geneval_metadata(limit=4)
    pipes = [CountingPipe(), CountingPipe()]
    for rank in (1, 0):  # rank 0 merges last, as it would after wait_for_everyone
        sample_geneval(pipes[rank], tmp_path, rows, model_name="m", state=SingleProcess(rank, 2), progress=False)
    assert [p for call in pipes[0].calls for p in call[0]] == [r["prompt"] for r in rows[:2]]
    assert [p for call in pipes[1].calls for p in call[0]] == [r["prompt"] for r in rows[2:]]
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert {k: v["rank"] for k, v in manifest["prompts"].items()} == {"00000": 0, "00001": 0, "00002": 1, "00003": 1}


# ---------------------------------------------------------------- scoring a folder with the shapes detector


def _scene_folder(tmp_path, scenes_and_meta):
    config = ShapesWorldConfig()
    for i, (scenes, metadata) in enumerate(scenes_and_meta):
        samples = tmp_path / f"{i:05d}" / "samples"
        samples.mkdir(parents=True)
        (tmp_path / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(metadata))
        for n, scene in enumerate(scenes):
            render(scene, config, 48).save(samples / f"{n:04d}.png")


def test_score_folder_with_the_shapes_detector(tmp_path):
    red_circle = ShapeInstance((1, 1), "circle", "red")
    blue_square_left = ShapeInstance((1, 0), "square", "blue")
    position = meta(
        "position", [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]
    )
    colour = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    _scene_folder(
        tmp_path,
        [
            ([Scene((red_circle, blue_square_left)), Scene((red_circle,))], position),
            ([Scene((red_circle,)), Scene((ShapeInstance((0, 0), "circle", "blue"),))], colour),
        ],
    )
    results, summary = score_geneval_folder(
        tmp_path, ShapesDetector(), detection_filter=NO_FILTER, progress=False, results_path=tmp_path / "results.jsonl"
    )
    assert [r["correct"] for r in results] == [True, False, True, False]
    assert summary["tasks"]["position"]["score"] == 0.5 and summary["overall"] == 0.5
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
