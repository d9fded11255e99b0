"""Training data on disk: LLaMA-Factory "sharegpt" rows (SFT and preference pairs), validated row by row.

SFT row: `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...], "images": [path, ...]}`,
optionally with `"videos": [path, ...]` (video files, one per `<video>` placeholder, as LLaMA-Factory writes them).
Preference row (as LLaMA-Factory's `dpo_en_demo.json`): `{"conversations": [...], "chosen": {...},
"rejected": {...}, "images": [...]}`, the prompt ending with a user turn and `chosen`/`rejected` one assistant
message each (a `{"from": "gpt", "value": ...}` or `{"role": "assistant", "content": ...}` object, a one-message
list, or a bare string). Either message spelling (`role`/`content` with user/assistant/system, or `from`/`value`
with human/gpt/system) and either list key (`messages`, `conversations`) is accepted in both kinds of file.

`<image>` in a user turn is an understanding input (ViT); `<image_gen>` in an assistant turn is a generation target;
`<video>` in a user turn is a video input (the ViT's video path), matched in order against the row's own `videos`
list, as LLaMA-Factory keeps images and videos in separate lists. A preference row's videos belong to its prompt.
As in the original (its mm_plugin matches one `images` list against the placeholders of the concatenated message
contents), `images` lists the files in the order the placeholders appear, both kinds mixed. For a preference row
that reading order is prompt, then `chosen`, then `rejected`: understanding inputs first, then the chosen target(s),
then the rejected target(s). Relative paths are resolved against the data file's folder (or `image_root`); the
original's demo files instead rely on the working directory (LLaMA-Factory tries `image_dir` first, then the path
as given), so pass `image_root` for such files.

Validation happens once, at load time: structure, roles, placeholders, and that every image file exists and
decodes (each distinct file once; `decode_images=False` checks existence only, for datasets too large to decode
twice). A video file is checked by reading its header and packets (`probe_video`: container, frame size,
frame count; no frame decoded) with `decode_images`, for existence only without. One bad byte, row or image costs that
row, never the file: a line that is not UTF-8 is a bad row, and a
UTF-8 byte order mark at the start of a file is accepted. The collator still names the row if a file turns
unreadable later. Bad rows are never dropped silently: they are counted per reason in a `ValidationReport` (or
raise with `strict=True`).

`datasets.load_dataset("json")` is not used to read the files: it aborts a whole file on one malformed JSONL line
and infers one Arrow schema across rows, which breaks on the legitimate mixes above (dict vs string `chosen`,
`from`/`value` vs `role`/`content`). Rows are parsed with `json`, validated, normalised to a fixed schema and
handed to `datasets.Dataset.from_dict` with explicit features (in memory; no hub, no cache).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..image_io import load_image
from ..tokenization import (
    IMAGE_GEN_SPECIAL_TOKENS,
    QWEN2_VL_SPECIAL_TOKENS,
    SHAREGPT_IMAGE_GEN_PLACEHOLDER,
    SHAREGPT_IMAGE_PLACEHOLDER,
)
from ..video_io import probe_video
from .collator import SHAREGPT_VIDEO_PLACEHOLDER

PathInput = str | os.PathLike | Sequence[str | os.PathLike]

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
MESSAGE_LIST_KEYS = ("messages", "conversations")
UNSUPPORTED_MEDIA_KEYS = ("audios",)
# Control tokens that must not appear literally in data: the tokenizer would read them as structure.
RESERVED_TOKENS = (*QWEN2_VL_SPECIAL_TOKENS, *IMAGE_GEN_SPECIAL_TOKENS)
_PLACEHOLDER_PATTERN = re.compile(
    "|".join(
        re.escape(token)
        for token in (SHAREGPT_IMAGE_GEN_PLACEHOLDER, SHAREGPT_IMAGE_PLACEHOLDER, SHAREGPT_VIDEO_PLACEHOLDER)
    )
)
MAX_EXAMPLES_PER_REASON = 5

# Reasons a row is skipped (stable identifiers for logs, reports and tests).
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
BAD_TYPE = "bad_type"
BAD_ROLE = "bad_role"
BAD_TURN_ORDER = "bad_turn_order"
EMPTY_CONTENT = "empty_content"
RESERVED_TOKEN_IN_CONTENT = "reserved_token_in_content"
IMAGE_GEN_OUTSIDE_ASSISTANT_TURN = "image_gen_outside_assistant_turn"
IMAGE_OUTSIDE_USER_TURN = "image_outside_user_turn"
IMAGE_GEN_IN_PREFERENCE_PROMPT = "image_gen_in_preference_prompt"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
UNSUPPORTED_MEDIA = "unsupported_media"
VIDEO_OUTSIDE_USER_TURN = "video_outside_user_turn"
VIDEO_COUNT_MISMATCH = "video_count_mismatch"
MISSING_VIDEO = "missing_video"
UNREADABLE_VIDEO = "unreadable_video"

_MESSAGE_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_PATHS_FEATURE = datasets.List(datasets.Value("string"))
_SOURCE_FEATURES = {"source_file": datasets.Value("string"), "source_row": datasets.Value("int64")}
SFT_FEATURES = datasets.Features(
    {
        "messages": _MESSAGE_FEATURE,
        "images": _PATHS_FEATURE,
        "gen_images": _PATHS_FEATURE,
        "videos": _PATHS_FEATURE,
        **_SOURCE_FEATURES,
    }
)
PREFERENCE_FEATURES = datasets.Features(
    {
        "prompt": _MESSAGE_FEATURE,
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "images": _PATHS_FEATURE,
        "chosen_gen_images": _PATHS_FEATURE,
        "rejected_gen_images": _PATHS_FEATURE,
        "videos": _PATHS_FEATURE,
        **_SOURCE_FEATURES,
    }
)


class DataValidationError(ValueError):
    """A bad training row: names the file, the row (0-based; for JSONL files the 0-based line index) and why."""

    def __init__(self, source_file: str, source_row: int, reason: str, detail: str):
        self.source_file, self.source_row, self.reason, self.detail = source_file, source_row, reason, detail
        super().__init__(f"{source_file} row {source_row}: {reason}: {detail}")


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class RowIssue:
    """One example of a skipped row, for the report."""

    source_file: str
    source_row: int
    detail: str


@dataclass
class ValidationReport:
    """What loading kept and what it skipped, per reason, with up to `MAX_EXAMPLES_PER_REASON` examples each."""

    files: list[str] = field(default_factory=list)
    total_rows: int = 0
    kept_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[RowIssue]] = field(default_factory=dict)

    @property
    def skipped_rows(self) -> int:
        return sum(self.skipped.values())

    def record(self, issue: RowIssue, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        kept_examples = self.examples.setdefault(reason, [])
        if len(kept_examples) < MAX_EXAMPLES_PER_REASON:
            kept_examples.append(issue)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "total_rows": self.total_rows,
            "kept_rows": self.kept_rows,
            "skipped_rows": self.skipped_rows,
            "skipped": {
                reason: {
                    "count": count,
                    "examples": [
                        {"source_file": e.source_file, "source_row": e.source_row, "detail": e.detail}
                        for e in self.examples.get(reason, [])
                    ],
                }
                for reason, count in sorted(self.skipped.items())
            },
        }

    def __str__(self) -> str:
        lines = [
            f"kept {self.kept_rows} of {self.total_rows} rows from {len(self.files)} file(s); "
            f"skipped {self.skipped_rows}"
        ]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}")
            lines.extend(
                f"    e.g. {e.source_file} row {e.source_row}: {e.detail}" for e in self.examples.get(reason, [])
            )
        return "\n".join(lines)


def _as_path_list(paths: PathInput) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise ValueError(f"give a data file path or a non-empty list of them, got {paths!r}")
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"training data file {path} does not exist or is not a file")
    return files


def _read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (row index, parsed row or a `_RowError`) for a JSON array file or a JSON-lines file.

    A file whose first non-blank character is `[` is one JSON array, rows indexed by position (a syntax or encoding
    error there is fatal: no row can be recovered); anything else is JSON lines, where each non-blank line is a row
    indexed by its 0-based line index and a malformed or non-UTF-8 line is a bad row. The file is split as bytes, so
    one bad byte costs one line. A leading UTF-8 byte order mark (written by some Windows editors) is skipped.
    """
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if data.lstrip().startswith(b"["):
        yield from enumerate(_json_array(path, data))
        return
    for index, line in enumerate(data.splitlines()):
        if line.strip():
            yield index, _json_line(index, line)


