"""`vargpt chat | generate | edit` as a user runs them, on the tiny preset (named: the default model is the
shipped shapes model when present)."""

from __future__ import annotations

import argparse
import io
import json
import sys

import pytest
from PIL import Image

from vargpt import VARGPTPipeline
from vargpt.cli.demo import demo_scene
from vargpt.cli.inference import register_commands, run_chat


def vargpt(argv: list[str]) -> int:
    """The `vargpt` entry point's contract: handlers' exit codes, 2 for user errors."""
    parser = argparse.ArgumentParser(prog="vargpt")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"vargpt: error: {error}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained("tiny")


class _Recorder(io.StringIO):
    """stdout that remembers each write, to see that the answer arrives piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _chat_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["chat", "--model", "tiny", *argv])


def test_one_shot_chat_streams_the_answer_token_by_token(pipe):
    out = _Recorder()
    assert run_chat(_chat_args(["hello there", "--max-new-tokens", "12"]), stdout=out) == 0
    expected = pipe.converse("hello there", max_new_tokens=12, seed=0).text
    assert out.getvalue() == expected + "\n"
    assert len([w for w in out.writes if w]) > 3  # streamed, not printed at the end in one piece


def test_interactive_chat_keeps_history_saves_drawn_images_and_stops_at_exit(tmp_path, pipe):
    stdin = io.StringIO("draw a cat\n\nhello\n/exit\nnever read\n")
    out = _Recorder()
    args = _chat_args(["--temperature", "1", "--max-new-tokens", "64", "--out", str(tmp_path / "drawn")])
    assert run_chat(args, stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    saved = sorted((tmp_path / "drawn").glob("*.png"))
    # seed 0 at temperature 1 makes the tiny model draw during turn 1 (found by trying seeds)
    assert saved and all(p.name.startswith("turn001-") for p in saved)
    for path in saved:
        assert f"[image saved: {path}]" in text
        assert Image.open(path).size == (32, 32)
    assert "[drawing an image]" in text
    first_turn = pipe.converse("draw a cat", seed=0, max_new_tokens=64, do_sample=True, temperature=1.0)
    assert len(first_turn.images) == len(saved)
    assert stdin.readline() == "never read\n"  # nothing after /exit was consumed


def test_a_second_chat_run_does_not_overwrite_the_first_runs_images(tmp_path, pipe):
    args = _chat_args(["--temperature", "1", "--max-new-tokens", "64", "--out", str(tmp_path / "drawn")])
    assert run_chat(args, stdin=io.StringIO("draw a cat\n"), stdout=io.StringIO()) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "drawn").glob("*.png")}
    assert first and all(name.startswith("turn001-") for name in first)
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("draw a cat\n"), stdout=out) == 0
    second = sorted(set(p.name for p in (tmp_path / "drawn").glob("*.png")) - set(first))
    assert len(second) == len(first) and all(name.startswith("turn002-") for name in second)
    assert all((tmp_path / "drawn" / name).read_bytes() == data for name, data in first.items())
    assert f"[image saved: {tmp_path / 'drawn' / second[0]}]" in out.getvalue()


def test_chat_errors_exit_2(tmp_path, capsys):
    assert vargpt(["chat", "   "]) == 2
    assert "empty" in capsys.readouterr().err
    assert vargpt(["chat", "what is this?", "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    assert vargpt(["chat", "what is this?", "--image", str(broken)]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_generate_batches_and_records_every_setting(tmp_path, pipe):
    out = tmp_path / "gen"
    argv = [
        "generate",
        "a red circle",
        "--model",
        "tiny",
        "-n",
        "3",
        "--batch-size",
        "2",
        "--seed",
        "4",
        "--cfg-scale",
        "2.0",
    ]
    assert vargpt([*argv, "--top-p", "0.9", "--out", str(out)]) == 0
    record = json.loads((out / "generations.json").read_text())
    assert record["image_settings"]["cfg_scale"] == 2.0 and record["image_settings"]["top_p"] == 0.9
    assert record["image_settings"]["resolution"] == 32 and record["model"]["name"] == "tiny"
    images = record["images"]
    assert [(r["prompt_index"], r["sample"], r["batch"], r["row"]) for r in images] == [
        (0, 0, 0, 0),
        (0, 1, 0, 1),
        (0, 2, 1, 0),
    ]
    for entry in images:  # each image is reproduced from what the record says
        again = pipe.generate(entry["batch_prompts"], seed=entry["batch_seed"], **record["image_settings"])
        assert Image.open(out / entry["file"]).tobytes() == again[entry["row"]].tobytes()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 36 + 4, 36 + 4)


def test_generate_reads_prompt_files(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle\n\na blue square\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a green triangle"}\n{"prompt": "two circles", "id": 7}\n')
    for source, expected in ((lines, ["a red circle", "a blue square"]), (jsonl, ["a green triangle", "two circles"])):
        out = tmp_path / source.suffix[1:]
        assert vargpt(["generate", "--prompts", str(source), "--out", str(out)]) == 0
        record = json.loads((out / "generations.json").read_text())
        assert [r["prompt"] for r in record["images"]] == expected
        assert len(list(out.glob("0*.png"))) == 2


def test_generate_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "never")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    cases = [
        (["generate", "  ", "--out", out], "empty"),
        (["generate", "--out", out], "exactly one"),
        (["generate", "x", "--prompts", str(bad_json), "--out", out], "exactly one"),
        (["generate", "--prompts", str(tmp_path / "none.txt"), "--out", out], "none.txt"),
        (["generate", "--prompts", str(bad_json), "--out", out], "line 2"),
        (["generate", "x", "--resolution", "100", "--out", out], "--resolution 100"),
        (["generate", "x", "--resolution", "-3", "--out", out], "--resolution"),
        (["generate", "x", "--preset", "fast", "--out", out], "unknown image preset"),
        (["generate", "x", "--tau", "0", "--out", out], "tau"),
        (["generate", "x", "-n", "0", "--out", out], "-n"),
    ]
    for argv, message in cases:
        assert vargpt(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "never").exists()


def test_edit_writes_the_edited_image(tmp_path, pipe):
    scene = tmp_path / "scene.png"
    demo_scene().save(scene)
    out = tmp_path / "out" / "edited.png"
    assert (
        vargpt(["edit", str(scene), "make the circle blue", "--model", "tiny", "--seed", "3", "--out", str(out)]) == 0
    )
    expected = pipe.edit(demo_scene(), "make the circle blue", seed=3)
    assert Image.open(out).tobytes() == expected.tobytes()
    assert vargpt(["edit", str(tmp_path / "nope.png"), "make it blue"]) == 2
    assert vargpt(["edit", str(scene), " ", "--out", str(out)]) == 2


def test_serve_refuses_bad_options_before_loading_the_model(capsys):
    with pytest.raises(SystemExit):  # removed: images come as data URLs only
        vargpt(["serve", "--allow-remote-images"])
    assert "unrecognized arguments" in capsys.readouterr().err
    assert vargpt(["serve", "--max-prompt-chars", "0"]) == 2
    assert "max_prompt_chars" in capsys.readouterr().err
    assert vargpt(["serve", "--queue-size", "0"]) == 2
    assert "--queue-size" in capsys.readouterr().err
    assert vargpt(["serve", "--timeout", "0"]) == 2
    assert "timeout" in capsys.readouterr().err


def test_generate_takes_the_unconditional_branch_mode(tmp_path, pipe):
    out = tmp_path / "null"
    argv = ["generate", "a red circle", "--model", "tiny", "--uncond-mode", "null_prompt", "--cfg-scale", "3"]
    assert vargpt([*argv, "--out", str(out)]) == 0
    record = json.loads((out / "generations.json").read_text())
    assert record["image_settings"]["uncond_mode"] == "null_prompt"
    entry = record["images"][0]
    again = pipe.generate(entry["batch_prompts"], seed=entry["batch_seed"], **record["image_settings"])
    assert Image.open(out / entry["file"]).tobytes() == again[entry["row"]].tobytes()


def test_commands_load_quantized_or_spread_over_cpu_and_disk(tmp_path, pipe, capsys):
    """--quantize and --device-map / --max-memory / --offload-folder reach the loader (a 1 MB CPU budget cannot
    hold the tiny model, so without the disk split it would refuse); the dispatched model's images equal the
    plain one's."""
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    assert vargpt(["generate", "a red circle", "--model", str(model), "--out", str(tmp_path / "plain")]) == 0
    spread = [
        *("--device-map", "auto", "--max-memory", "cpu=1MB", "disk=1GB"),
        *("--offload-folder", str(tmp_path / "offload")),
    ]
    assert vargpt(["generate", "a red circle", "--model", str(model), "--out", str(tmp_path / "spread"), *spread]) == 0
    files = [
        json.loads((tmp_path / d / "generations.json").read_text())["images"][0]["file"] for d in ("plain", "spread")
    ]
    plain, dispatched = (Image.open(tmp_path / d / f) for d, f in zip(("plain", "spread"), files, strict=True))
    assert plain.tobytes() == dispatched.tobytes()
    assert vargpt(["chat", "hello", "--model", str(model), "--quantize", "int8", "--max-new-tokens", "3"]) == 0


