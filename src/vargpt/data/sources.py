"""A training stage's data: sharegpt / preference files and `datasets` datasets, mixed, in memory or streamed.

A source is one JSON object in a recipe stage's `data` list:

    {"path": "sft/stage2.jsonl"}                                   a JSON / JSONL file (relative to the data root)
    {"dataset": "owner/name", "split": "train", "streaming": true}  a `datasets` dataset (Hub id, local folder, or a
    {"dataset": "json", "data_files": "gen/*.jsonl"}                packaged builder such as "json" / "parquet")

Every row is checked by the rules of `vargpt.data.formats` (its parsers are reused, not copied): a bad row is
skipped and counted per reason in a `ValidationReport`, or raises `DataValidationError` with `strict`.

Images. In a file, `images` holds paths relative to the file's folder (or to `image_root`). In a dataset, the
`images` column (renamed with `columns`, e.g. `{"images": "image"}`) holds either paths (strings, relative to
`image_root`, itself relative to the data root; default: the data root) or the images themselves: a datasets
`Image` feature (one image or a list), PIL images or encoded bytes. Image columns are read undecoded, so a row
carries the encoded bytes and the collator decodes only the rows it batches.

Mixing. Without streaming and without weights the stage's rows are the concatenation of its sources, each
`repeat` times (a small source over-sampled), in memory; the Trainer shuffles them per epoch. With a streaming
source or with weights the stage is an endless `torch.utils.data.IterableDataset` (`MixtureStream`): each next row
comes from source i with probability weight_i / sum(weights); a source that runs out starts another pass in a new
shuffled order. The Trainer takes it with `max_steps`; a resumed run replays the same order (seeded) to the step it
stopped at. Streamed rows are validated as they are read, so the report grows during training and a source is
never read whole into memory (a streamed JSONL file is read line by line).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from ..image_io import load_image
from .formats import (
    BAD_TYPE,
    IMAGE_COUNT_MISMATCH,
    UNREADABLE_IMAGE,
    UNSUPPORTED_MEDIA,
    UNSUPPORTED_MEDIA_KEYS,
    DataValidationError,
    RowIssue,
    ValidationReport,
    _ImageResolver,
    _json_line,
    _preference_row,
    _read_rows,
    _RowError,
    _sft_row,
    load_preference_dataset,
    load_sft_dataset,
)

KINDS = ("sft", "dpo")
IMAGE_CHECKS = ("decode", "exists")
_FIELDS = (
    "path",
    "dataset",
    "name",
    "split",
    "data_files",
    "streaming",
    "columns",
    "image_root",
    "weight",
    "repeat",
    "check_images",
    "shuffle_buffer",
)
# keys of a normalised row that a `columns` mapping may take from a differently named dataset column
_RENAMABLE = ("messages", "conversations", "images", "chosen", "rejected", "system")


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a stage (see the module docstring for the forms)."""

    path: str | None = None
    dataset: str | None = None
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | dict[str, Any] | None = None
    streaming: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    image_root: str | None = None
    weight: float | None = None
    repeat: int = 1
    # "decode": every image file is opened once at load time (a broken one costs its row); "exists": only checked
    # for presence, for sources too large to decode twice (a corrupt image then stops training at its batch)
    check_images: str = "decode"
    shuffle_buffer: int = 10_000

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        where = f"{self.dataset}" + (f"/{self.name}" if self.name else "")
        return f"{where}:{self.split}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_source(raw: Any, where: str) -> SourceSpec:
    """A `SourceSpec` from recipe JSON; errors name `where` (e.g. "stage 'sft-256' data[1]") and the field."""
    raw = _source_object(raw, where)
    data_files = raw.get("data_files")
    if data_files is not None and not isinstance(data_files, (str, list, dict)):
        raise ValueError(f"{where}: data_files must be a string, a list or a split->files mapping")
    columns = _columns(raw.get("columns", {}), where)
    streaming = raw.get("streaming", False)
    if not isinstance(streaming, bool):
        raise ValueError(f"{where}: streaming must be true or false, got {streaming!r}")
    weight = raw.get("weight")
    if weight is not None and (
        isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0
    ):
        raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
    repeat = _positive_int(raw, "repeat", 1, where)
    check = raw.get("check_images", "decode")
    if check not in IMAGE_CHECKS:
        raise ValueError(f"{where}: check_images must be one of {list(IMAGE_CHECKS)}, got {check!r}")
    buffer = _positive_int(raw, "shuffle_buffer", 10_000, where)
    return SourceSpec(
        path=raw.get("path"),
        dataset=raw.get("dataset"),
        name=raw.get("name"),
        split=raw.get("split", "train"),
        data_files=data_files,
        streaming=streaming,
        columns=columns,
        image_root=raw.get("image_root"),
        weight=None if weight is None else float(weight),
        repeat=repeat,
        check_images=check,
        shuffle_buffer=buffer,
    )