def _json_array(path: Path, data: bytes) -> list[Any]:
    """A whole-file JSON array, or a `ValueError` naming the file and the line that stops it."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 (byte 0x{data[error.start]:02x})") from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{path} is not valid JSON ({where}): {error.msg}") from None


def _json_line(index: int, line: bytes) -> Any:
    """One JSON-lines row, or the `_RowError` that explains why it cannot be read."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = f"line {index + 1} is not UTF-8: byte 0x{line[error.start]:02x} at byte {error.start + 1}"
        return _RowError(NOT_UTF8, detail)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return _RowError(MALFORMED_JSON, f"line {index + 1} is not valid JSON: {error.msg}")


def _message(raw: Any, where: str) -> dict[str, str]:
    """One message in the canonical `{"role", "content"}` form (roles user/assistant/system)."""
    if not isinstance(raw, dict):
        raise _RowError(BAD_TYPE, f"{where} is not an object")
    if "role" in raw or "content" in raw:
        role_key, content_key = "role", "content"
    elif "from" in raw or "value" in raw:
        role_key, content_key = "from", "value"
    else:
        raise _RowError(MISSING_KEY, f"{where} has neither role/content nor from/value")
    for key in (role_key, content_key):
        if key not in raw:
            raise _RowError(MISSING_KEY, f"{where} has no {key!r}")
    role, content = raw[role_key], raw[content_key]
    if not isinstance(role, str) or role not in ROLE_ALIASES:
        raise _RowError(BAD_ROLE, f"{where} has role {role!r}; expected one of {sorted(ROLE_ALIASES)}")
    if not isinstance(content, str):
        raise _RowError(BAD_TYPE, f"{where} content is a {type(content).__name__}, not a string")
    if not content.strip():
        raise _RowError(EMPTY_CONTENT, f"{where} has empty content")
    for token in RESERVED_TOKENS:
        if token in content:
            raise _RowError(RESERVED_TOKEN_IN_CONTENT, f"{where} contains the control token {token}")
    return {"role": ROLE_ALIASES[role], "content": content}


