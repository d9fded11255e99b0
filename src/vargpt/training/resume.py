"""Resumable training: only checkpoints that were written completely are ever resumed from.

transformers' `Trainer` writes `checkpoint-N/` file by file; a process killed mid-save leaves a folder that
`get_last_checkpoint` would happily pick. We mark a checkpoint complete (an empty `COMPLETE` file written
after everything else, then fsync'd) and resume only from marked ones, deleting unmarked leftovers, and the
staging folders that a save killed inside `save_pretrained` (an atomic directory write) leaves beside them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from ..checkpoint import remove_staging_folders

COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointCallback(TrainerCallback):
    """Writes the completion marker once `Trainer` has finished saving a checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder)
        return control


def mark_complete(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    marker = folder / COMPLETE_MARKER
    with open(marker, "w") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def last_complete_checkpoint(output_dir: str | os.PathLike, remove_incomplete: bool = True) -> Path | None:
    """The newest `checkpoint-N` holding the marker; incomplete ones and staging leftovers are removed (or
    ignored). Removal belongs to the one process that starts or resumes the run, before it trains."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    if remove_incomplete:
        remove_staging_folders(root)
    found: list[tuple[int, Path]] = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if not match or not child.is_dir():
            continue
        if (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
        elif remove_incomplete:
            shutil.rmtree(child, ignore_errors=True)
    return max(found)[1] if found else None