def test_loading_options_that_cannot_apply_exit_2(tmp_path, capsys):
    assert vargpt(["chat", "hi", "--model", "tiny", "--quantize", "int4"]) == 2
    assert "preset 'tiny' is built in memory" in capsys.readouterr().err
    assert vargpt(["chat", "hi", "--model", "tiny", "--max-memory", "cpu=1GB"]) == 2
    assert "--max-memory needs --device-map auto" in capsys.readouterr().err
    assert vargpt(["chat", "hi", "--model", "tiny", "--device-map", "auto", "--max-memory", "lots"]) == 2
    assert "DEVICE=SIZE" in capsys.readouterr().err


@pytest.mark.parametrize("leave", ["/exit", "/quit", "exit", "Quit", "exit()"])
def test_interactive_chat_opens_with_a_banner_and_leaves_without_a_turn(tmp_path, capsys, leave):
    stdin = io.StringIO(f"{leave}\nnever read\n")
    out = io.StringIO()
    args = _chat_args(["--max-new-tokens", "4", "--out", str(tmp_path / "drawn")])
    assert run_chat(args, stdin=stdin, stdout=out) == 0
    banner = [line for line in capsys.readouterr().err.splitlines() if "/exit" in line]
    assert banner == ["Chatting with tiny. Type /exit or /quit (or press Ctrl-D) to leave."]
    assert out.getvalue() == ""  # no answer, no drawing
    assert not (tmp_path / "drawn").exists()
    assert stdin.readline() == "never read\n"


