"""Loading by Hugging Face Hub repo id, without a network: checkpoints laid out in the Hub cache's own layout
(`models--owner--name/snapshots/<commit>/...` and `refs/<branch>` holding the commit), found offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from vargpt import VARGPTForConditionalGeneration, VARGPTPipeline, VARGPTProcessor
from vargpt.cli.main import main
from vargpt.hub import resolve_checkpoint, shipped_model_path

REPO = "vargpt-tests/tiny"
MAIN_COMMIT = "1" * 40
V2_COMMIT = "2" * 40


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here stays off the network; each names its cache explicitly or through the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints (init seeds 0 and 1) as folders, and both in a Hub cache: branch main -> seed 0,
    branch v2 -> seed 1."""
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for seed in (0, 1):
        folders[seed] = root / f"seed{seed}"
        VARGPTPipeline.from_pretrained("tiny", seed=seed, device="cpu").save_pretrained(folders[seed])
    cache = root / "cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for commit, seed, branch in ((MAIN_COMMIT, 0, "main"), (V2_COMMIT, 1, "v2")):
        shutil.copytree(folders[seed], repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return {"cache": cache, "main": folders[0], "v2": folders[1]}


def test_resolves_folders_shipped_models_and_cached_ids(hub):
    assert resolve_checkpoint(hub["main"]) == hub["main"]
    assert resolve_checkpoint("vargpt-shapes-tiny") == shipped_model_path("vargpt-shapes-tiny")
    snapshots = hub["cache"] / "models--vargpt-tests--tiny" / "snapshots"
    assert resolve_checkpoint(REPO, cache_dir=hub["cache"], local_files_only=True) == snapshots / MAIN_COMMIT
    assert resolve_checkpoint(REPO, cache_dir=hub["cache"], revision="v2") == snapshots / V2_COMMIT
    assert resolve_checkpoint(REPO, cache_dir=hub["cache"], revision=V2_COMMIT) == snapshots / V2_COMMIT


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_the_cache_named_by_the_environment_when_called(hub, monkeypatch, tmp_path, variable):
    if variable == "HF_HOME":
        (tmp_path / "hub").symlink_to(hub["cache"], target_is_directory=True)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
    else:
        monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    assert resolve_checkpoint(REPO).name == MAIN_COMMIT


@pytest.mark.parametrize("name", ["path/to/missing", "./x", "a/b/c"])
def test_a_name_that_is_no_folder_and_no_repo_id_is_one_clear_line(name):
    with pytest.raises(ValueError, match="nor a Hub repo id") as caught:
        resolve_checkpoint(name)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(name) and "vargpt-shapes-tiny" in message


def test_presets_files_and_folders_without_config_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="tiny is a preset"):
        resolve_checkpoint("tiny")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        resolve_checkpoint(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json") as caught:
        resolve_checkpoint(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_an_id_not_cached_offline_fails_at_once_saying_what_to_do(tmp_path):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError) as caught:
        resolve_checkpoint("vargpt-tests/not-cached", cache_dir=tmp_path)
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "\n" not in message and message.startswith("vargpt-tests/not-cached")
    assert "offline" in message and "hf download vargpt-tests/not-cached" in message and "local" in message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (LocalEntryNotFoundError("no cache"), r"unreachable \(ConnectError\)"),
        (
            RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "http://h"))),
            "check the name",
        ),
        (
            RevisionNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "http://h"))),
            "no revision v9",
        ),
    ],
)
def test_hub_failures_become_one_line_file_not_found_errors(monkeypatch, tmp_path, error, expected):
    """What the Hub answers online (unreachable, no such repo, no such revision), simulated."""

    def fail(*args, **kwargs):
        raise error from httpx2.ConnectError("name or service not known")

    monkeypatch.setattr("vargpt.hub.snapshot_download", fail)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(FileNotFoundError, match=expected) as caught:
        resolve_checkpoint(REPO, revision="v9", cache_dir=tmp_path, local_files_only=False)
    assert "\n" not in str(caught.value) and REPO in str(caught.value)


def test_model_processor_and_pipeline_load_an_id_as_they_load_its_folder(hub):
    kwargs = {"cache_dir": hub["cache"], "local_files_only": True}
    by_id = VARGPTForConditionalGeneration.from_pretrained(REPO, **kwargs)
    by_folder = VARGPTForConditionalGeneration.from_pretrained(hub["main"])
    expected = by_folder.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in by_id.state_dict().items())
    processors = [VARGPTProcessor.from_pretrained(REPO, **kwargs), VARGPTProcessor.from_pretrained(hub["main"])]
    ids = [p(text=["a red circle"], return_tensors="pt")["input_ids"] for p in processors]
    assert torch.equal(ids[0], ids[1]) and processors[0].chat_template == processors[1].chat_template

    image = VARGPTPipeline.from_pretrained(REPO, device="cpu", **kwargs).generate("a red circle", seed=0)[0]
    expected = VARGPTPipeline.from_pretrained(hub["main"], device="cpu").generate("a red circle", seed=0)[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_revision_picks_the_other_snapshot(hub):
    v2 = VARGPTForConditionalGeneration.from_pretrained(REPO, cache_dir=hub["cache"], revision="v2")
    folder = VARGPTForConditionalGeneration.from_pretrained(hub["v2"])
    main_ = VARGPTForConditionalGeneration.from_pretrained(hub["main"])
    weight = "lm_head.weight"
    assert torch.equal(v2.state_dict()[weight], folder.state_dict()[weight])
    assert not torch.equal(v2.state_dict()[weight], main_.state_dict()[weight])


def test_commands_take_an_id_and_a_revision(hub, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    drawn = {}
    for label, model, extra in (
        ("id", REPO, []),
        ("folder", str(hub["main"]), []),
        ("v2", REPO, ["--revision", "v2"]),
        ("v2-folder", str(hub["v2"]), []),
    ):
        out = tmp_path / label
        assert main(["generate", "a red circle", "--model", model, *extra, "--seed", "0", "--out", str(out)]) == 0
        drawn[label] = (out / "0000.png").read_bytes()
    assert drawn["id"] == drawn["folder"] and drawn["v2"] == drawn["v2-folder"] and drawn["id"] != drawn["v2"]
    assert main(["inspect", REPO]) == 0
    assert "layout: matches" in capsys.readouterr().out