def _source_object(raw: Any, where: str) -> dict[str, Any]:
    """The source as a dict of known fields naming exactly one of a file or a dataset (a bare string is a path)."""
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a data source is an object such as {{'path': 'sft/rows.jsonl'}}, got {raw!r}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; a source takes {list(_FIELDS)}")
    if ("path" in raw) == ("dataset" in raw):
        raise ValueError(f"{where}: give exactly one of 'path' (a JSON/JSONL file) or 'dataset' (a datasets name)")
    for key in ("path", "dataset", "name", "split", "image_root"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if "path" in raw:
        for key in ("name", "split", "data_files", "columns"):
            if key in raw:
                raise ValueError(f"{where}: {key} belongs to a 'dataset' source, not a 'path' one")
    return raw


def _columns(columns: Any, where: str) -> dict[str, str]:
    """A copy of a `columns` renaming, checked: row keys it may rename to dataset column names."""
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise ValueError(f"{where}: columns maps row keys to dataset column names, got {columns!r}")
    bad_keys = sorted(set(columns) - set(_RENAMABLE))
    if bad_keys:
        raise ValueError(f"{where}: columns may rename {list(_RENAMABLE)}, not {bad_keys}")
    return dict(columns)


def _positive_int(raw: dict[str, Any], key: str, default: int, where: str) -> int:
    # bool is an int subclass: `true` in JSON must not pass for 1
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def is_streamed(sources: Sequence[SourceSpec]) -> bool:
    """Whether a stage with these sources is an endless weighted stream rather than rows in memory."""
    return any(s.streaming or s.weight is not None for s in sources)


def check_mixture(sources: Sequence[SourceSpec], where: str) -> None:
    """The rules that make a mixture mean one thing: weights for streams, repeats for rows in memory."""
    if not sources:
        raise ValueError(f"{where}: give at least one data source")
    if not is_streamed(sources):
        return
    if any(s.repeat != 1 for s in sources):
        raise ValueError(
            f"{where}: repeat applies to sources held in memory; a streamed or weighted stage mixes by weight"
        )
    if len(sources) > 1 and any(s.weight is None for s in sources):
        missing = [s.describe() for s in sources if s.weight is None]
        raise ValueError(
            f"{where}: a streamed or weighted stage needs a weight on every source (the sampling share); "
            f"missing on {missing}"
        )


def plain_files(sources: Sequence[SourceSpec], data_root: Path) -> list[str] | None:
    """The file paths when the stage is nothing but files read as `vargpt finetune --data` reads them (in memory,
    once each, images next to the file and decoded once); else None."""
    if is_streamed(sources):
        return None
    if any(s.path is None or s.repeat != 1 or s.image_root or s.check_images != "decode" for s in sources):
        return None
    return [str(resolve(data_root, s.path)) for s in sources]


def resolve(data_root: Path | None, path: str) -> Path:
    if os.path.isabs(path):
        return Path(path)
    if data_root is None:
        raise ValueError(f"{path!r} is relative: give a data root (--data-root) it is relative to")
    return data_root / path


def check_files_exist(sources: Sequence[SourceSpec], data_root: Path | None, where: str) -> None:
    """Fail before any training when a file source is missing (a later stage's file would else fail hours in)."""
    for index, source in enumerate(sources):
        if source.path is not None:
            path = resolve(data_root, source.path)
            if not path.is_file():
                raise FileNotFoundError(f"{where} data[{index}]: file {path} does not exist")


# --- rows ------------------------------------------------------------------------------------------------------


class _InlineImages:
    """`formats`' image check for rows whose images may be data rather than paths: a datasets `Image` value
    (`{"bytes", "path"}`), PIL images or bytes. Path strings go to `formats._ImageResolver` unchanged."""

    def __init__(self, decode: bool) -> None:
        self.decode = decode
        self.files = _ImageResolver(decode=decode)

    def paths(self, row: dict[str, Any], base_dir: Path, expected: int) -> list[Any]:
        raw = row.get("images")
        if isinstance(raw, (Image.Image, bytes, dict)):
            raw = [raw]
        if not isinstance(raw, list) or all(isinstance(item, str) for item in raw):
            return self.files.paths(row if raw is row.get("images") else {**row, "images": raw}, base_dir, expected)
        for key in UNSUPPORTED_MEDIA_KEYS:
            if row.get(key):
                raise _RowError(UNSUPPORTED_MEDIA, f"row has {key!r}; only images are supported")
        if len(raw) != expected:
            raise _RowError(IMAGE_COUNT_MISMATCH, f"{expected} image placeholder(s) but {len(raw)} image(s)")
        return [self._one(item, index, base_dir) for index, item in enumerate(raw)]

    def _one(self, item: Any, index: int, base_dir: Path) -> Any:
        if isinstance(item, dict):
            if item.get("bytes"):
                item = item["bytes"]
            elif isinstance(item.get("path"), str) and item["path"]:
                return self.files.paths({"images": [item["path"]]}, base_dir, 1)[0]
            else:
                raise _RowError(BAD_TYPE, f"image {index} has neither bytes nor a path")
        if isinstance(item, str):
            return self.files.paths({"images": [item]}, base_dir, 1)[0]
        if not isinstance(item, (bytes, Image.Image)):
            raise _RowError(BAD_TYPE, f"image {index} is a {type(item).__name__}, not a path, bytes or an image")
        if self.decode:
            try:
                load_image(item)
            except ValueError as error:
                raise _RowError(UNREADABLE_IMAGE, f"image {index} cannot be read: {error}") from None
        return item


_PARSERS = {"sft": _sft_row, "dpo": _preference_row}


class _Validator:
    """Parses raw rows of one source into the normalised schema of `formats`, counting (or raising on) bad ones.

    `images` is shared between validators of the same source so each image file is checked once.
    """

    def __init__(
        self, kind: str, label: str, base_dir: Path, images: _InlineImages, strict: bool, columns: dict[str, str]
    ) -> None:
        self.parse, self.label, self.base_dir, self.strict = _PARSERS[kind], label, base_dir, strict
        self.images, self.columns = images, columns
        self.report = ValidationReport(files=[label])

    def __call__(self, index: int, raw: Any) -> dict[str, Any] | None:
        self.report.total_rows += 1
        try:
            if isinstance(raw, _RowError):
                raise raw
            if self.columns and isinstance(raw, dict):
                kept = {key: value for key, value in raw.items() if key not in self.columns.values()}
                raw = kept | {key: raw.get(column) for key, column in self.columns.items()}
            row = self.parse(raw, self.base_dir, self.images)
        except _RowError as error:
            if self.strict:
                raise DataValidationError(self.label, index, error.reason, error.detail) from None
            self.report.record(RowIssue(self.label, index, error.detail), error.reason)
            return None
        self.report.kept_rows += 1
        row.update(source_file=self.label, source_row=index)
        return row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSONL file read line by line (a JSON array file is read whole: it cannot be split)."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        yield from _read_rows(path)
        return
    with path.open("rb") as handle:
        for index, line in enumerate(handle):
            if index == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if line.strip():
                yield index, _json_line(index, line)


def _undecoded(dataset: Any) -> Any:
    """The dataset with its image columns left encoded (`{"bytes", "path"}`): validation and mixing never pay for
    decoding; the collator decodes the rows it batches."""
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image) and inner.decode:
            dataset = dataset.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return dataset


