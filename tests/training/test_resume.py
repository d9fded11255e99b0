"""Resuming only from complete checkpoints, and cleaning what killed saves leave behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

from vargpt.training.resume import COMPLETE_MARKER, last_complete_checkpoint


def _checkpoint(root: Path, step: int, complete: bool) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    if complete:
        (folder / COMPLETE_MARKER).touch()
    return folder


def test_resume_picks_the_newest_complete_checkpoint_and_removes_leftovers(tmp_path):
    done = _checkpoint(tmp_path, 2, complete=True)
    half = _checkpoint(tmp_path, 4, complete=False)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-4.writing-", dir=tmp_path))  # SIGKILL during the save
    assert last_complete_checkpoint(tmp_path) == done
    assert not half.exists() and not staging.exists()


def test_without_removal_nothing_is_deleted(tmp_path):
    half = _checkpoint(tmp_path, 4, complete=False)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-4.writing-", dir=tmp_path))
    assert last_complete_checkpoint(tmp_path, remove_incomplete=False) is None
    assert half.exists() and staging.exists()