def test_interactive_chat_ends_at_end_of_input_after_its_turns(tmp_path, capsys):
    out = io.StringIO()
    args = _chat_args(["--max-new-tokens", "4", "--no-images", "--out", str(tmp_path / "drawn")])
    assert run_chat(args, stdin=io.StringIO("what is exit?\n"), stdout=out) == 0
    assert out.getvalue().count("\n") == 1  # one turn: a line containing "exit" is a prompt like any other
    assert "to leave" in capsys.readouterr().err
    assert run_chat(args, stdin=io.StringIO(""), stdout=out) == 0  # EOF at once: banner, then nothing
    assert out.getvalue().count("\n") == 1


def test_a_one_shot_chat_prints_no_banner(capsys):
    assert run_chat(_chat_args(["hello", "--max-new-tokens", "2"]), stdout=io.StringIO()) == 0
    assert "to leave" not in capsys.readouterr().err


def test_chat_answers_about_a_video_file(tmp_path, pipe, capsys):
    from tests.clips import moving_square, write_clip
    from vargpt.video_io import load_video

    clip = write_clip(tmp_path / "clip.mkv", moving_square(25))
    out = io.StringIO()
    assert run_chat(_chat_args(["what moves?", "--video", str(clip), "--max-new-tokens", "4"]), stdout=out) == 0
    expected = pipe.converse("what moves?", videos=[load_video(clip)], max_new_tokens=4, seed=0).text
    assert out.getvalue() == expected + "\n"
    assert vargpt(["chat", "what moves?", "--video", str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4" in capsys.readouterr().err
    picture = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert vargpt(["chat", "what moves?", "--video", str(picture)]) == 2
    assert "not a video" in capsys.readouterr().err