def _load_dataset(source: SourceSpec, data_root: Path | None, streaming: bool) -> Any:
    name = source.dataset
    if data_root is not None and (data_root / name).exists():
        name = str(data_root / name)  # a local dataset folder named relative to the data root
    data_files = source.data_files
    if data_files is not None and data_root is not None:
        data_files = _rooted(data_files, data_root)
    loaded = datasets.load_dataset(name, source.name, split=source.split, data_files=data_files, streaming=streaming)
    return _undecoded(loaded)


def _rooted(data_files: Any, data_root: Path) -> Any:
    """Local `data_files` patterns relative to the data root (Hub repos keep theirs: they are repo paths)."""
    if isinstance(data_files, str):
        if os.path.isabs(data_files):
            return data_files
        candidate = data_root / data_files
        return str(candidate) if candidate.exists() or any(data_root.glob(data_files)) else data_files
    if isinstance(data_files, list):
        return [_rooted(f, data_root) for f in data_files]
    return {split: _rooted(files, data_root) for split, files in data_files.items()}


def _image_base(source: SourceSpec, data_root: Path | None) -> Path:
    if source.image_root is not None:
        return resolve(data_root, source.image_root)
    if source.path is not None:
        return resolve(data_root, source.path).parent
    return data_root if data_root is not None else Path.cwd()


