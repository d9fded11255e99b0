"""A stage's data sources: files and `datasets` datasets, in memory or streamed, mixed by repeat or weight."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from vargpt.data.formats import DataValidationError
from vargpt.data.sources import MixtureStream, build_stage_data, check_mixture, parse_source, plain_files
from vargpt.image_io import load_image


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _gen_row(prompt: str, image: str) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "<image_gen>"}],
        "images": [image],
    }


def _write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """a/rows.jsonl: 4 good rows, 1 malformed line, 1 row whose image is missing; b/rows.jsonl: 2 good rows."""
    for i in range(4):
        _png(tmp_path / "a" / "img" / f"{i}.png", (40 * i, 0, 0))
    good_a = [_gen_row(f"a prompt {i}", f"img/{i}.png") for i in range(4)]
    _write_jsonl(tmp_path / "a" / "rows.jsonl", [*good_a, "{not json", _gen_row("lost", "img/missing.png")])
    for i in range(2):
        _png(tmp_path / "b" / "img" / f"{i}.png", (0, 80 * i, 0))
    _write_jsonl(tmp_path / "b" / "rows.jsonl", [_gen_row(f"b prompt {i}", f"img/{i}.png") for i in range(2)])
    return tmp_path


def _prompt(row: dict) -> str:
    return row["messages"][0]["content"]


def test_files_in_memory_skip_bad_rows_with_counts_and_repeat(root):
    sources = [parse_source({"path": "a/rows.jsonl"}, "a"), parse_source({"path": "b/rows.jsonl", "repeat": 3}, "b")]
    data = build_stage_data(sources, "sft", root)
    assert not data.streamed
    assert len(data.dataset) == 4 + 3 * 2
    assert data.report.kept_rows == 6 and data.report.skipped == {"malformed_json": 1, "missing_image": 1}
    prompts = Counter(_prompt(data.dataset[i]) for i in range(len(data.dataset)))
    assert prompts["b prompt 0"] == 3 and prompts["a prompt 0"] == 1
    # image paths are resolved against each file's own folder
    assert data.dataset[0]["gen_images"] == [str((root / "a" / "img" / "0.png").resolve())]
    with pytest.raises(IndexError):
        data.dataset[len(data.dataset)]


def test_strict_fails_on_the_first_bad_row(root):
    with pytest.raises(DataValidationError, match="row 4: malformed_json"):
        build_stage_data([parse_source({"path": "a/rows.jsonl"}, "a")], "sft", root, strict=True)


def test_plain_files_only_for_sources_finetune_reads_itself(root):
    plain = [parse_source({"path": "a/rows.jsonl"}, "a")]
    assert plain_files(plain, root) == [str(root / "a" / "rows.jsonl")]
    for extra in ({"repeat": 2}, {"weight": 1.0}, {"streaming": True}, {"check_images": "exists"}):
        assert plain_files([parse_source({"path": "a/rows.jsonl", **extra}, "a")], root) is None


def test_weighted_stream_mixes_by_weight_and_replays_the_same_order(root):
    sources = [
        parse_source({"path": "a/rows.jsonl", "streaming": True, "weight": 3, "shuffle_buffer": 2}, "a"),
        parse_source({"path": "b/rows.jsonl", "weight": 1}, "b"),  # in memory, drawn by weight all the same
    ]
    data = build_stage_data(sources, "sft", root, seed=7)
    assert data.streamed and isinstance(data.dataset, MixtureStream)
    first = [_prompt(r) for r in itertools.islice(iter(data.dataset), 400)]
    again = [_prompt(r) for r in itertools.islice(iter(data.dataset), 400)]
    assert first == again  # every iter() replays the seeded sequence: what a resumed Trainer relies on
    share_a = sum(p.startswith("a ") for p in first) / len(first)
    assert 0.68 < share_a < 0.82  # 3:1 weights
    assert set(first) == {f"a prompt {i}" for i in range(4)} | {"b prompt 0", "b prompt 1"}
    # the streamed file is read many times over; each bad row is counted once
    report = data.report
    assert report.skipped == {"malformed_json": 1, "missing_image": 1}
    assert report.kept_rows == 4 + 2
    other_seed = build_stage_data(sources, "sft", root, seed=8)
    assert [_prompt(r) for r in itertools.islice(iter(other_seed.dataset), 400)] != first


def test_streaming_local_dataset_by_name_with_image_root(root):
    # datasets' own JSON reader stops at a malformed line (that is why files go through `formats`): valid JSON here
    rows = [_gen_row(f"a prompt {i}", f"img/{i}.png") for i in range(4)] + [_gen_row("lost", "img/missing.png")]
    _write_jsonl(root / "hub" / "train.jsonl", rows)
    source = parse_source(
        {"dataset": "json", "data_files": "hub/train.jsonl", "streaming": True, "image_root": "a"}, "hub"
    )
    data = build_stage_data([source], "sft", root)
    rows = list(itertools.islice(iter(data.dataset), 12))
    assert {_prompt(r) for r in rows} == {f"a prompt {i}" for i in range(4)}
    assert rows[0]["source_file"] == "json:train"
    assert data.report.skipped == {"missing_image": 1} and data.report.kept_rows == 4


def test_in_memory_dataset_by_name_skips_and_counts(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", (0, 0, 60 * i))
    rows = [_gen_row(f"p{i}", f"img/{i}.png") for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "no answer"}], "images": []})
    _write_jsonl(tmp_path / "d" / "rows.jsonl", rows)
    source = parse_source({"dataset": "json", "data_files": "d/rows.jsonl"}, "hub")  # images relative to data root
    data = build_stage_data([source], "sft", tmp_path)
    assert not data.streamed and len(data.dataset) == 3
    assert data.report.skipped == {"bad_turn_order": 1}
    assert {_prompt(data.dataset[i]) for i in range(3)} == {"p0", "p1", "p2"}


def test_dataset_with_images_inside_it(tmp_path):
    """A dataset whose image column holds the images (datasets `Image` feature), renamed by `columns`."""

    def png_bytes(color):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
        return buffer.getvalue()

    features = datasets.Features(
        {
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
            "image": datasets.Image(),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "conversations": [
                [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "red"}],
                [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "blue"}],
                [{"from": "human", "value": "<image>Broken?"}, {"from": "gpt", "value": "yes"}],
            ],
            "image": [
                {"bytes": png_bytes((255, 0, 0)), "path": None},
                {"bytes": png_bytes((0, 0, 255)), "path": None},
                {"bytes": b"not an image", "path": None},
            ],
        },
        features=features,
    )
    table.to_parquet(str(tmp_path / "vqa.parquet"))
    for streaming in (False, True):
        raw = {"dataset": "parquet", "data_files": "vqa.parquet", "columns": {"images": "image"}}
        source = parse_source({**raw, "streaming": streaming}, "inline")
        data = build_stage_data([source], "sft", tmp_path)
        rows = [data.dataset[i] for i in range(len(data.dataset))] if not streaming else []
        if streaming:
            rows = list(itertools.islice(iter(data.dataset), 4))
        answers = {r["messages"][1]["content"] for r in rows}
        assert answers == {"red", "blue"}, streaming
        assert data.report.skipped == {"unreadable_image": 1}
        red = next(r for r in rows if r["messages"][1]["content"] == "red")
        assert load_image(red["images"][0]).getpixel((0, 0)) == (255, 0, 0)  # what the collator does with it


def test_preference_rows(tmp_path):
    for name in ("win", "lose"):
        _png(tmp_path / f"{name}.png", (1, 2, 3))
    row = {
        "conversations": [{"from": "human", "value": "draw a cat"}],
        "chosen": {"from": "gpt", "value": "<image_gen>"},
        "rejected": {"from": "gpt", "value": "<image_gen>"},
        "images": ["win.png", "lose.png"],
    }
    _write_jsonl(tmp_path / "pairs.jsonl", [row, {"conversations": []}])
    data = build_stage_data([parse_source({"path": "pairs.jsonl", "streaming": True}, "p")], "dpo", tmp_path)
    first = next(iter(data.dataset))
    assert first["chosen_gen_images"] == [str(tmp_path / "win.png")]
    assert first["rejected_gen_images"] == [str(tmp_path / "lose.png")]
    assert data.report.skipped == {"missing_key": 1}


def test_a_source_with_no_usable_rows_is_an_error(tmp_path):
    _write_jsonl(tmp_path / "bad.jsonl", ["{", "[1]"])
    with pytest.raises(ValueError, match=r"no usable rows in bad\.jsonl"):
        build_stage_data([parse_source({"path": "bad.jsonl"}, "x")], "sft", tmp_path)
    stream = build_stage_data([parse_source({"path": "bad.jsonl", "streaming": True}, "x")], "sft", tmp_path)
    with pytest.raises(ValueError, match=r"no usable rows in bad\.jsonl"):
        next(iter(stream.dataset))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"path": "a.jsonl", "dataset": "json"}, "exactly one of 'path'"),
        ({}, "exactly one of 'path'"),
        ({"path": "a.jsonl", "wieght": 1}, r"unknown field\(s\) \['wieght'\]"),
        ({"path": "a.jsonl", "weight": 0}, "weight must be a positive number"),
        ({"path": "a.jsonl", "repeat": 1.5}, "repeat must be a positive integer"),
        ({"path": "a.jsonl", "split": "train"}, "split belongs to a 'dataset' source"),
        ({"path": "a.jsonl", "check_images": "maybe"}, "check_images must be one of"),
        ({"dataset": "json", "columns": {"pixels": "image"}}, "columns may rename"),
        ({"path": "a.jsonl", "streaming": "yes"}, "streaming must be true or false"),
        (3, "a data source is an object"),
    ],
)
def test_bad_source_fields_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_source(raw, "stage 'x' data[0]")


def test_mixture_rules():
    a = parse_source({"path": "a.jsonl", "streaming": True}, "a")
    b = parse_source({"path": "b.jsonl", "weight": 1}, "b")
    with pytest.raises(ValueError, match=r"needs a weight on every source .*missing on \['a.jsonl'\]"):
        check_mixture([a, b], "stage 's' data")
    with pytest.raises(ValueError, match="repeat applies to sources held in memory"):
        check_mixture([parse_source({"path": "a.jsonl", "repeat": 2, "weight": 1}, "a")], "stage 's' data")
    with pytest.raises(ValueError, match="at least one data source"):
        check_mixture([], "stage 's' data")
    check_mixture([a], "one streamed source needs no weight")


def test_dataloader_workers_share_the_stream_without_repeating_rows(root):
    from torch.utils.data import DataLoader

    sources = [parse_source({"path": "b/rows.jsonl", "streaming": True}, "b")]
    stream = build_stage_data(sources, "sft", root, seed=3).dataset
    alone = [_prompt(r) for r in itertools.islice(iter(stream), 8)]
    loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=lambda rows: [_prompt(r) for r in rows])
    batches = list(itertools.islice(iter(loader), 4))
    # batch b comes from worker b % 2, which holds rows 2i + b % 2 of the single sequence
    assert batches[0] == alone[0:4:2] and batches[1] == alone[1:4:2]
    assert batches[2] == alone[4:8:2] and batches[3] == alone[5:8:2]