def _conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The row's message list, canonical, with a top-level `system` string turned into the first message."""
    present = [key for key in MESSAGE_LIST_KEYS if key in row]
    if not present:
        raise _RowError(MISSING_KEY, f"row has none of the keys {list(MESSAGE_LIST_KEYS)}")
    if len(present) > 1:
        raise _RowError(BAD_TYPE, f"row has both {present[0]!r} and {present[1]!r}; give one message list")
    raw_messages = row[present[0]]
    if not isinstance(raw_messages, list):
        raise _RowError(BAD_TYPE, f"{present[0]!r} is a {type(raw_messages).__name__}, not a list")
    messages = [_message(m, f"message {i}") for i, m in enumerate(raw_messages)]
    system = row.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise _RowError(BAD_TYPE, f"'system' is a {type(system).__name__}, not a string")
        if messages and messages[0]["role"] == "system":
            raise _RowError(BAD_TURN_ORDER, "row has a 'system' key and a system message")
        messages.insert(0, _message({"role": "system", "content": system}, "'system'"))
    return messages


def _check_turns(messages: list[dict[str, str]], last_role: str) -> None:
    """Optional system message, then user/assistant alternating from user, ending with `last_role`."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    body = messages[start:]
    if not body:
        raise _RowError(BAD_TURN_ORDER, "no user/assistant messages")
    for offset, message in enumerate(body):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _RowError(
                BAD_TURN_ORDER, f"message {start + offset} is {message['role']}, expected {expected} (turns alternate)"
            )
    if body[-1]["role"] != last_role:
        raise _RowError(BAD_TURN_ORDER, f"the last message is {body[-1]['role']}, expected {last_role}")


def _placeholders(message: dict[str, str], where: str) -> list[str]:
    """The placeholders of one message in order; each kind only where it belongs."""
    found = _PLACEHOLDER_PATTERN.findall(message["content"])
    if SHAREGPT_IMAGE_GEN_PLACEHOLDER in found and message["role"] != "assistant":
        raise _RowError(IMAGE_GEN_OUTSIDE_ASSISTANT_TURN, f"{where} ({message['role']}) holds <image_gen>")
    if SHAREGPT_IMAGE_PLACEHOLDER in found and message["role"] != "user":
        raise _RowError(IMAGE_OUTSIDE_USER_TURN, f"{where} ({message['role']}) holds <image>")
    if SHAREGPT_VIDEO_PLACEHOLDER in found and message["role"] != "user":
        raise _RowError(VIDEO_OUTSIDE_USER_TURN, f"{where} ({message['role']}) holds <video>")
    return [p for p in found if p != SHAREGPT_VIDEO_PLACEHOLDER]


def _video_count(messages: Sequence[dict[str, str]]) -> int:
    return sum(m["content"].count(SHAREGPT_VIDEO_PLACEHOLDER) for m in messages)


class _MediaResolver:
    """Resolve a row's media paths (`key`: "images" or "videos") against a folder and check, once per distinct path,
    that the file exists and (with `decode`) reads, so a broken file costs its rows rather than stopping a
    training run halfway. Subclasses say how a file is read and which reasons a problem is counted under."""

    key = ""
    noun = ""
    placeholder = ""
    missing = unreadable = count_mismatch = ""

    def __init__(self, decode: bool = True) -> None:
        self.decode = decode
        self._problems: dict[str, tuple[str, str] | None] = {}

    def _read(self, path: str) -> None:
        raise NotImplementedError

    def _problem(self, original: str, path: str) -> tuple[str, str] | None:
        """(reason, detail) of what is wrong with one file, or None."""
        if not os.path.isfile(path):
            return self.missing, f"{self.noun} {original!r} not found (looked at {path})"
        if self.decode:
            try:
                self._read(path)
            except ValueError as error:
                return self.unreadable, f"{self.noun} {original!r} cannot be read: {error}"
        return None

    def paths(self, row: dict[str, Any], base_dir: Path, expected: int) -> list[str]:
        raw = row.get(self.key)
        if raw is None:
            raw = []
        elif isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(p, str) and p.strip() for p in raw):
            raise _RowError(BAD_TYPE, f"'{self.key}' must be a list of non-empty path strings")
        if len(raw) != expected:
            raise _RowError(
                self.count_mismatch, f"{expected} {self.placeholder} placeholder(s) but {len(raw)} {self.noun}(s)"
            )
        resolved = [os.path.abspath(p if os.path.isabs(p) else base_dir / p) for p in raw]
        for original, path in zip(raw, resolved, strict=True):
            if path not in self._problems:
                self._problems[path] = self._problem(original, path)
            problem = self._problems[path]
            if problem is not None:
                raise _RowError(*problem)
        return resolved


class _ImageResolver(_MediaResolver):
    """Images: a file must decode (`load_image`); rows with other unsupported media are refused here."""

    key, noun, placeholder = "images", "image", "image"
    missing, unreadable, count_mismatch = MISSING_IMAGE, UNREADABLE_IMAGE, IMAGE_COUNT_MISMATCH

    def _read(self, path: str) -> None:
        load_image(path)

    def paths(self, row: dict[str, Any], base_dir: Path, expected: int) -> list[str]:
        for key in UNSUPPORTED_MEDIA_KEYS:
            if row.get(key):
                raise _RowError(UNSUPPORTED_MEDIA, f"row has {key!r}; only images are supported")
        return super().paths(row, base_dir, expected)


class _VideoResolver(_MediaResolver):
    """Videos: a file must pass `probe_video` (header and packets, no frame decoded)."""

    key, noun, placeholder = "videos", "video", "<video>"
    missing, unreadable, count_mismatch = MISSING_VIDEO, UNREADABLE_VIDEO, VIDEO_COUNT_MISMATCH

    def _read(self, path: str) -> None:
        probe_video(path)


def _videos(
    row: dict[str, Any], base_dir: Path, expected: int, images: _ImageResolver, videos: _VideoResolver | None
) -> list[str]:
    """The row's video paths; without a shared resolver (callers that predate videos) a row-local one checks them,
    decoding as the image check does."""
    if not expected and not row.get("videos"):
        return []
    resolver = videos if videos is not None else _VideoResolver(decode=images.decode)
    return resolver.paths(row, base_dir, expected)


def _sft_row(row: Any, base_dir: Path, images: _ImageResolver, videos: _VideoResolver | None = None) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _RowError(NOT_AN_OBJECT, f"row is a {type(row).__name__}, not an object")
    messages = _conversation(row)
    _check_turns(messages, last_role="assistant")
    order = [p for i, m in enumerate(messages) for p in _placeholders(m, f"message {i}")]
    paths = images.paths(row, base_dir, len(order))
    return {
        "messages": messages,
        "images": [p for p, kind in zip(paths, order, strict=True) if kind == SHAREGPT_IMAGE_PLACEHOLDER],
        "gen_images": [p for p, kind in zip(paths, order, strict=True) if kind == SHAREGPT_IMAGE_GEN_PLACEHOLDER],
        "videos": _videos(row, base_dir, _video_count(messages), images, videos),
    }


def _response(raw: Any, key: str) -> dict[str, str]:
    if isinstance(raw, str):
        raw = {"role": "assistant", "content": raw}
    elif isinstance(raw, list):
        if len(raw) != 1:
            raise _RowError(BAD_TYPE, f"{key!r} is a list of {len(raw)} messages; give one assistant message")
        raw = raw[0]
    message = _message(raw, repr(key))
    if message["role"] != "assistant":
        raise _RowError(BAD_ROLE, f"{key!r} is a {message['role']} message, expected assistant")
    return message


def _preference_row(
    row: Any, base_dir: Path, images: _ImageResolver, videos: _VideoResolver | None = None
) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _RowError(NOT_AN_OBJECT, f"row is a {type(row).__name__}, not an object")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _RowError(MISSING_KEY, f"row has no {key!r}")
    prompt = _conversation(row)
    _check_turns(prompt, last_role="user")
    chosen, rejected = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    prompt_order = [p for i, m in enumerate(prompt) for p in _placeholders(m, f"message {i}")]
    if SHAREGPT_IMAGE_GEN_PLACEHOLDER in prompt_order:
        raise _RowError(IMAGE_GEN_IN_PREFERENCE_PROMPT, "<image_gen> belongs in 'chosen'/'rejected', not the prompt")
    chosen_order, rejected_order = _placeholders(chosen, "'chosen'"), _placeholders(rejected, "'rejected'")
    paths = images.paths(row, base_dir, len(prompt_order) + len(chosen_order) + len(rejected_order))
    n_prompt, n_chosen = len(prompt_order), len(chosen_order)
    return {
        "prompt": prompt,
        "chosen": chosen["content"],
        "rejected": rejected["content"],
        "images": paths[:n_prompt],
        "chosen_gen_images": paths[n_prompt : n_prompt + n_chosen],
        "rejected_gen_images": paths[n_prompt + n_chosen :],
        "videos": _videos(row, base_dir, _video_count(prompt), images, videos),
    }


def _load(
    paths: PathInput,
    strict: bool,
    image_root: str | os.PathLike | None,
    parse_row: Any,
    features: datasets.Features,
    decode_images: bool = True,
) -> tuple[datasets.Dataset, ValidationReport]:
    files = _as_path_list(paths)
    report = ValidationReport(files=[str(f) for f in files])
    columns: dict[str, list[Any]] = {name: [] for name in features}
    resolver, video_resolver = _ImageResolver(decode=decode_images), _VideoResolver(decode=decode_images)
    for path in files:
        base_dir = Path(image_root) if image_root is not None else path.parent
        for index, row in _read_rows(path):
            report.total_rows += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                parsed = parse_row(row, base_dir, resolver, video_resolver)
            except _RowError as error:
                if strict:
                    raise DataValidationError(str(path), index, error.reason, error.detail) from None
                report.record(RowIssue(str(path), index, error.detail), error.reason)
                continue
            parsed.update(source_file=str(path), source_row=index)
            for name in features:
                columns[name].append(parsed[name])
            report.kept_rows += 1
    return datasets.Dataset.from_dict(columns, features=features), report


def load_sft_dataset(
    paths: PathInput, strict: bool = False, image_root: str | os.PathLike | None = None, decode_images: bool = True
) -> tuple[datasets.Dataset, ValidationReport]:
    """Load and validate SFT rows from JSON / JSONL files.

    Columns: `messages` (canonical role/content list), `images` (absolute paths of the `<image>` inputs, in order),
    `gen_images` (absolute paths of the `<image_gen>` targets, in order), `videos` (absolute paths of the `<video>`
    inputs, in order), `source_file`, `source_row`.
    `strict=True` raises `DataValidationError` at the first bad row; otherwise bad rows are skipped and counted.
    `decode_images=False` only checks that image files exist (see the module docstring).
    """
    return _load(paths, strict, image_root, _sft_row, SFT_FEATURES, decode_images)


def load_preference_dataset(
    paths: PathInput, strict: bool = False, image_root: str | os.PathLike | None = None, decode_images: bool = True
) -> tuple[datasets.Dataset, ValidationReport]:
    """Load and validate preference (DPO) rows from JSON / JSONL files.

    Columns: `prompt` (messages ending with a user turn), `chosen` and `rejected` (assistant contents), `images`
    (the prompt's `<image>` inputs), `chosen_gen_images` and `rejected_gen_images` (each side's `<image_gen>`
    targets), `videos` (the prompt's `<video>` inputs), `source_file`, `source_row`. The row's `images` list is
    read in placeholder order: prompt, chosen, rejected. `strict` and `decode_images` as in `load_sft_dataset`.
    """
    return _load(paths, strict, image_root, _preference_row, PREFERENCE_FEATURES, decode_images)
