"""Checking a checkpoint directory against the model a config describes, before loading any weight.

The published checkpoint is sharded safetensors with an index, in bf16, under the original tensor names.
Reading only the safetensors headers lets us name every missing, unexpected or mis-shaped tensor in one
error, in a second, instead of failing deep inside a load of 22 GB.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The temporary siblings `atomic_directory_write` makes: `tempfile.mkdtemp` appends 8 of [a-z0-9_].
_STAGING_FOLDER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>writing|old)-[a-z0-9_]{8}$")


class CheckpointMismatchError(ValueError):
    """The tensors on disk do not match the model the configuration describes."""


@dataclass
class CheckpointReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                lines.append(f"{len(items)} {title} tensor(s): {shown}")
        if self.mismatched:
            shown = "; ".join(f"{n}: checkpoint {list(a)} vs model {list(b)}" for n, a, b in self.mismatched[:limit])
            lines.append(f"{len(self.mismatched)} tensor(s) with wrong shape: {shown}")
        return "\n".join(lines)


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or index + shards)."""
    root = Path(directory)
    if (root / INDEX_FILE).is_file():
        try:
            index = json.loads((root / INDEX_FILE).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointMismatchError(f"{INDEX_FILE} in {root} is not a valid safetensors index: {err}") from err
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointMismatchError(f"the index of {root} names shard files that are absent: {missing}")
        return [root / s for s in shards]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CheckpointMismatchError(
            f"{root} holds only pickle weights; vargpt loads safetensors only (convert them with a trusted tool)"
        )
    raise CheckpointMismatchError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")


def read_tensor_shapes(directory: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Names and shapes of every tensor on disk (headers only), plus a count of tensors per dtype."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    piece = handle.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    dtype = str(piece.get_dtype())
                    dtypes[dtype] = dtypes.get(dtype, 0) + 1
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointMismatchError(f"{path.name} is not a readable safetensors file: {err}") from err
    return shapes, dtypes


def expected_tensor_shapes(model_factory: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Build the model on the meta device (no memory, seconds even at full size) and list its state dict."""
    with torch.device("meta"):
        model = model_factory()
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def compare(on_disk: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> CheckpointReport:
    report = CheckpointReport()
    report.missing = sorted(set(expected) - set(on_disk))
    report.unexpected = sorted(set(on_disk) - set(expected))
    report.mismatched = sorted(
        (name, on_disk[name], expected[name])
        for name in set(on_disk) & set(expected)
        if on_disk[name] != expected[name]
    )
    return report


def atomic_directory_write(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write a directory completely in a temporary sibling, then swap it into place.

    A crash mid-save leaves the previous checkpoint (or nothing) at `target`, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_staging_folders(directory: str | os.PathLike) -> list[Path]:
    """Delete what `atomic_directory_write` leaves in `directory` when its process is killed mid-save.

    A SIGKILL skips the cleanup, so `.NAME.writing-XXXXXXXX` (a partial new version) and `.NAME.old-XXXXXXXX` (the
    retired previous version) would pile up forever. Only folders named exactly so are touched. If the kill fell
    between the two renames, `NAME` itself is missing and the retired copy is its last complete version, so that
    copy is moved back first. Call this when a run starts or resumes, never while a save into `directory` may be
    running. Returns the removed folders.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        match = _STAGING_FOLDER.match(child.name)
        if match is None or child.is_symlink() or not child.is_dir():
            continue
        if match["kind"] == "old":
            _restore_retired(child, root / match["target"])
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    return removed


def _restore_retired(retired: Path, target: Path) -> None:
    """Move a retired version back to `target` when the swap that retired it never completed."""
    previous = retired / target.name
    if previous.is_dir() and not target.exists():
        os.replace(previous, target)
