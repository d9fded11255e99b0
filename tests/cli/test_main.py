"""The `vargpt` command's demo and inspect on the tiny preset."""

from __future__ import annotations

from vargpt.cli.main import main
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


def test_inspect_takes_shipped_models_and_presets_by_name_and_shows_small_sizes_in_mib(capsys):
    assert main(["inspect", "vargpt-shapes-tiny"]) == 0
    out = capsys.readouterr().out
    assert "layout: matches" in out and "fp32 13.5 MiB" in out and "0.0 GiB" not in out
    assert main(["inspect", "tiny"]) == 0
    assert "preset tiny (architecture, no weights)" in capsys.readouterr().out


def test_inspect_names_a_bad_checkpoint_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an uncached id fails from the cache alone
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for name, expected in (
        ("path/to/missing", "path/to/missing is not a checkpoint folder, shipped model or preset"),
        (str(tmp_path), f"{tmp_path} has no config.json"),
        ("someone/not-cached", "hf download someone/not-cached"),
    ):
        assert main(["inspect", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vargpt: error: ") and expected in err and err.count("\n") == 1, err


def test_quiet_commands_draw_no_progress_bars(tmp_path, capfd):
    """--quiet hides our bars and transformers' own (loading the checkpoint)."""
    from transformers.utils import logging as hf_logging

    from vargpt.shapes.dataset import write_sharegpt_dataset

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
