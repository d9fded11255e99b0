"""Checkpoint helpers on small modules: leftovers of interrupted atomic saves, the non-finite weight check."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from vargpt.checkpoint import atomic_directory_write, non_finite_tensors, remove_staging_folders


def _leftover(parent: Path, target: str, kind: str) -> Path:
    """A staging folder named exactly as `atomic_directory_write` names them, as a SIGKILL mid-save leaves it."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target}.{kind}-", dir=parent))
    (folder / "model.safetensors").write_bytes(b"half written")
    return folder


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tmp_path):
    stale = [_leftover(tmp_path, "checkpoint-4", "writing"), _leftover(tmp_path, "final", "old")]
    kept = [tmp_path / "checkpoint-4", tmp_path / ".cache", tmp_path / ".final.writing-notes-by-hand"]
    for folder in kept:
        folder.mkdir()
    (tmp_path / ".x.writing-abcd1234").write_text("a file, not a staging folder")
    assert sorted(remove_staging_folders(tmp_path)) == sorted(stale)
    assert all(not folder.exists() for folder in stale) and all(folder.is_dir() for folder in kept)
    assert (tmp_path / ".x.writing-abcd1234").is_file()
    assert remove_staging_folders(tmp_path / "absent") == []


def test_a_save_killed_between_its_two_renames_gets_its_previous_version_back(tmp_path):
    retired = _leftover(tmp_path, "model", "old")
    (retired / "model").mkdir()
    (retired / "model" / "weights").write_text("previous, complete")
    remove_staging_folders(tmp_path)
    assert (tmp_path / "model" / "weights").read_text() == "previous, complete"
    assert not retired.exists()


def test_atomic_write_leaves_no_staging_folder(tmp_path):
    atomic_directory_write(tmp_path / "out", lambda staging: (staging / "a").write_text("1"))
    atomic_directory_write(tmp_path / "out", lambda staging: (staging / "a").write_text("2"))
    assert (tmp_path / "out" / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_finite_tensors_are_named_and_other_kinds_skipped():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.register_buffer("mask", torch.arange(4))  # an integer buffer: nothing to check
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
        model[1].bias[0] = float("inf")
    assert non_finite_tensors(model) == ["0.weight", "1.bias"]
    with torch.device("meta"):
        assert non_finite_tensors(nn.Linear(4, 4)) == []  # nothing loaded, nothing to check
    half = nn.Linear(2, 2).to(torch.bfloat16)
    with torch.no_grad():
        half.weight[0, 0] = float("-inf")
    assert non_finite_tensors(half) == ["weight"]
    empty = nn.Module()
    empty.register_parameter("weight", nn.Parameter(torch.empty(0)))
    assert non_finite_tensors(empty) == []


def test_converting_loads_read_shards_without_a_memory_map_and_get_the_same_weights(tmp_path):
    """A bf16 checkpoint loaded as fp32 goes through `ShardReader` (pread); it must give exactly the weights of
    the memory-mapped bf16 load, cast."""
    from vargpt import VARGPTConfig, VARGPTForConditionalGeneration
    from vargpt.checkpoint import ShardReader

    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2
    with ShardReader(tmp_path) as shards:
        assert set(shards.state_dict) == set(model.state_dict())
    assert shards.state_dict == {} and shards.handles == []
    mapped = VARGPTForConditionalGeneration.from_pretrained(tmp_path)  # stored dtype: the memory-mapped path
    converted = VARGPTForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert converted.name_or_path == str(tmp_path)
    reference = mapped.state_dict()
    for name, tensor in converted.state_dict().items():
        assert tensor.dtype == (torch.float32 if tensor.is_floating_point() else reference[name].dtype), name
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name
