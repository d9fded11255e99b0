"""The README's examples, run as written, so they cannot rot.

Every fenced block in the sections "Main job", "Python API", "The command" and "The server" runs here, on the
tiny preset, in a scratch folder holding the files the examples name. The only rewrites are the ones a reader
makes too (listed in `SUBSTITUTIONS`: the checkpoint path, the server's port); each must still occur in the
README, so a stale rewrite fails instead of silently testing nothing. Every `vargpt` line of those sections
runs; `vargpt serve` starts the server the server section's examples then talk to.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live_server import free_port, running_server
from vargpt.cli.demo import demo_scene
from vargpt.cli.main import main
from vargpt.configuration import VARGPTConfig
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.shapes.dataset import write_sharegpt_dataset
from vargpt.tokenization import build_tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("Main job", "Python API", "The command", "The server")
CHECKPOINT = "tiny-checkpoint"
SUBSTITUTIONS = {
    "path/to/VARGPT-v1.1": CHECKPOINT,  # the published checkpoint is not downloadable here: a tiny one, same layout
    "--model DIR": f"--model {CHECKPOINT}",
}


def _sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section name (`SECTIONS` entries match a heading's start) -> its fenced blocks as (language, body)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for part in re.split(r"^(## .+)$", text, flags=re.MULTILINE):
        if part.startswith("## "):
            heading = part[3:].strip()
            current = next((name for name in SECTIONS if heading.startswith(name)), heading)
            sections[current] = []
        elif current is not None:
            sections[current] += re.findall(r"^```(\w*)\n(.*?)^```", part, flags=re.MULTILINE | re.DOTALL)
    return sections


def _commands(bash: str) -> list[list[str]]:
    joined = bash.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def blocks() -> dict[str, list[tuple[str, str]]]:
    text = README.read_text()
    for placeholder in SUBSTITUTIONS:
        assert placeholder in text, f"the README no longer says {placeholder!r}: update SUBSTITUTIONS"
    for placeholder, real in SUBSTITUTIONS.items():
        text = text.replace(placeholder, real)
    sections = _sections(text)
    missing = [name for name in SECTIONS if not sections.get(name)]
    assert not missing, f"README sections without examples: {missing}"
    return sections


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder with every file the examples name."""
    folder = tmp_path_factory.mktemp("readme")
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))
    model.save_pretrained(folder / CHECKPOINT)
    from vargpt.processing import VARGPTProcessor

    VARGPTProcessor.from_tokenizer(build_tiny_tokenizer()).save_pretrained(folder / CHECKPOINT)
    for name in ("cat.jpg", "fox.png", "scene.png"):
        demo_scene().save(folder / name)
    (folder / "prompts.txt").write_text("a photo of a red circle\na picture of two squares\n")
    write_sharegpt_dataset(folder / "runs" / "shapes-tiny" / "data", "test", 4, 4, 4, seed=0, image_size=32)
    return folder


def test_main_job_and_python_api(blocks, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (main_job,) = [body for lang, body in blocks["Main job"] if lang == "bash"]
    for argv in _commands(main_job):
        assert argv[0] == "vargpt"
        assert main(argv[1:]) == 0, argv
    assert (workdir / "vargpt-demo" / "report.html").is_file()

    python_blocks = [body for lang, body in blocks["Python API"] if lang == "python"]
    assert len(python_blocks) == 2
    pipeline_example, transformers_example = python_blocks
    namespace: dict = {}
    exec(compile(pipeline_example, "README: Python API", "exec"), namespace)
    assert len(namespace["turn"].text) > 0 or namespace["turn"].images
    namespace = {}
    exec(compile(transformers_example, "README: transformers layer", "exec"), namespace)
    out = namespace["out"]
    assert namespace["ids"].shape[0] == 1 and hasattr(out, "images")


def test_command_and_server_examples(blocks, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (command_block,) = [body for lang, body in blocks["The command"] if lang == "bash"]
    commands = _commands(command_block)
    assert all(argv[0] == "vargpt" for argv in commands)
    serve = [argv for argv in commands if argv[1] == "serve"]
    assert len(serve) == 1
    for argv in commands:
        if argv[1] == "serve":
            continue
        code = main(argv[1:])
        assert code == 0, f"`{shlex.join(argv)}` exited with {code}: {capsys.readouterr().err}"
    assert len(list((workdir / "gens").glob("*.png"))) >= 4
    assert json.loads((workdir / "report.json").read_text())["generation"]["n"] == 4
    assert (workdir / "geneval" / "00000" / "metadata.jsonl").is_file()
    assert (workdir / "bench.json").is_file()

    # `vargpt serve` exactly as written (port 8000 could be taken on a test machine: the one rewrite)
    port = free_port()
    argv = [a if a != "8000" else str(port) for a in serve[0]]
    with running_server([sys.executable, "-m", "vargpt.cli", *argv[1:]], port):
        python_blocks = [b for lang, b in blocks["The server"] if lang == "python"]
        bash_blocks = [b for lang, b in blocks["The server"] if lang == "bash"]
        assert len(python_blocks) == 1 and len(bash_blocks) == 1
        namespace: dict = {}
        exec(compile(python_blocks[0].replace(":8000", f":{port}"), "README: server client", "exec"), namespace)
        assert namespace["reply"].choices[0].message is not None
        assert namespace["image"].data[0].b64_json
        (curl,) = _commands(bash_blocks[0])
        curl = [a.replace(":8000", f":{port}") for a in curl]
        result = subprocess.run(curl, capture_output=True, check=True, timeout=60)
        assert json.loads(result.stdout)["data"][0]["b64_json"]
