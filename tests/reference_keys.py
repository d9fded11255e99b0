"""The published checkpoint's tensor list (names, shapes, dtypes), the contract for loading it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

KEYS_FILE = Path(__file__).parent / "data" / "original_checkpoint_keys.txt"


class ReferenceTensor(NamedTuple):
    shape: tuple[int, ...]
    dtype: str
    is_buffer: bool


def load_reference_keys(prefix: str = "") -> dict[str, ReferenceTensor]:
    """Every tensor of the original full-size state dict whose name starts with `prefix`."""
    table: dict[str, ReferenceTensor] = {}
    for line in KEYS_FILE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape, dtype, kind = line.split("\t")
        if name.startswith(prefix):
            dims = tuple(int(v) for v in shape.strip("[]").split(",") if v.strip())
            table[name] = ReferenceTensor(dims, dtype, kind == "B")
    return table