# --- rows in memory ------------------------------------------------------------------------------------------


class _DatasetView(torch.utils.data.Dataset):
    """The kept rows of a (non-streamed) `datasets` dataset, normalised on access: the dataset stays on disk
    (memory-mapped Arrow) and inline images stay encoded until the collator decodes them."""

    def __init__(self, rows: Any, kept: list[int], kind: str, validator: _Validator) -> None:
        self.rows, self.kept = rows, kept
        # the kept rows passed every check, images included: parse them again without decoding
        self.reparse = _Validator(
            kind, validator.label, validator.base_dir, _InlineImages(decode=False), True, validator.columns
        )

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_index = self.kept[index]
        row = self.reparse(row_index, self.rows[row_index])
        assert row is not None  # strict: a row that passed once cannot fail now
        return row


def _in_memory(
    source: SourceSpec, kind: str, data_root: Path | None, strict: bool
) -> tuple[torch.utils.data.Dataset, ValidationReport]:
    decode = source.check_images == "decode"
    if source.path is not None:
        loader = load_preference_dataset if kind == "dpo" else load_sft_dataset
        image_root = None if source.image_root is None else resolve(data_root, source.image_root)
        return loader(resolve(data_root, source.path), strict=strict, image_root=image_root, decode_images=decode)
    rows = _load_dataset(source, data_root, streaming=False)
    images = _InlineImages(decode)
    validator = _Validator(kind, source.describe(), _image_base(source, data_root), images, strict, source.columns)
    kept = [index for index, raw in enumerate(rows) if validator(index, raw) is not None]
    return _DatasetView(rows, kept, kind, validator), validator.report


class _Repeated(torch.utils.data.Dataset):
    """Rows of several datasets one after another, each repeated: the Trainer's sampler shuffles the whole."""

    def __init__(self, parts: Sequence[tuple[Any, int]]) -> None:
        self.parts = [part for part, repeat in parts for _ in range(repeat) if len(part)]
        self.ends = list(itertools.accumulate(len(part) for part in self.parts))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        return self.parts[part][index - start]


# --- streams -------------------------------------------------------------------------------------------------


