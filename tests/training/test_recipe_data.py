"""A recipe's `data` section: the language, conversation rows and the paraphrase split (issue 28, items 1-3)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from vargpt.training.recipe import load_recipe


def _raw(name: str) -> dict:
    return json.loads(resources.files("vargpt").joinpath("recipes", f"{name}.json").read_text())


def test_existing_recipes_keep_the_template_language():
    for name in ("shapes-tiny", "shapes-tiny-understanding"):
        data = load_recipe(name).data
        assert data.language == "templates" and data.test_paraphrase == {}


def test_the_broad_recipe_has_the_same_model_and_budget_as_shapes_tiny():
    broad, tiny = load_recipe("shapes-tiny-broad"), load_recipe("shapes-tiny")
    assert broad.data.language == "broad" and broad.data.generation_layout == "varied"
    assert broad.data.train["conversation"] > 0 and broad.data.test_paraphrase["generation"] > 0
    assert broad.model_preset == tiny.model_preset and broad.tokenizer == tiny.tokenizer
    assert [(s.name, s.steps, s.batch_size) for s in broad.stages] == [
        (s.name, s.steps, s.batch_size) for s in tiny.stages
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"language": "klingon"}, "data.language must be one of"),
        ({"test": {"understanding": 1, "dialogue": 2}}, "unknown row kinds"),
        ({"test": {"understanding": -1}}, "non-negative integers"),
        ({"test": {"conversation": 3}}, "need data.language 'broad'"),
        ({"test_paraphrase": {"generation": 3}}, "need data.language 'broad'"),
        ({"generation_layout": "scattered"}, "generation_layout must be one of"),
    ],
)
def test_bad_data_sections_are_refused_by_name(tmp_path, change, message):
    raw = _raw("shapes-tiny")
    raw["data"] = raw["data"] | change
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_recipe(path)
