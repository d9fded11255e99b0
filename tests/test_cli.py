"""The `vargpt` command's demo and inspect on the tiny preset."""

from __future__ import annotations

from vargpt.cli import main
from vargpt.configuration import VARGPTConfig
from vargpt.modeling import VARGPTForConditionalGeneration


def test_demo_writes_a_self_contained_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 * 4 + 1 + 2  # 3 prompts x 4 images, the question, edit
    assert "report written" in capsys.readouterr().out


def test_inspect_lists_modules_and_layout(tmp_path, capsys):
    VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for module in ("vargpt_gen", "vae_local", "visual", "model", "sos_embedding"):
        assert module in out
    assert "matches the model" in out and "bf16" in out


def test_inspect_full_size_preset_counts(capsys):
    assert main(["inspect", "--preset", "vargpt-v1.1"]) == 0
    out = capsys.readouterr().out
    assert "10,948,528,387" in out  # parameters plus persistent buffers, as the published tensor list counts


def test_errors_exit_non_zero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_quiet_commands_draw_no_progress_bars(tmp_path, capfd):
    """--quiet hides our bars and transformers' own (loading the checkpoint)."""
    from transformers.utils import logging as hf_logging

    from vargpt.data.shapes_dataset import write_sharegpt_dataset

    data = write_sharegpt_dataset(tmp_path / "data", "validation", 2, 2, 1, seed=3)
    try:
        code = main(["eval", "shapes", "--data", str(data), "--split", "validation", "--quiet"])
    finally:
        hf_logging.enable_progress_bar()
    assert code == 0
    err = capfd.readouterr().err
    assert "it/s]" not in err and "s/it]" not in err, err[-500:]
    try:  # training too: the Trainer's bar and the checkpoint writer's
        args = ["finetune", "--model", "tiny", "--data", str(data), "--stage", "edit", "--steps", "2"]
        code = main([*args, "--batch-size", "1", "--out", str(tmp_path / "ft"), "--quiet"])
    finally:
        hf_logging.enable_progress_bar()
    assert code == 0
    err = capfd.readouterr().err
    assert "it/s]" not in err and "s/it]" not in err, err[-500:]
