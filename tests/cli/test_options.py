"""The argument groups every command shares: one spelling per image flag (the old ones warn), a default model
looked up when a command line is parsed and never at import."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from vargpt.cli import options
from vargpt.cli.main import build_parser
from vargpt.cli.options import (
    IMAGE_SETTINGS,
    add_image_arguments,
    add_model_arguments,
    image_config,
    image_settings,
)
from vargpt.generation.config import ImageGenerationConfig


def _parser(settings=IMAGE_SETTINGS, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_image_arguments(parser, settings, **kwargs)
    return parser


def test_image_flags_are_spelled_as_the_config_fields_and_land_in_them():
    flags = [f"--{name.replace('_', '-')}" for name in IMAGE_SETTINGS]
    values = ["2.5", "0.7", "5", "0.9", "16", "2.0", "cache", "null_prompt"]
    args = _parser().parse_args([item for pair in zip(flags, values, strict=True) for item in pair])
    settings = image_settings(args)
    assert settings == {
        "cfg_scale": 2.5,
        "tau": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "resolution": 16,
        "aspect_ratio": 2.0,
        "position_mode": "cache",
        "uncond_mode": "null_prompt",
    }
    assert ImageGenerationConfig(**settings).to_dict() == ImageGenerationConfig().updated(**settings).to_dict()
    assert image_settings(_parser().parse_args([])) == {}  # unset flags leave the preset's or the model's values


@pytest.mark.parametrize(
    ("old", "new", "value", "expected"), [("--cfg", "--cfg-scale", "2", 2.0), ("--size", "--resolution", "24", 24)]
)
def test_old_spellings_still_parse_for_a_release_and_say_the_new_one(capsys, old, new, value, expected):
    args = _parser().parse_args([old, value])
    setting = options.DEPRECATED_SPELLINGS[old]
    assert getattr(args, setting) == expected and type(getattr(args, setting)) is type(expected)
    err = capsys.readouterr().err
    assert err.startswith(f"vargpt: deprecated: {old} is now spelled {new}") and err.count("\n") == 1
    _parser().parse_args([new, value])
    assert capsys.readouterr().err == ""  # the new spelling says nothing
    assert not re.search(rf"{old}(?![\w-])", _parser().format_help())  # and the help shows only the new one


def test_a_group_takes_only_known_settings_and_its_own_defaults():
    with pytest.raises(ValueError, match="unknown image settings"):
        _parser(("cfg",))
    args = _parser(("cfg_scale", "tau"), preset_help=None, defaults={"cfg_scale": 1.0}).parse_args([])
    assert image_settings(args) == {"cfg_scale": 1.0} and not hasattr(args, "preset") and not hasattr(args, "top_k")
    with pytest.raises(SystemExit):
        _parser(("cfg_scale",)).parse_args(["--top-k", "3"])


def test_image_config_layers_the_command_line_over_the_preset_or_the_model():
    parser = _parser()
    args = parser.parse_args(["--cfg-scale", "2"])
    assert image_config(args) == ImageGenerationConfig.from_preset("original-code", cfg_scale=2.0)
    own = ImageGenerationConfig(cfg_scale=1.0, uncond_mode="null_prompt")
    assert image_config(args, own) == own.updated(cfg_scale=2.0)
    assert image_config(parser.parse_args(["--preset", "paper"]), own) == ImageGenerationConfig.from_preset("paper")
    with pytest.raises(ValueError, match="--resolution must be a positive"):
        image_config(parser.parse_args(["--resolution", "0"]))
    with pytest.raises(ValueError, match="tau"):
        image_config(parser.parse_args(["--tau", "0"]))


def test_every_image_command_spells_the_flags_alike():
    parser = build_parser()
    for argv in (
        ["generate", "x"],
        ["edit", "in.png", "make it blue"],
        ["eval", "shapes", "--data", "d"],
        ["eval", "geneval-sample", "--out", "o"],
        ["eval", "dpg-sample", "--out", "o"],
        ["eval", "fit", "--data", "d"],
    ):
        args = parser.parse_args([*argv, "--cfg-scale", "1.5", "--tau", "0.25"])
        assert (args.cfg_scale, args.tau) == (1.5, 0.25), argv


def test_the_default_model_is_looked_up_when_parsing(monkeypatch):
    calls = []

    def default() -> str:
        calls.append(1)
        return "some-default"

    monkeypatch.setattr("vargpt.pipeline.default_model_name", default)
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert not calls  # building the parser looks nothing up
    assert parser.parse_args(["--model", "tiny"]).model == "tiny" and not calls
    assert parser.parse_args([]).model == "some-default" and len(calls) == 1
    assert "when installed, else the tiny preset" in parser.format_help()


def test_importing_the_commands_and_the_server_looks_up_no_model():
    """In a fresh interpreter: the default model's lookup (a filesystem probe) is replaced by a tripwire before the
    command modules are imported; importing them must not trip it."""
    code = (
        "import vargpt.pipeline as p\n"
        "def trip():\n    raise SystemExit('default model looked up at import')\n"
        "p.default_model_name = trip\n"
        "import vargpt.cli.evaluate, vargpt.cli.inference, vargpt.cli.demo, vargpt.serving.server\n"
        "from vargpt.cli.main import build_parser\n"
        "build_parser()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
