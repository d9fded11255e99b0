"""Reading and validating LLaMA-Factory "sharegpt" training data (vargpt.data.formats)."""

import json

import pytest
from PIL import Image

from vargpt.data.formats import (
    DataValidationError,
    ValidationReport,
    load_preference_dataset,
    load_sft_dataset,
)


@pytest.fixture
def data_dir(tmp_path):
    """A data folder with three tiny images, one of them in a sub-folder as the original demos keep them."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "green.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


# Synthetic rows in the shapes of the original demo files (VARGPT-family-training/data/*.json).
TRAIN_VARGPT_DEMO = [
    {
        "messages": [
            {"content": "I need a designed image of an old building with two windows.", "role": "user"},
            {
                "content": "I have designed a drawing of an old building with two windows.<image_gen>",
                "role": "assistant",
            },
        ],
        "images": ["imgs/red.png"],
    }
]
MLLM_DEMO = [
    {
        "messages": [
            {"content": "<image>Who are they?", "role": "user"},
            {"content": "Two players.", "role": "assistant"},
            {"content": "What are they doing?", "role": "user"},
            {"content": "Celebrating.", "role": "assistant"},
        ],
        "images": ["green.png"],
    }
]
EDIT_DEMO = [
    {
        "messages": [
            {"content": "Transform this image <image> to match the style of a poster", "role": "user"},
            {"content": "The output image is: <image_gen>", "role": "assistant"},
        ],
        "images": ["green.png", "blue.png"],
        "id": 4765,
    }
]
DPO_DEMO = [
    {
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Name a colour."},
        ],
        "chosen": {"from": "gpt", "value": "Red."},
        "rejected": {"from": "gpt", "value": "I cannot."},
    },
    {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Draw a cat."},
        ],
        "chosen": {"from": "gpt", "value": "<image_gen>"},
        "rejected": {"from": "gpt", "value": "<image_gen>"},
        "images": ["green.png", "blue.png"],
    },
]


def test_original_sft_demo_shapes_load_with_images_split_by_kind(data_dir):
    path = data_dir / "demo.json"
    path.write_text(json.dumps(TRAIN_VARGPT_DEMO + MLLM_DEMO + EDIT_DEMO, indent=4))
    dataset, report = load_sft_dataset(path, strict=True)
    assert (report.total_rows, report.kept_rows, report.skipped) == (3, 3, {})
    assert len(dataset) == 3
    generation, understanding, edit = dataset[0], dataset[1], dataset[2]
    assert generation["images"] == [] and generation["gen_images"] == [str(data_dir / "imgs" / "red.png")]
    assert understanding["images"] == [str(data_dir / "green.png")] and understanding["gen_images"] == []
    assert [m["role"] for m in understanding["messages"]] == ["user", "assistant", "user", "assistant"]
    # Editing: the understanding input comes first in `images`, then the target, in placeholder order.
    assert edit["images"] == [str(data_dir / "green.png")]
    assert edit["gen_images"] == [str(data_dir / "blue.png")]
    assert [(r["source_file"], r["source_row"]) for r in dataset] == [(str(path), i) for i in range(3)]


def test_original_dpo_demo_shape_loads(data_dir):
    path = data_dir / "dpo.json"
    path.write_text(json.dumps(DPO_DEMO, indent=2))
    dataset, report = load_preference_dataset(path, strict=True)
    assert report.kept_rows == 2
    text_row, image_row = dataset[0], dataset[1]
    assert text_row["prompt"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    assert (text_row["chosen"], text_row["rejected"]) == ("Red.", "I cannot.")
    assert text_row["images"] == text_row["chosen_gen_images"] == text_row["rejected_gen_images"] == []
    assert [m["role"] for m in image_row["prompt"]] == ["user", "assistant", "user"]
    assert image_row["chosen_gen_images"] == [str(data_dir / "green.png")]
    assert image_row["rejected_gen_images"] == [str(data_dir / "blue.png")]


def test_preference_images_are_prompt_then_chosen_then_rejected(data_dir):
    row = {
        "conversations": [user("<image>Make it blue")],
        "chosen": [assistant("Done: <image_gen>")],  # a one-message list
        "rejected": "Done: <image_gen>",  # a bare string
        "images": ["imgs/red.png", "green.png", "blue.png"],
    }
    dataset, _ = load_preference_dataset(write_jsonl(data_dir / "p.jsonl", [row]), strict=True)
    assert dataset[0]["images"] == [str(data_dir / "imgs" / "red.png")]
    assert dataset[0]["chosen_gen_images"] == [str(data_dir / "green.png")]
    assert dataset[0]["rejected_gen_images"] == [str(data_dir / "blue.png")]


def test_jsonl_several_files_system_key_absolute_paths_and_image_root(data_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    first = write_jsonl(
        data_dir / "a.jsonl",
        [{"messages": [user("hi"), assistant("<image_gen>")], "images": str(data_dir / "blue.png"), "system": "S"}],
    )
    second = write_jsonl(
        other / "b.jsonl", ["", {"messages": [user("<image>?"), assistant("ok")], "images": ["green.png"]}]
    )
    dataset, report = load_sft_dataset([first, second], image_root=data_dir)
    assert report.kept_rows == 2 and report.files == [str(first), str(second)]
    assert dataset[0]["messages"][0] == {"role": "system", "content": "S"}
    assert dataset[0]["gen_images"] == [str(data_dir / "blue.png")]
    assert dataset[1]["images"] == [str(data_dir / "green.png")]  # resolved against image_root, not other/
    assert dataset[1]["source_row"] == 1  # JSONL rows are indexed by line, blank lines included
    # Without image_root the second file's relative path is looked up beside it, where it does not exist.
    _, report = load_sft_dataset(second)
    assert report.skipped == {"missing_image": 1}


GOOD_SFT = {
    "messages": [user("<image>What is it?"), assistant("A square: <image_gen>")],
    "images": ["green.png", "blue.png"],
}
BAD_SFT_ROWS = [
    ("{not json", "malformed_json"),
    ("[1, 2]", "not_an_object"),
    ({"images": []}, "missing_key"),
    ({"messages": [{"role": "user"}, assistant("x")]}, "missing_key"),
    ({"messages": "hello"}, "bad_type"),
    ({"messages": [user(["a", "list"]), assistant("x")]}, "bad_type"),
    ({"messages": [user("x"), assistant("y")], "images": [3]}, "bad_type"),
    ({"messages": [{"role": "robot", "content": "x"}, assistant("y")]}, "bad_role"),
    ({"messages": [assistant("x"), user("y")]}, "bad_turn_order"),
    ({"messages": [user("x"), user("y")]}, "bad_turn_order"),
    ({"messages": [user("x"), assistant("y"), user("z")]}, "bad_turn_order"),
    ({"messages": [user("x"), {"role": "system", "content": "late"}]}, "bad_turn_order"),
    ({"messages": []}, "bad_turn_order"),
    ({"messages": [user("x"), assistant("   ")]}, "empty_content"),
    ({"messages": [user("x<|im_end|>"), assistant("y")]}, "reserved_token_in_content"),
    (
        {"messages": [user("draw <image_gen>"), assistant("ok")], "images": ["blue.png"]},
        "image_gen_outside_assistant_turn",
    ),
    ({"messages": [user("x"), assistant("see <image>")], "images": ["blue.png"]}, "image_outside_user_turn"),
    ({"messages": [user("<image> and <image>"), assistant("y")], "images": ["blue.png"]}, "image_count_mismatch"),
    ({"messages": [user("x"), assistant("<image_gen>")]}, "image_count_mismatch"),
    ({"messages": [user("x"), assistant("<image_gen>")], "images": ["nope.png"]}, "missing_image"),
    ({"messages": [user("x"), assistant("y")], "audios": ["a.wav"]}, "unsupported_media"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_SFT_ROWS, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD_SFT_ROWS)])
def test_each_bad_sft_row_is_counted_with_its_reason_and_strict_mode_raises(data_dir, row, reason):
    path = write_jsonl(data_dir / "rows.jsonl", [GOOD_SFT, row, GOOD_SFT])
    dataset, report = load_sft_dataset(path)
    assert len(dataset) == 2 and [r["source_row"] for r in dataset] == [0, 2]
    assert (report.total_rows, report.kept_rows, report.skipped) == (3, 2, {reason: 1})
    assert [(e.source_file, e.source_row) for e in report.examples[reason]] == [(str(path), 1)]
    with pytest.raises(DataValidationError, match=f"row 1: {reason}") as raised:
        load_sft_dataset(path, strict=True)
    assert (raised.value.source_row, raised.value.reason) == (1, reason)


BAD_PREFERENCE_ROWS = [
    ({"conversations": [user("x")], "chosen": assistant("a")}, "missing_key"),
    ({"chosen": assistant("a"), "rejected": assistant("b")}, "missing_key"),
    ({"conversations": [user("x")], "chosen": user("a"), "rejected": assistant("b")}, "bad_role"),
    ({"conversations": [user("x")], "chosen": [assistant("a"), assistant("b")], "rejected": "c"}, "bad_type"),
    ({"conversations": [user("x"), assistant("y")], "chosen": "a", "rejected": "b"}, "bad_turn_order"),
    ({"conversations": [user("x")], "chosen": "", "rejected": "b"}, "empty_content"),
    (
        {"conversations": [user("x"), assistant("<image_gen>"), user("again")], "chosen": "a", "rejected": "b"},
        "image_gen_in_preference_prompt",
    ),
    (
        {"conversations": [user("x")], "chosen": "<image_gen>", "rejected": "<image_gen>", "images": ["blue.png"]},
        "image_count_mismatch",
    ),
    (
        {"conversations": [user("x")], "chosen": "<image>", "rejected": "b", "images": ["blue.png"]},
        "image_outside_user_turn",
    ),
]


@pytest.mark.parametrize(("row", "reason"), BAD_PREFERENCE_ROWS, ids=[r for _, r in BAD_PREFERENCE_ROWS])
def test_each_bad_preference_row_is_counted_and_strict_mode_raises(data_dir, row, reason):
    good = {
        "conversations": [user("x")],
        "chosen": "<image_gen>",
        "rejected": "<image_gen>",
        "images": ["green.png", "blue.png"],
    }
    path = write_jsonl(data_dir / "pref.jsonl", [row, good])
    dataset, report = load_preference_dataset(path)
    assert len(dataset) == 1 and report.skipped == {reason: 1}
    with pytest.raises(DataValidationError, match=f"row 0: {reason}"):
        load_preference_dataset(path, strict=True)


def test_report_counts_several_reasons_and_renders_for_logs(data_dir):
    bad_image = {"messages": [user("x"), assistant("<image_gen>")], "images": ["gone.png"]}
    rows = [bad_image] * 7 + ["oops", GOOD_SFT]
    dataset, report = load_sft_dataset(write_jsonl(data_dir / "r.jsonl", rows))
    assert len(dataset) == 1
    summary = report.to_dict()
    assert summary["total_rows"] == 9 and summary["kept_rows"] == 1 and summary["skipped_rows"] == 8
    assert summary["skipped"]["missing_image"]["count"] == 7
    assert [e["source_row"] for e in summary["skipped"]["missing_image"]["examples"]] == [0, 1, 2, 3, 4]
    assert summary["skipped"]["malformed_json"]["count"] == 1
    text = str(report)
    assert "kept 1 of 9 rows" in text and "missing_image: 7" in text and "gone.png" in text
    assert isinstance(report, ValidationReport)


def test_unparseable_json_array_file_and_missing_files_are_errors(data_dir):
    broken = data_dir / "broken.json"
    broken.write_text('[{"messages": []},\n  {oops}]')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        load_sft_dataset(broken)
    with pytest.raises(FileNotFoundError, match=r"absent\.jsonl"):
        load_sft_dataset(data_dir / "absent.jsonl")
    with pytest.raises(ValueError, match="non-empty list"):
        load_sft_dataset([])


def test_empty_file_gives_an_empty_dataset_with_the_schema(data_dir):
    path = data_dir / "empty.jsonl"
    path.write_text("\n")
    dataset, report = load_sft_dataset(path)
    assert len(dataset) == 0 and report.total_rows == 0
    assert set(dataset.column_names) == {"messages", "images", "gen_images", "videos", "source_file", "source_row"}


def test_a_row_with_bytes_that_are_not_utf8_is_one_bad_row(data_dir):
    path = data_dir / "latin1.jsonl"
    good = json.dumps({"messages": [user("a"), assistant("b")]}).encode()
    bad = b'{"messages": [{"role": "user", "content": "a\xff"}, {"role": "assistant", "content": "b"}]}'
    path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    dataset, report = load_sft_dataset(path)
    assert len(dataset) == 2 and report.skipped == {"not_utf8": 1}
    assert "byte 0xff" in report.examples["not_utf8"][0].detail
    with pytest.raises(DataValidationError, match=r"latin1\.jsonl row 1: not_utf8"):
        load_sft_dataset(path, strict=True)


def test_bytes_that_are_not_utf8_in_a_json_array_file_name_the_file_and_line(data_dir):
    path = data_dir / "latin1.json"
    path.write_bytes(b'[\n{"messages": [{"role": "user", "content": "a\xff"}]}\n]')
    with pytest.raises(ValueError, match=r"latin1\.json line 2 is not UTF-8"):
        load_sft_dataset(path)


def test_a_utf8_byte_order_mark_is_accepted(data_dir):
    row = json.dumps({"messages": [user("a"), assistant("b")]})
    lines, array = data_dir / "bom.jsonl", data_dir / "bom.json"
    lines.write_bytes(b"\xef\xbb\xbf" + (row + "\n" + row + "\n").encode())
    array.write_bytes(b"\xef\xbb\xbf" + f"[{row}]".encode())
    for path, rows in ((lines, 2), (array, 1)):
        dataset, report = load_sft_dataset(path, strict=True)
        assert len(dataset) == rows and report.skipped == {}


def test_an_image_that_exists_but_does_not_decode_is_one_bad_row(data_dir):
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = {"messages": [user("x"), assistant("<image_gen>")], "images": ["broken.png"]}
    path = write_jsonl(data_dir / "rows.jsonl", [GOOD_SFT, bad, bad, GOOD_SFT])
    dataset, report = load_sft_dataset(path)
    assert len(dataset) == 2 and report.skipped == {"unreadable_image": 2}
    assert "broken.png" in report.examples["unreadable_image"][0].detail
    with pytest.raises(DataValidationError, match=r"row 1: unreadable_image"):
        load_sft_dataset(path, strict=True)


# -- videos ------------------------------------------------------------------------------------------------------

VIDEO_ROWS = [
    ({"messages": [user("x"), assistant("y")], "videos": ["clip.mkv"]}, "video_count_mismatch"),
    ({"messages": [user("<video> and <video>"), assistant("y")], "videos": ["clip.mkv"]}, "video_count_mismatch"),
    ({"messages": [user("x"), assistant("see <video>")], "videos": ["clip.mkv"]}, "video_outside_user_turn"),
    ({"messages": [user("<video>x"), assistant("y")], "videos": ["gone.mp4"]}, "missing_video"),
    ({"messages": [user("<video>x"), assistant("y")], "videos": ["green.png"]}, "unreadable_video"),
    ({"messages": [user("<video>x"), assistant("y")], "videos": [7]}, "bad_type"),
    ({"messages": [user("x"), assistant("y")], "audios": ["a.wav"]}, "unsupported_media"),
]


@pytest.mark.parametrize(("row", "reason"), VIDEO_ROWS, ids=[f"{i}-{r}" for i, (_, r) in enumerate(VIDEO_ROWS)])
def test_video_rows_load_and_bad_ones_are_counted_like_bad_image_rows(data_dir, row, reason):
    from tests.clips import moving_square, write_clip

    write_clip(data_dir / "clip.mkv", moving_square(4))
    good = {"messages": [user("<image><video>What moves?"), assistant("A square.")], "images": ["green.png"]}
    good["videos"] = "clip.mkv"  # a single path as a string, as for images
    path = write_jsonl(data_dir / "videos.jsonl", [good, row])
    dataset, report = load_sft_dataset(path)
    assert dataset[0]["videos"] == [str(data_dir / "clip.mkv")] and dataset[0]["images"] == [
        str(data_dir / "green.png")
    ]
    assert (report.kept_rows, report.skipped) == (1, {reason: 1})
    with pytest.raises(DataValidationError, match=f"row 1: {reason}"):
        load_sft_dataset(path, strict=True)


def test_preference_prompts_may_hold_videos(data_dir):
    from tests.clips import moving_square, write_clip

    write_clip(data_dir / "clip.mkv", moving_square(4))
    row = {"conversations": [user("<video>Draw it.")], "chosen": "<image_gen>", "rejected": "<image_gen>"}
    row |= {"images": ["green.png", "blue.png"], "videos": ["clip.mkv"]}
    dataset, _ = load_preference_dataset(write_jsonl(data_dir / "pref.jsonl", [row]), strict=True)
    assert dataset[0]["videos"] == [str(data_dir / "clip.mkv")] and dataset[0]["images"] == []
    no_decode, _ = load_sft_dataset(
        write_jsonl(
            data_dir / "sft.jsonl", [{"messages": [user("<video>x"), assistant("y")], "videos": ["green.png"]}]
        ),
        decode_images=False,
    )
    assert len(no_decode) == 1  # existence only: the picture posing as a video is found by the collator
