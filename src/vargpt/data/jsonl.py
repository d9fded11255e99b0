"""Reading small JSON-lines files (benchmark prompts, evaluation splits) with errors that point at the line.

Training files go through `vargpt.data.formats`, which reads bytes and checks every row's schema; this reader
is for files whose rows the caller checks itself, so it only parses and numbers them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) of every non-blank line; a line that is not JSON is a ValueError
    naming the file and line, so a hand-edited prompt file fails where it is wrong."""
    source = Path(path)
    with source.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source} line {number}: not JSON ({err.msg})") from err
            yield number, value


def first_rows(rows: list[Any], limit: int | None) -> list[Any]:
    """The first `limit` rows (all of them for None); a limit below 1 is an error rather than an empty run."""
    if limit is None:
        return rows
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return rows[:limit]
