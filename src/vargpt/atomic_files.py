"""Files that are either absent or complete: written under a temporary name, then renamed into place.

A run that is killed (or a disk that fills) midway leaves no half-written PNG or JSON where a resumed run or a
scorer would take it for a finished one. Folders (checkpoints) have their own version in `vargpt.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image


def _temporary_name(path: Path) -> Path:
    # A leading dot keeps half-written files out of GenEval's `\d+\.png` and DPG-Bench's `<id>.png` patterns.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_png_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG so that `path` is either absent or complete."""
    temporary = _temporary_name(path)
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def write_text_atomic(text: str, path: Path) -> None:
    temporary = _temporary_name(path)
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_jsonl_atomic(rows: Iterable[Any], path: str | os.PathLike) -> Path:
    """One JSON line per row, written atomically (its folder created), as scorers write their results."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic("".join(json.dumps(row) + "\n" for row in rows), target)
    return target
