"""Checking a checkpoint directory against the model a config describes, before loading any weight.

The published checkpoint is sharded safetensors with an index, in bf16, under the original tensor names.
Reading only the safetensors headers lets us name every missing, unexpected, mis-shaped or wrongly typed tensor in
one error, in a second, instead of failing deep inside a load of 22 GB. What headers cannot show, NaN or infinite
weights, `non_finite_tensors` finds after loading in one cheap pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The temporary siblings `atomic_directory_write` makes: `tempfile.mkdtemp` appends 8 of [a-z0-9_].
_STAGING_FOLDER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>writing|old)-[a-z0-9_]{8}$")
# The safetensors dtypes a tensor may have on disk, by the kind of tensor the model holds there. Any float width
# loads into a float weight (transformers casts it); an integer or boolean buffer keeps its kind. 8-bit floats are
# refused: `dtype="auto"` would keep them, and no layer here computes in them.
ACCEPTED_DTYPES: dict[str, tuple[str, ...]] = {
    "float": ("F16", "BF16", "F32", "F64"),
    "integer": ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"),
    "bool": ("BOOL",),
}


class CheckpointMismatchError(ValueError):
    """The tensors on disk do not match the model the configuration describes."""


@dataclass
class CheckpointReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    wrong_dtype: list[tuple[str, str, str]] = field(default_factory=list)  # name, dtype on disk, kind the model needs
    dtypes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                lines.append(f"{len(items)} {title} tensor(s): {shown}")
        if self.mismatched:
            shown = "; ".join(f"{n}: checkpoint {list(a)} vs model {list(b)}" for n, a, b in self.mismatched[:limit])
            lines.append(f"{len(self.mismatched)} tensor(s) with wrong shape: {shown}")
        if self.wrong_dtype:
            shown = "; ".join(
                f"{n}: {dtype}, needs {kind} ({'/'.join(ACCEPTED_DTYPES[kind])})"
                for n, dtype, kind in self.wrong_dtype[:limit]
            )
            lines.append(f"{len(self.wrong_dtype)} tensor(s) in a dtype the model cannot use: {shown}")
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


class ShardReader:
    """Every tensor of a checkpoint as a lazy slice read with `pread`, not through a memory map.

    transformers memory-maps every shard and unmaps them only when the whole model has loaded, so each page
    it touched stays in the process's resident set until then. When loading converts the weights (to int8 or
    4 bits, or to another dtype) that adds the original bytes of everything read so far to the converted copy:
    a 22 GB bf16 checkpoint quantized to int8 peaked at 19 GiB. Read with `pread`, a tensor's bytes live only
    until it is converted. Use as a context manager; `state_dict` maps names to slices.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = directory
        self.handles: list = []
        self.state_dict: dict = {}

    def __enter__(self) -> ShardReader:
        for path in checkpoint_files(self.directory):
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
            self.handles.append(handle)
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.state_dict[name] = handle.get_slice(name)
        return self

    def __exit__(self, *exc_info) -> None:
        self.state_dict.clear()
        for handle in self.handles:
            handle.__exit__(None, None, None)
        self.handles.clear()


def release_freed_memory() -> None:
    """Hand memory freed inside the process back to the operating system (glibc's `malloc_trim`).

    A converting load frees one read buffer per tensor; glibc keeps much of that in its heap afterwards: 1.5 GB
    of the 15.1 GB resident after an int8 load of the full-size model. Elsewhere (no glibc) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def read_tensor_headers(directory: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shape and safetensors dtype ("BF16", "I64", ...) of every tensor on disk, from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    piece = handle.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    dtypes[name] = str(piece.get_dtype())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointMismatchError(f"{path.name} is not a readable safetensors file: {err}") from err
    return shapes, dtypes


def read_tensor_shapes(directory: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Names and shapes of every tensor on disk (headers only), plus a count of tensors per dtype."""
    shapes, dtypes = read_tensor_headers(directory)
    return shapes, dict(Counter(dtypes.values()))


def dtype_kind(dtype: torch.dtype) -> str:
    """The kind of a model tensor ("float", "bool" or "integer"), which decides what it loads from (see
    `ACCEPTED_DTYPES`)."""
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


def expected_tensor_layout(
    model_factory: Callable[[], torch.nn.Module],
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shape and `dtype_kind` of every state-dict tensor of the model, built on the meta device (no memory,
    seconds even at full size).

    Under DeepSpeed ZeRO-3 transformers partitions every sub-model built with `_from_config`, which a meta
    build cannot take: its ZeRO-3 state marks the build as already inside a partitioned init, so nothing is."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.modeling_utils import set_zero3_state

    with torch.device("meta"), set_zero3_state() if is_deepspeed_zero3_enabled() else contextlib.nullcontext():
        model = model_factory()
    state = model.state_dict()
    return {n: tuple(t.shape) for n, t in state.items()}, {n: dtype_kind(t.dtype) for n, t in state.items()}


def expected_tensor_shapes(model_factory: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Build the model on the meta device (no memory, seconds even at full size) and list its state dict."""
    return expected_tensor_layout(model_factory)[0]


def compare(
    on_disk: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    on_disk_dtypes: dict[str, str] | None = None,
    expected_kinds: dict[str, str] | None = None,
) -> CheckpointReport:
    """Missing, unexpected and mis-shaped tensors; with both dtype maps, also tensors whose dtype on disk is not
    of the kind the model holds there (a weight rewritten as BOOL / I64 / U8 would otherwise load silently)."""
    report = CheckpointReport()
    if on_disk_dtypes is not None:
        report.dtypes = dict(Counter(on_disk_dtypes.values()))
    if on_disk_dtypes is not None and expected_kinds is not None:
        report.wrong_dtype = sorted(
            (name, on_disk_dtypes[name], kind)
            for name, kind in expected_kinds.items()
            if name in on_disk_dtypes and on_disk_dtypes[name] not in ACCEPTED_DTYPES[kind]
        )
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


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers that hold a NaN or an infinity.

    Headers cannot show these, and a NaN weight otherwise surfaces much later as a vague sampling error. The check
    is one read of each tensor with no temporary (`torch.aminmax`: NaN or +-inf makes its minimum or maximum
    non-finite), about 10x faster than `isfinite(...).all()`. Meta tensors (offloaded or never loaded), empty ones
    and integer storage (quantized weights) are skipped, as are tensor types that cannot compute it.
    """
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not tensor.is_meta and tensor.numel() and not _all_finite(tensor):
            found.append(name)
    return found


def check_finite(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Raise one `CheckpointMismatchError` naming every tensor of a just-loaded model that holds NaN or inf."""
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        raise CheckpointMismatchError(
            f"checkpoint {source} holds NaN or infinite values in {len(bad)} tensor(s): {shown}"
        )


def _all_finite(tensor: torch.Tensor) -> bool:
    try:
        low, high = torch.aminmax(tensor.detach())
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without the kernel
        return True
    return bool(torch.isfinite(low) & torch.isfinite(high))
