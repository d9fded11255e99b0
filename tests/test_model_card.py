"""The model card: what the shipped model knows, and the one-line warnings commands give from it (issue 28)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil

import pytest

from vargpt import VARGPTPipeline
from vargpt.cli.demo import demo_scene
from vargpt.cli.inference import register_commands, run_chat
from vargpt.model_card import MODEL_CARD_FILE, ModelCard, model_card_of, prompt_words, training_vocabulary
from vargpt.pipeline import shipped_model_path
from vargpt.shapes.language import GENEVAL_CATEGORIES, enumerate_prompts
from vargpt.shapes.scene import ShapesWorldConfig
from vargpt.shapes.splits import write_recipe_splits
from vargpt.training.recipe import load_recipe

NAME = "vargpt-shapes-tiny"


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.in_folder(shipped_model_path(NAME))


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vargpt")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# -- the card ----------------------------------------------------------------------------------------------------
def test_the_shipped_model_carries_a_card_with_its_measured_scores_and_resolution(card):
    assert card is not None and card.model == NAME
    config = json.loads((shipped_model_path(NAME) / "config.json").read_text())
    assert card.trained_resolution == config["image_resolution"] == 32
    assert {"generation", "understanding", "editing"} <= set(card.scores)
    assert all(entry.get("source") for entry in card.scores.values())  # every figure says where it was measured
    assert (shipped_model_path(NAME) / "README.md").is_file()


def test_the_shipped_vocabulary_holds_the_words_of_its_training_data(card, tmp_path):
    # a sample of the recipe's training split (its own seed and world): every word must be in the card
    spec = load_recipe("shapes-tiny")
    small = {"understanding": 200, "generation": 120, "editing": 60}
    data = dataclasses.replace(spec.data, train=small)
    write_recipe_splits(data, spec.seed, tmp_path, ["train"])
    sampled = set(training_vocabulary([tmp_path / "train.jsonl"]))
    assert sampled and sampled <= card.vocabulary
    world = ShapesWorldConfig(image_size=32, generation_layout=spec.data.generation_layout)
    prompts = [p["prompt"] for c in GENEVAL_CATEGORIES for p in enumerate_prompts(c, world)]
    assert {w for p in prompts for w in prompt_words(p)} <= card.vocabulary
    assert not {"dog", "beach", "hello", "france", "256"} & card.vocabulary


def test_training_vocabulary_skips_image_placeholders_and_keeps_contractions(tmp_path):
    rows = tmp_path / "rows.jsonl"
    messages = [{"role": "user", "content": "<image>What's this?"}, {"role": "assistant", "content": "<image_gen>"}]
    rows.write_text(json.dumps({"messages": messages}) + "\n")
    assert training_vocabulary([rows]) == ["this", "what's"]


def test_warnings_name_unseen_words_once_and_untrained_sizes(card):
    assert card.warnings("a photo of a red circle") == []
    assert card.warnings("Draw a red circle", resolution=32) == []
    (line,) = card.warnings("a dog on a beach, a DOG!")
    assert "'dog', 'beach'" in line and line.count("dog") == 1 and "\n" not in line
    (line,) = card.warnings("a red circle", resolution=256)
    assert "32 px" in line and "256 px" in line
    assert len(card.warnings(["a cat", "a dog"], resolution=16)) == 2
    many = card.words_warning(" ".join(f"word{i}x" for i in range(12)))
    assert "and 4 more" in many


def test_a_malformed_card_is_refused_naming_the_file(tmp_path):
    path = tmp_path / MODEL_CARD_FILE
    path.write_text("{not json")
    with pytest.raises(ValueError, match=MODEL_CARD_FILE):
        ModelCard.from_file(path)
    path.write_text(json.dumps({"model": "m", "trained_resolution": 32, "scores": {}}))
    with pytest.raises(ValueError, match="lacks vocabulary"):
        ModelCard.from_file(path)
    path.write_text(json.dumps({"model": "m", "trained_resolution": "32", "scores": {}, "vocabulary": ["a"]}))
    with pytest.raises(ValueError, match="trained_resolution"):
        ModelCard.from_file(path)


def test_checkpoints_without_a_card_have_none(tiny_checkpoint):
    assert ModelCard.in_folder(tiny_checkpoint) is None
    assert model_card_of(VARGPTPipeline.from_pretrained("tiny")) is None


# -- the commands ------------------------------------------------------------------------------------------------
def test_generate_warns_in_one_line_and_records_the_warning(tmp_path, capsys):
    out = tmp_path / "gen"
    assert _run(["generate", "a dog on a beach", "--resolution", "16", "--out", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vargpt: warning:")]
    assert len(warnings) == 2 and "'dog'" in warnings[0] and "16 px" in warnings[1]
    report = json.loads((out / "generations.json").read_text())
    assert [f"vargpt: warning: {w}" for w in report["warnings"]] == warnings
    assert len(report["images"]) == 1  # a warning, not a refusal


def test_generate_with_known_words_or_a_card_less_model_warns_nothing(tmp_path, capsys):
    assert _run(["generate", "a photo of a red circle", "--out", str(tmp_path / "a")]) == 0
    assert _run(["generate", "a dog on a beach", "--model", "tiny", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "generations.json").read_text())["warnings"] == []


def test_edit_states_the_measured_editing_score(tmp_path, card, capsys):
    scene = tmp_path / "scene.png"
    demo_scene().save(scene)
    assert _run(["edit", str(scene), "make the circle purple", "--out", str(tmp_path / "e.png")]) == 0
    captured = capsys.readouterr()
    assert "edited image written to" in captured.out
    assert f"note: {card.score_line('editing')}" in captured.out.splitlines()
    assert "measured editing score is 0.0" in captured.out
    assert "warning" not in captured.err
    assert _run(["edit", str(scene), "make the circle pink", "--out", str(tmp_path / "f.png")]) == 0
    assert "'pink'" in capsys.readouterr().err


def test_chat_warns_about_each_turn_with_unseen_words(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["chat", "--max-new-tokens", "4", "--no-images", "--out", str(tmp_path)])
    stdin = io.StringIO("Hello\nWhat colour is the circle?\nbonjour\n/exit\n")
    assert run_chat(args, stdin=stdin, stdout=io.StringIO()) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "'hello'" in warnings[0] and "'bonjour'" in warnings[1]


def test_a_copied_checkpoint_keeps_its_card(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shipped_model_path(NAME), folder)
    assert model_card_of(VARGPTPipeline.from_pretrained(str(folder))).model == NAME
    (folder / MODEL_CARD_FILE).unlink()
    assert model_card_of(VARGPTPipeline.from_pretrained(str(folder))) is None
