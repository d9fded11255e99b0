"""A bad config.json fails in one line naming the file and the field, before anything is allocated."""

from __future__ import annotations

import json

import pytest

from vargpt import VARGPTConfig
from vargpt.cli.main import main as vargpt
from vargpt.config_validation import MAX_PARAMETERS, ConfigFileError, estimated_parameters


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny preset's config.json as save_pretrained writes it (nested text_config)."""
    folder = tmp_path_factory.mktemp("config")
    VARGPTConfig.from_preset("tiny").save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _write(folder, values=None, text=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(text if text is not None else json.dumps(values))
    return folder


def _with(values, section, field, value):
    changed = json.loads(json.dumps(values))
    (changed[section] if section else changed)[field] = value
    return changed


BAD_FIELDS = [
    ("text_config", "hidden_size", "abc", r"text_config\.hidden_size must be a positive integer, got 'abc'"),
    ("text_config", "hidden_size", 128.5, r"text_config\.hidden_size must be a positive integer, got 128\.5"),
    ("text_config", "num_hidden_layers", 1e6, r"text_config\.num_hidden_layers must be a positive integer"),
    ("text_config", "num_hidden_layers", 10**12, r"text_config\.num_hidden_layers is 1000000000000, above the"),
    ("text_config", "vocab_size", True, r"text_config\.vocab_size must be a positive integer, got True"),
    ("vision_config", "embed_dim", 1e9, r"vision_config\.embed_dim must be a positive integer"),
    ("vision_config", "embed_dim", 10**9, r"about \d\.\de\+19 parameters, above the limit of 1e\+12"),
    ("visual_decoder_config", "depth", 0, r"visual_decoder_config\.depth must be a positive integer, got 0"),
    (None, "text_config", [1, 2], r"text_config must be an object of settings, found a list"),
    (None, "image_resolution", "abc", r"image_resolution must be a positive integer, got 'abc'"),
    ("text_config", "rms_norm_eps", "x", r"field 'rms_norm_eps':; TypeError: .*expected float"),
]


@pytest.mark.parametrize(("section", "field", "value", "message"), BAD_FIELDS, ids=[m[:40] for *_, m in BAD_FIELDS])
def test_bad_fields_name_the_file_and_the_field(tmp_path, saved, section, field, value, message):
    folder = _write(tmp_path / "ckpt", _with(saved, section, field, value))
    with pytest.raises(ConfigFileError, match=message) as raised:
        VARGPTConfig.from_pretrained(folder)
    assert str(raised.value).startswith(f"{folder / 'config.json'}: ") and "\n" not in str(raised.value)


def test_flat_original_layout_fields_are_checked_too(tmp_path, saved):
    flat = {k: v for k, v in saved.items() if k != "text_config"} | {**saved["text_config"], "hidden_size": "abc"}
    with pytest.raises(ConfigFileError, match=r"config\.json: hidden_size must be a positive integer"):
        VARGPTConfig.from_pretrained(_write(tmp_path / "flat", flat))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", r"must hold a JSON object of settings, found a list"),
        ('{"hidden_size": 64,\n oops}', r"is not valid JSON \(line 2, column 2\): Expecting property name"),
        ("", r"is not valid JSON \(line 1, column 1\)"),
    ],
)
def test_a_file_that_is_not_a_json_object_is_named(tmp_path, text, message):
    folder = _write(tmp_path / "ckpt", text=text)
    with pytest.raises(ConfigFileError, match=message) as raised:
        VARGPTConfig.from_pretrained(folder)
    assert str(raised.value).startswith(str(folder / "config.json"))


def test_the_parameter_estimate_is_close_for_the_full_size_model():
    estimate = estimated_parameters(VARGPTConfig.from_preset("vargpt-v1.1"))
    assert 1.0e10 < estimate < 1.3e10  # 10,948,528,387 tensors' values on the meta device
    assert estimate < MAX_PARAMETERS / 50


def test_presets_and_good_files_still_load(tmp_path, saved):
    assert VARGPTConfig.from_pretrained(_write(tmp_path / "ok", saved)).text_config.hidden_size == 64


def test_the_chat_command_exits_2_with_one_line(tmp_path, saved, capsys):
    folder = _write(tmp_path / "ckpt", _with(saved, "vision_config", "embed_dim", 1e9))
    assert vargpt(["chat", "hi", "--model", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "config.json" in error and "vision_config.embed_dim" in error and error.count("\n") == 1