def _buffer_shuffled(rows: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """An approximate shuffle holding `size` rows: each incoming row replaces a random buffered one, which leaves."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        slot = rng.randrange(size)
        buffer[slot], row = row, buffer[slot]
        yield row
    rng.shuffle(buffer)
    yield from buffer


class _SourceStream:
    """Passes over one source, each in its own seeded order, validated as read."""

    def __init__(self, source: SourceSpec, kind: str, data_root: Path | None, strict: bool, seed: int) -> None:
        self.source, self.kind, self.data_root, self.strict, self.seed = source, kind, data_root, strict, seed
        self.images = _InlineImages(source.check_images == "decode")
        self.validator, self.quiet = self._validator(), self._validator()
        self.counted_upto = -1
        self.rows: Any = None  # rows held in memory (a non-streaming source), loaded on first use

    def _validator(self) -> _Validator:
        base = _image_base(self.source, self.data_root)
        return _Validator(self.kind, self.source.describe(), base, self.images, self.strict, self.source.columns)

    @property
    def report(self) -> ValidationReport:
        return self.validator.report

    def one_pass(self, pass_index: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}:{self.source.describe()}:{pass_index}")
        if not self.source.streaming:
            if self.rows is None:
                self.rows, report = _in_memory(self.source, self.kind, self.data_root, self.validator.strict)
                self.validator.report = report
            order = list(range(len(self.rows)))
            rng.shuffle(order)
            return (self.rows[i] for i in order)
        if self.source.path is not None:
            raw_rows: Iterator[tuple[int, Any]] = _jsonl_rows(resolve(self.data_root, self.source.path))
        else:
            raw_rows = enumerate(_load_dataset(self.source, self.data_root, streaming=True))
        validated = (self._validate(index, raw) for index, raw in raw_rows)
        return _buffer_shuffled((row for row in validated if row is not None), self.source.shuffle_buffer, rng)

    def _validate(self, index: int, raw: Any) -> dict[str, Any] | None:
        """Rows come in source order on every pass (and again on every `iter()`): the report counts each once."""
        if index > self.counted_upto:
            self.counted_upto = index
            return self.validator(index, raw)
        return self.quiet(index, raw)


class MixtureStream(torch.utils.data.IterableDataset):
    """An endless stream of normalised rows drawn from sources by weight (see the module docstring).

    Every `iter()` starts the same seeded sequence, which is what makes a resumed Trainer (which skips the batches
    already trained) see the rows an uninterrupted run would. In a run of several processes each one reads the
    same stream and keeps its own share of every batch (accelerate's `IterableDatasetShard`, used when the
    Trainer's `dispatch_batches` is off: dispatching would slice collated batches by row, which splits the
    flattened `pixel_values` of a vision batch wrongly). With DataLoader workers the rows are read, and the
    report counted, in the workers: `report()` of the main process then stays empty.
    """

    def __init__(
        self, sources: Sequence[SourceSpec], kind: str, data_root: Path | None, strict: bool = False, seed: int = 0
    ) -> None:
        check_mixture(sources, "data")
        self.sources = list(sources)
        self.weights = [s.weight if s.weight is not None else 1.0 for s in sources]
        self.kind, self.data_root, self.strict, self.seed = kind, data_root, strict, seed
        self.streams = [_SourceStream(s, kind, data_root, strict, seed) for s in sources]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """With DataLoader workers, worker k of n keeps rows k, k + n, ... of the one sequence (no row twice)."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for position, row in enumerate(self._sequence()):
            if position % workers == worker:
                yield row

    def _sequence(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}:mixture")
        passes = [0] * len(self.streams)
        iterators = [stream.one_pass(0) for stream in self.streams]
        while True:
            (index,) = rng.choices(range(len(self.streams)), weights=self.weights)
            row = next(iterators[index], None)
            if row is None:
                passes[index] += 1
                iterators[index] = self.streams[index].one_pass(passes[index])
                row = next(iterators[index], None)
                if row is None:
                    stream = self.streams[index]
                    raise ValueError(f"no usable rows in {stream.source.describe()}: {stream.report}")
            yield row

    def set_epoch(self, epoch: int) -> None:
        """The stream is endless (one Trainer epoch); nothing to reseed."""

    def report(self) -> ValidationReport:
        """What has been read so far, all sources together (each row counted once, on its first pass)."""
        return merge_reports([stream.report for stream in self.streams])


# --- a stage's data ------------------------------------------------------------------------------------------


@dataclass
class StageData:
    """A stage's training rows: `dataset` for the Trainer, and what validation kept and skipped."""

    dataset: Any
    streamed: bool
    report_source: Any

    @property
    def report(self) -> ValidationReport:
        """Complete for rows in memory; for a stream, the rows read so far."""
        return self.report_source() if callable(self.report_source) else self.report_source


def merge_reports(reports: Sequence[ValidationReport]) -> ValidationReport:
    merged = ValidationReport()
    for report in reports:
        merged.files.extend(report.files)
        merged.total_rows += report.total_rows
        merged.kept_rows += report.kept_rows
        for reason, count in report.skipped.items():
            merged.skipped[reason] = merged.skipped.get(reason, 0) + count
            merged.examples.setdefault(reason, []).extend(report.examples.get(reason, []))
    return merged


def build_stage_data(
    sources: Sequence[SourceSpec],
    kind: str,
    data_root: str | os.PathLike | None = None,
    *,
    strict: bool = False,
    seed: int = 0,
) -> StageData:
    """The dataset a stage trains on. `kind`: "sft" (sharegpt rows) or "dpo" (preference rows)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = None if data_root is None else Path(data_root)
    check_mixture(sources, "data")
    if is_streamed(sources):
        stream = MixtureStream(sources, kind, root, strict=strict, seed=seed)
        return StageData(stream, True, stream.report)
    parts, reports = [], []
    for source in sources:
        part, report = _in_memory(source, kind, root, strict)
        if len(part) == 0:
            raise ValueError(f"no usable rows in {source.describe()}: {report}")
        parts.append((part, source.repeat))
        reports.append(report)
    merged = merge_reports(reports)
    if len(parts) == 1 and parts[0][1] == 1:
        return StageData(parts[0][0], False, merged)
    return StageData(_Repeated(parts), False, merged)
