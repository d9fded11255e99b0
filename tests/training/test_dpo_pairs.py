"""`vargpt dpo-pairs` end to end on the shapes world: prompts with GenEval metadata, rendered winners, tiny
checkpoint samples as losers; the JSONL the DPO trainer reads, the scorer, resuming and shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vargpt import VARGPTPipeline
from vargpt.cli.main import main
from vargpt.data.collator import PreferenceCollator
from vargpt.data.formats import load_preference_dataset
from vargpt.shapes.scoring import GENEVAL_CATEGORIES
from vargpt.shapes.world import ShapesWorld
from vargpt.training.dpo_pairs import (
    LOSER_SATISFIES_PROMPT,
    NO_WINNER,
    DPOPairsConfig,
    PromptRow,
    WinnerIndex,
    build_dpo_pairs,
    load_prompts,
    resolve_shard,
    slug,
)

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def world_items():
    world = ShapesWorld(seed=3, image_size=IMAGE_SIZE)
    return world, [world.t2i_prompt(category, "train") for category in GENEVAL_CATEGORIES]


@pytest.fixture
def inputs(tmp_path, world_items):
    """prompts.jsonl (one GenEval-style row per category) and winners/<index>.png rendered from the scenes."""
    world, items = world_items
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(item.metadata) + "\n" for item in items))
    winners = tmp_path / "winners"
    winners.mkdir()
    for i, item in enumerate(items):
        world.render(item.scene).save(winners / f"{i}.png")
    return prompts, winners


@pytest.fixture(scope="module")
def tiny_pipe(tiny_checkpoint):
    return VARGPTPipeline.from_pretrained(tiny_checkpoint)


class CountingLoader:
    """Hands out one pipeline for every checkpoint name and counts the loads and the generate calls."""

    def __init__(self, pipe, fail_after_calls: int | None = None) -> None:
        self.pipe, self.fail_after_calls = pipe, fail_after_calls
        self.loads, self.calls = [], 0

    def __call__(self, name: str):
        self.loads.append(name)
        return self

    def generate(self, prompts, **kwargs):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt  # a killed run
        self.calls += 1
        return self.pipe.generate(prompts, **kwargs)


class GroundTruthFirstPipe:
    """Sample 0 of a prompt is its rendered ground truth (it satisfies the prompt), sample 1 a blank image."""

    def __init__(self, world, items) -> None:
        self.images = {item.prompt: world.render(item.scene) for item in items}

    def generate(self, prompts, num_images, seed, **settings):
        blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
        return [self.images[p] if k == 0 else blank for p in prompts for k in range(num_images)]


def config(prompts, winners, out, **changes) -> DPOPairsConfig:
    values = dict(prompts=str(prompts), models=["m"], out=str(out), winners=winners and str(winners), progress=False)
    return DPOPairsConfig(**(values | changes))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_prompts(path: Path) -> list[str]:
    return [row["prompt"] for row in read_rows(path)]


def test_command_writes_pairs_the_dpo_collator_reads(inputs, tmp_path, tiny_checkpoint, tiny_pipe, world_items):
    prompts, winners = inputs
    out = tmp_path / "pairs"
    argv = ["dpo-pairs", "--prompts", str(prompts), "--model", str(tiny_checkpoint), "--winners", str(winners)]
    argv += ["--out", str(out), "--samples-per-prompt", "2", "--batch-size", "4", "--quiet"]
    assert main(argv) == 0
    dataset, report = load_preference_dataset(out / "pairs.jsonl")
    n_prompts = len(world_items[1])
    assert report.kept_rows == report.total_rows == 2 * n_prompts
    assert [row["prompt"][0]["content"] for row in dataset] == [p for p in read_prompts(prompts) for _ in range(2)]
    first = dataset[0]
    assert first["chosen_gen_images"] == [str((out / "winners" / "000000-0.png").resolve())]
    assert first["rejected_gen_images"] == [str((out / "samples" / "m0" / "000000-0.png").resolve())]
    assert Image.open(first["chosen_gen_images"][0]).tobytes() == Image.open(winners / "0.png").tobytes()
    schedule = tiny_pipe.model.generation_schedule(IMAGE_SIZE)
    collator = PreferenceCollator(tiny_pipe.processor, IMAGE_SIZE, tiny_pipe.model.num_image_gen_pad_tokens(schedule))
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert batch["chosen"]["pixel_gen_values"].shape[0] == batch["rejected"]["pixel_gen_values"].shape[0] == 12
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pairs"] == 12 and stats["candidates"] == 12 and stats["skipped"] == {}
    assert not list(out.rglob(".*.tmp"))


def test_the_scorer_drops_losers_that_satisfy_their_prompt(inputs, tmp_path, world_items):
    prompts, winners = inputs
    (winners / "2.png").unlink()
    pipe = GroundTruthFirstPipe(*world_items)
    result = build_dpo_pairs(
        config(prompts, winners, tmp_path / "out", scorer="shapes", samples_per_prompt=2), lambda name: pipe
    )
    n = len(world_items[1])
    assert result["stats"]["pairs"] == n - 1
    assert result["stats"]["skipped"] == {LOSER_SATISFIES_PROMPT: n - 1, NO_WINNER: 2}
    rows = read_rows(tmp_path / "out" / "pairs.jsonl")
    assert [row["meta"]["sample"] for row in rows] == [1] * (n - 1)  # only the blank samples lose
    # without a winners folder the scorer picks the winners among the samples: the ground-truth ones
    result = build_dpo_pairs(
        config(prompts, None, tmp_path / "self", scorer="shapes", samples_per_prompt=2), lambda name: pipe
    )
    assert result["stats"]["pairs"] == n
    rows = read_rows(tmp_path / "self" / "pairs.jsonl")
    assert [row["images"] for row in rows] == [
        [f"samples/m0/{i:06d}-0.png", f"samples/m0/{i:06d}-1.png"] for i in range(n)
    ]


def test_a_prompt_without_a_winner_is_skipped_and_counted_unless_strict(inputs, tmp_path, world_items, tiny_pipe):
    prompts, winners = inputs
    (winners / "2.png").unlink()
    loader = CountingLoader(tiny_pipe)
    result = build_dpo_pairs(config(prompts, winners, tmp_path / "out", models=["a", "b"]), loader)
    n = len(world_items[1])
    stats = result["stats"]
    assert stats["pairs"] == 2 * (n - 1) and stats["skipped"] == {NO_WINNER: 2}
    assert stats["prompts_without_winner"] == 1 and stats["pairs_per_model"] == {"a": n - 1, "b": n - 1}
    assert loader.loads == ["a", "b"]
    assert not (tmp_path / "out" / "samples" / "m0" / "000002-0.png").exists()  # no losers drawn for it
    argv = ["dpo-pairs", "--prompts", str(prompts), "--model", "tiny", "--winners", str(winners)]
    assert main([*argv, "--out", str(tmp_path / "strict"), "--strict", "--quiet"]) == 2


def test_a_resumed_run_finishes_without_duplicates(inputs, tmp_path, tiny_pipe):
    prompts, winners = inputs
    clean = tmp_path / "clean"
    build_dpo_pairs(config(prompts, winners, clean, samples_per_prompt=2, batch_size=4), CountingLoader(tiny_pipe))
    out = tmp_path / "resumed"
    run = config(prompts, winners, out, samples_per_prompt=2, batch_size=4)
    with pytest.raises(KeyboardInterrupt):  # killed while sampling: after the first batch of two prompts
        build_dpo_pairs(run, CountingLoader(tiny_pipe, fail_after_calls=1))
    assert len(list((out / "samples" / "m0").glob("*.png"))) == 4
    second = CountingLoader(tiny_pipe)
    build_dpo_pairs(run, second)
    assert second.calls == 2  # only the four prompts left
    assert (out / "pairs.jsonl").read_text() == (clean / "pairs.jsonl").read_text()
    for sample in (clean / "samples" / "m0").glob("*.png"):  # a sample does not depend on its batch
        assert Image.open(sample).tobytes() == Image.open(out / "samples" / "m0" / sample.name).tobytes()
    # killed while appending a prompt's line: the cut line is dropped and the prompt redone
    part = next((out / "parts").glob("*.jsonl"))
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    (out / "pairs.jsonl").unlink()
    third = CountingLoader(tiny_pipe)
    build_dpo_pairs(run, third)
    assert third.loads == []  # every sample is on disk
    assert (out / "pairs.jsonl").read_text() == (clean / "pairs.jsonl").read_text()
    assert part.read_text() == "".join(lines)
    # a folder resumes only with the same settings
    with pytest.raises(ValueError, match="samples_per_prompt"):
        build_dpo_pairs(config(prompts, winners, out, samples_per_prompt=3), third)


def test_two_shards_merged_equal_one(inputs, tmp_path, tiny_pipe):
    prompts, winners = inputs
    single = tmp_path / "single"
    build_dpo_pairs(config(prompts, winners, single, batch_size=3), CountingLoader(tiny_pipe))
    out = tmp_path / "sharded"
    first = build_dpo_pairs(config(prompts, winners, out, num_shards=2, shard_index=0), CountingLoader(tiny_pipe))
    assert not first["merged"] and not (out / "pairs.jsonl").exists()
    with pytest.raises(ValueError, match="not finished"):
        build_dpo_pairs(config(prompts, winners, out, merge_only=True), CountingLoader(tiny_pipe))
    shards, shard = resolve_shard(None, None, {"WORLD_SIZE": "2", "RANK": "1"})
    assert (shards, shard) == (2, 1)
    second = build_dpo_pairs(
        config(prompts, winners, out, num_shards=shards, shard_index=shard), CountingLoader(tiny_pipe)
    )
    assert second["merged"]
    assert (out / "pairs.jsonl").read_text() == (single / "pairs.jsonl").read_text()
    assert json.loads((out / "stats.json").read_text()) == json.loads((single / "stats.json").read_text())


def test_prompt_sources_and_winner_keys(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\n  two blue squares.  \n")
    rows = load_prompts(text)
    assert [(r.index, r.prompt, r.problem) for r in rows] == [(0, "a red circle", None), (1, "two blue squares.", None)]
    assert slug(rows[1].prompt) == "two-blue-squares"
    array = tmp_path / "prompts.json"
    array.write_text('[{"prompt": "a circle", "tag": "single_object"}]')
    assert load_prompts(array) == [PromptRow(0, "a circle", {"prompt": "a circle", "tag": "single_object"})]
    folder = tmp_path / "winners"
    (folder / "00003" / "samples").mkdir(parents=True)  # a GenEval-layout folder: several winners of prompt 3
    for name in ("0001.png", "0000.png"):
        Image.new("RGB", (8, 8)).save(folder / "00003" / "samples" / name)
    Image.new("RGB", (8, 8)).save(folder / "two-blue-squares.jpg")
    index = WinnerIndex.load(folder)
    assert [p.name for p in index.winners(PromptRow(3, "anything"))] == ["0000.png", "0001.png"]
    assert index.winners(PromptRow(0, "Two blue squares!")) == [folder / "two-blue-squares.jpg"]
    assert index.winners(PromptRow(1, "a red circle")) == []
    mapping = tmp_path / "winners.jsonl"
    mapping.write_text('{"prompt": "a red circle", "image": "winners/two-blue-squares.jpg"}\n')
    assert WinnerIndex.load(mapping).winners(PromptRow(9, "a red circle")) == [folder / "two-blue-squares.jpg"]
    mapping.write_text('{"prompt": "a red circle", "image": "missing.png"}\n')
    with pytest.raises(FileNotFoundError, match="line 1"):
        WinnerIndex.load(mapping)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a circle"}\n{"text": "<image> and a square"}\n')
    rows = load_prompts(bad, column="text")
    assert rows[0].problem is None and "<image>" in rows[1].problem


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "does not exist"),
        ("\n\n", [], "holds no prompts"),
        ("a circle\n", ["--scorer", "nope"], "unknown scorer"),
        ("a circle\n", ["--scorer", "shapes"], "GenEval metadata"),
        ("a circle\n", ["--samples-per-prompt", "0"], "--samples-per-prompt"),
    ],
)
def test_bad_input_fails_before_loading_with_a_clear_error(tmp_path, capsys, content, extra, message):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    argv = ["dpo-pairs", "--prompts", str(prompts), "--model", "no-such-model", "--out", str(tmp_path / "o")]
    assert main([*argv, "--winners", str(tmp_path), *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err
