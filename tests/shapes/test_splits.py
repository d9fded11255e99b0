"""`vargpt data shapes` writes what a recipe's data step writes, without training (issue 28, item 5)."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import pytest

from vargpt.cli.main import main
from vargpt.shapes.dataset import write_sharegpt_dataset
from vargpt.shapes.scene import ShapesWorldConfig
from vargpt.shapes.splits import write_recipe_splits
from vargpt.training.recipe import DataSpec, load_recipe
from vargpt.training.runner import prepare_data

SMALL = {
    "train": {"understanding": 6, "generation": 7, "editing": 3},
    "validation": {"understanding": 3, "generation": 4, "editing": 2},
    "test": {"understanding": 5, "generation": 6, "editing": 2},
}
# sha256 of SMALL's test split from `shapes-tiny`, written by the code before the broad language was added
PINNED_SMALL_TEST_SHA256 = "a6de4aa11c875ae93d80d7c9a60c78ee977c571ff5b3f6a5a4536831170168c1"


def _small_spec():
    spec = load_recipe("shapes-tiny")
    data = dataclasses.replace(spec.data, **SMALL)
    return dataclasses.replace(spec, data=data)


def _files(folder: Path) -> dict[str, bytes]:
    skip = {"DONE", "metrics.json"}  # the runner's resume marker, not data
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name not in skip}


def test_it_writes_the_recipe_data_steps_rows_images_and_task_files(tmp_path):
    """Checked against the pieces the data step is made of, not against itself (the runner's `prepare_data` calls
    `write_recipe_splits`): each split is `write_sharegpt_dataset` with the recipe's seed and world, and each task
    file holds exactly that split's rows of the task, in order."""
    spec = _small_spec()
    counts = write_recipe_splits(spec.data, spec.seed, tmp_path / "command")
    world = ShapesWorldConfig(image_size=spec.data.image_size, generation_layout=spec.data.generation_layout)
    for split, sizes in SMALL.items():
        expected = write_sharegpt_dataset(
            tmp_path / "direct", split, sizes["understanding"], sizes["generation"], sizes["editing"],
            seed=spec.seed, image_size=spec.data.image_size, config=world,
        )  # fmt: skip
        written = tmp_path / "command" / f"{split}.jsonl"
        assert written.read_bytes() == expected.read_bytes()
        rows = written.read_text().splitlines()
        for task in ("understanding", "generation", "editing"):
            task_rows = (tmp_path / "command" / f"{split}-{task}.jsonl").read_text().splitlines()
            assert task_rows == [r for r in rows if json.loads(r)["meta"]["task"] == task]
    direct, command = _files(tmp_path / "direct"), _files(tmp_path / "command")
    images = {name for name in direct if name.startswith("images/")}
    assert images and all(direct[name] == command[name] for name in images)
    assert counts == {split: SMALL[split] for split in ("train", "validation", "test")}


def test_the_recipe_run_writes_the_same_data_folder(tmp_path):
    spec = _small_spec()
    prepare_data(spec, tmp_path / "recipe")
    write_recipe_splits(spec.data, spec.seed, tmp_path / "command")
    assert _files(tmp_path / "recipe") == _files(tmp_path / "command")


def test_one_split_alone_equals_that_split_of_the_whole_step(tmp_path):
    spec = _small_spec()
    write_recipe_splits(spec.data, spec.seed, tmp_path / "all")
    write_recipe_splits(spec.data, spec.seed, tmp_path / "test", ["test"])
    alone, everything = _files(tmp_path / "test"), _files(tmp_path / "all")
    assert alone and all(name.startswith(("test", "images/test/")) for name in alone)
    assert alone == {name: data for name, data in everything.items() if name in alone}


def test_another_seed_writes_other_rows(tmp_path):
    spec = _small_spec()
    write_recipe_splits(spec.data, 0, tmp_path / "a", ["test"])
    write_recipe_splits(spec.data, 1, tmp_path / "b", ["test"])
    assert (tmp_path / "a/test.jsonl").read_text() != (tmp_path / "b/test.jsonl").read_text()


def test_unknown_splits_are_refused():
    spec = DataSpec(train={}, validation={}, test={})
    with pytest.raises(ValueError, match="splits must be some of"):
        write_recipe_splits(spec, 0, "unused", ["testing"])


