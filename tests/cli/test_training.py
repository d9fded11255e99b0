"""`vargpt train`, `finetune` and `dpo-pairs` on the command line: flags into the library's arguments, the shapes
judges handed to a recipe run, and a training package that never imports the command line."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vargpt.training
from vargpt.cli.main import build_parser, main
from vargpt.cli.training import data_recipe_flags_given, dpo_pairs_config_from_args, finetune_args_from_namespace
from vargpt.training.finetune import FinetuneArgs


def test_finetune_flags_default_to_the_library_defaults_and_fill_their_fields():
    parser = build_parser()
    required = ["finetune", "--model", "tiny", "--data", "a.jsonl", "--out", "o"]
    assert finetune_args_from_namespace(parser.parse_args(required)) == FinetuneArgs(
        model="tiny", data=["a.jsonl"], out="o"
    )
    argv = [*required, "--data", "b.jsonl", "--stage", "stage3-dpo", "--steps", "7", "--batch-size", "2"]
    argv += ["--beta", "0.2", "--quiet", "--lora", "--lora-rank", "4", "--quantize", "int4", "--positions", "mrope"]
    args = finetune_args_from_namespace(parser.parse_args(argv))
    changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in ("model", "out")}
    changed = {k: v for k, v in changed.items() if v != FinetuneArgs.__dataclass_fields__[k].default}
    assert changed == {
        "data": ["a.jsonl", "b.jsonl"],
        "stage": "stage3-dpo",
        "steps": 7,
        "batch_size": 2,
        "beta": 0.2,
        "quiet": True,
        "lora": True,
        "lora_rank": 4,
        "quantize": "int4",
        "positions": "mrope",
    }


def test_train_flags_for_fine_tuning_recipes_are_refused_on_a_shapes_recipe(capsys):
    parser = build_parser()
    assert data_recipe_flags_given(parser.parse_args(["train"])) == []
    args = parser.parse_args(["train", "--max-steps", "2", "--cpu", "--data-root", "d"])
    assert data_recipe_flags_given(args) == ["--data-root", "--max-steps", "--cpu"]
    assert main(["train", "--recipe", "shapes-tiny", "--cpu"]) == 2
    assert '--cpu: only for fine-tuning recipes ("kind": "finetune"), not shapes-tiny' in capsys.readouterr().err
    assert main(["train", "--recipe", "vargpt-v1.1-paper", "--max-steps", "0"]) == 2
    assert "--max-steps must be a positive integer, got 0" in capsys.readouterr().err


def test_train_hands_the_shapes_judges_to_a_shapes_recipe_run(monkeypatch, tmp_path, capsys):
    from vargpt.shapes.recipe import ShapesScorer, detector_exact_match, validate_stage

    calls = []

    def run_recipe(spec, out, *, progress, judges):
        calls.append((spec.name, out, progress, judges))
        return {"stages": [{"stage": s.name} for s in spec.stages]}

    monkeypatch.setattr("vargpt.training.runner.run_recipe", run_recipe)
    assert main(["train", "--recipe", "shapes-tiny", "--out", str(tmp_path), "--quiet"]) == 0
    ((name, out, progress, judges),) = calls
    assert (name, out, progress) == ("shapes-tiny", str(tmp_path), False)
    assert isinstance(judges.scorer, ShapesScorer)
    assert judges.validate is validate_stage and judges.read_back is detector_exact_match
    assert f'"final": "{tmp_path}/final"' in capsys.readouterr().out


def test_dpo_pairs_flags_fill_the_config_with_the_shared_image_spellings(capsys):
    parser = build_parser()
    argv = ["dpo-pairs", "--prompts", "p.txt", "--model", "a", "--model", "b", "--out", "o", "--winners", "w"]
    argv += ["--preset", "paper", "--cfg-scale", "2", "--top-k", "3", "--resolution", "24", "--tau", "0.5"]
    argv += ["--uncond-mode", "null_prompt", "--revision", "v1", "--quiet"]
    environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    config = dpo_pairs_config_from_args(parser.parse_args(argv), environ)
    assert config.models == ["a", "b"] and (config.num_shards, config.shard_index) == (2, 1)
    assert config.settings == {"cfg_scale": 2.0, "tau": 0.5, "top_k": 3, "resolution": 24, "uncond_mode": "null_prompt"}
    assert config.preset == "paper" and config.load_kwargs == {"revision": "v1"} and not config.progress
    assert config.device == ("cuda:1" if torch.cuda.is_available() else None)
    assert dpo_pairs_config_from_args(parser.parse_args([*argv, "--device", "cpu"]), environ).device == "cpu"
    assert capsys.readouterr().err == ""
    # the old spelling still parses, with a line naming the new one
    config = dpo_pairs_config_from_args(parser.parse_args([*argv[:11], "--cfg", "1.5"]), {})
    assert config.settings == {"cfg_scale": 1.5} and (config.num_shards, config.shard_index) == (1, 0)
    assert "--cfg is now spelled --cfg-scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--position-mode", "cache"])  # dpo-pairs takes only the settings it passes on
    assert "error" in capsys.readouterr().err


def test_the_training_package_never_imports_the_command_line():
    """`vargpt.training` is the library the commands call: it reads no argparse namespace and imports no
    `vargpt.cli` module."""
    for path in Path(vargpt.training.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names = [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("..cli", "vargpt.cli", "argparse")), f"{path.name} imports {name}"


def test_importing_the_command_line_loads_no_training_code():
    """The server imports `vargpt.cli.options` (and with it `vargpt.cli`): the training modules, peft and
    `datasets` wait until a parser is built or a training command runs."""
    code = (
        "import sys\n"
        "import vargpt.cli.main, vargpt.cli.training\n"
        "print(sorted(m for m in sys.modules if m.startswith('vargpt.training') or m in ('peft', 'datasets')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_no_bf16_trains_a_shapes_recipe_in_full_precision(monkeypatch, tmp_path):
    specs = []

    def run_recipe(spec, out, *, progress, judges):
        specs.append(spec)
        return {"stages": []}

    monkeypatch.setattr("vargpt.training.runner.run_recipe", run_recipe)
    assert main(["train", "--recipe", "shapes-tiny", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["train", "--recipe", "shapes-tiny", "--out", str(tmp_path), "--quiet", "--no-bf16"]) == 0
    assert [spec.bf16 for spec in specs] == [True, False]
    assert specs[0].stages == specs[1].stages  # nothing else changes
