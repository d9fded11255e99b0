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