def test_the_command_writes_a_recipe_files_splits_with_a_progress_bar(tmp_path, capsys):
    raw = json.loads(resources.files("vargpt").joinpath("recipes", "shapes-tiny.json").read_text())
    recipe = tmp_path / "small.json"
    recipe.write_text(json.dumps(raw | {"data": raw["data"] | SMALL}))
    out = tmp_path / "data"
    assert main(["data", "shapes", "--out", str(out), "--recipe", str(recipe), "--splits", "test", "validation"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"] == {"validation": SMALL["validation"], "test": SMALL["test"]}
    assert "row" in captured.err and "100%" in captured.err  # the bar, on stderr
    assert not (out / "train.jsonl").exists()
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert [r["meta"]["task"] for r in rows] == ["understanding"] * 5 + ["generation"] * 6 + ["editing"] * 2
    assert all((out / image).is_file() for r in rows for image in r["images"])


def test_the_command_refuses_recipes_without_a_shapes_data_step(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--recipe", "no-such-recipe"]) == 2
    assert "no recipe 'no-such-recipe'" in capsys.readouterr().err
    assert main(["data", "shapes", "--out", str(tmp_path), "--recipe", "vargpt-v1.1-paper", "--quiet"]) == 2
    assert "fine-tuning recipe" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


BROAD = {
    "train": {"understanding": 4, "generation": 6, "editing": 2, "conversation": 3},
    "validation": {"understanding": 2, "generation": 3, "editing": 1},
    "test": {"understanding": 3, "generation": 6, "editing": 1, "conversation": 3},
    "test_paraphrase": {"understanding": 5, "generation": 12, "editing": 2, "conversation": 3},
}


def _broad_spec():
    spec = load_recipe("shapes-tiny-broad")
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, **BROAD))


def test_the_template_language_writes_todays_bytes(tmp_path):
    """Pinned before the broad language existed: the default language's rows must not move (the shipped model's
    scores are measured on them)."""
    import hashlib

    spec = _small_spec()
    write_recipe_splits(spec.data, spec.seed, tmp_path, ["test"])
    digest = hashlib.sha256((tmp_path / "test.jsonl").read_bytes()).hexdigest()
    assert digest == PINNED_SMALL_TEST_SHA256


def test_a_broad_recipe_writes_the_paraphrase_split_with_conversations(tmp_path):
    spec = _broad_spec()
    counts = write_recipe_splits(spec.data, spec.seed, tmp_path)
    assert set(counts) == {"train", "validation", "test", "test-paraphrase"}
    assert counts["test-paraphrase"]["understanding"] == 5 + 3  # conversations are understanding rows
    rows = {
        split: [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()] for split in counts
    }
    prompts = {s: {r["messages"][0]["content"] for r in rows[s] if r["meta"]["task"] == "generation"} for s in rows}
    assert not prompts["train"] & (prompts["test"] | prompts["test-paraphrase"] | prompts["validation"])
    assert all(r["split"] == "test-paraphrase" for r in (row["meta"] for row in rows["test-paraphrase"]))
    conversations = [r for r in rows["test-paraphrase"] if r["meta"].get("category") == "conversation"]
    assert len(conversations) == 3 and all(len(r["messages"]) == 4 for r in conversations)
    task_file = (tmp_path / "test-paraphrase-understanding.jsonl").read_text().splitlines()
    assert len(task_file) == 8


def test_the_paraphrase_split_needs_a_broad_recipe(tmp_path):
    spec = _small_spec()
    with pytest.raises(ValueError, match="test-paraphrase needs a recipe"):
        write_recipe_splits(spec.data, spec.seed, tmp_path, ["test-paraphrase"])
    with pytest.raises(ValueError, match="language"):
        write_sharegpt_dataset(tmp_path, "test-paraphrase", 1, 1, 1)
    with pytest.raises(ValueError, match="broad language only"):
        write_sharegpt_dataset(tmp_path, "test", 1, 1, 1, n_conversation=2)


def test_the_command_writes_the_paraphrase_split_of_a_broad_recipe(tmp_path, capsys):
    raw = json.loads(resources.files("vargpt").joinpath("recipes", "shapes-tiny-broad.json").read_text())
    recipe = tmp_path / "broad.json"
    recipe.write_text(json.dumps(raw | {"data": raw["data"] | BROAD}))
    out = tmp_path / "data"
    assert main(["data", "shapes", "--out", str(out), "--recipe", str(recipe), "--splits", "test-paraphrase"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == {
        "test-paraphrase": {"understanding": 8, "generation": 12, "editing": 2}
    }
    assert main(["eval", "shapes", "--data", str(out), "--split", "test-paraphrase", "--samples-per-prompt", "1"]) == 2
    assert "--samples-per-prompt must be 0 (off) or at least 2" in capsys.readouterr().err
