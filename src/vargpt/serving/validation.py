"""Checks of request values that the model would otherwise trip over, answered as 400s naming the field.

JSON bodies and multipart form fields go through the same functions, so a value is accepted or refused alike on
every endpoint. The ranges are wide enough for any sensible use and narrow enough that sampling stays finite: a
tau of 1e-300 or a cfg_scale of 1e308 turns bit logits into inf and the sampler into NaNs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .schemas import APIError

# name: (lowest, highest); bounds are inclusive
IMAGE_SETTING_RANGES: dict[str, tuple[float, float]] = {
    "cfg_scale": (0.0, 50.0),
    "tau": (0.01, 10.0),
    "top_p": (0.0, 1.0),
}

_SIZE = re.compile(r"([0-9]+)x([0-9]+)")  # ASCII digits only: str.isdigit() also takes '²' and '٣'


def image_settings(values: Mapping[str, Any]) -> dict[str, float]:
    """The image sampling settings present in `values`, as floats, each finite and within its range."""
    settings: dict[str, float] = {}
    for name, (low, high) in IMAGE_SETTING_RANGES.items():
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"{name} must be a number, got {value!r}", param=name, code="invalid_value")
        number = float(value)
        if not math.isfinite(number) or not low <= number <= high:
            raise APIError(
                400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", param=name, code="invalid_value"
            )
        settings[name] = number
    return settings


def square_size(size: str | None) -> int | None:
    """'NxN' to N (at least 1); None or 'auto' to None (the model's native size). Support by the model is checked
    by the caller."""
    if size is None or size == "auto":
        return None
    match = _SIZE.fullmatch(size.strip().lower()) if isinstance(size, str) else None
    if match is None or match[1] != match[2] or int(match[1]) < 1:
        raise APIError(400, f"size must be a square 'NxN' such as '256x256' with N >= 1, got {size!r}", param="size")
    return int(match[1])


def check_length(chars: int, max_chars: int, param: str) -> None:
    """Refuse a prompt so long that it cannot be within the token limit, before spending time tokenising it."""
    if chars > max_chars:
        raise APIError(
            400,
            f"the prompt has {chars} characters, over the limit of {max_chars} (derived from the token limit)",
            param=param,
            code="context_length_exceeded",
        )


def check_text(text: str, param: str) -> None:
    """Refuse text the tokenizer cannot take: lone surrogates, which JSON's \\uXXXX escapes can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(
            400,
            f"the text is not valid Unicode: {error.reason} at character {error.start}",
            param=param,
            code="invalid_text",
        ) from None
