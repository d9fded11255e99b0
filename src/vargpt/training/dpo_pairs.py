"""`vargpt dpo-pairs`: preference pairs for iterative image DPO from prompts, checkpoints and winner images.

The report's DPO rounds (section 3.2) pair, for one prompt, a high-quality image (the winner: from a stronger
model or a curated set) with a sample of an earlier SFT checkpoint (the loser). This module draws the losers,
finds the winners, optionally drops losers that already satisfy their prompt, and writes the preference JSONL
that `vargpt.data.formats.load_preference_dataset` reads.

Prompts (`--prompts`): a text file (one prompt per line), a JSONL file (one object per line, or a JSON array,
with a `prompt` field, or `--prompt-column`; the whole object is the row's metadata, e.g. GenEval's
`tag`/`include`/`exclude` that a scorer reads), or a `datasets` dataset (a Hub name, a local folder, or a .csv /
.parquet file; `--prompt-column`, `--prompt-split`). A prompt's index is its position among the prompts (blank
lines skipped), from 0.

Winners (`--winners`), one of:
* a folder, where an image belongs to prompt `i` when its file stem is `i` as a number (`7.png`, `00007.jpg`)
  or the prompt's slug (lowercase, each run of characters other than a-z and 0-9 replaced by `-`, trimmed:
  "a red circle." -> `a-red-circle.png`). A sub-folder keyed the same way holds several winners: its
  `samples/` images, else its own images, so a GenEval-layout folder (`00007/samples/0000.png`, what
  `vargpt eval geneval-sample` writes for a stronger model) works as it is. A key of digits is always an index.
* a JSONL mapping, one `{"prompt": text, "image": path}` (or `"images": [paths]`) per line, paths relative to
  the mapping's folder; a prompt may have several lines.
* none, with `--scorer`: the winners are the checkpoints' own samples the scorer accepts.
Loser number p of a prompt (p = checkpoint position * samples per prompt + sample) pairs with winner p modulo
the prompt's number of winners.

Losers: `--samples-per-prompt` samples of each `--model`, in batches. Sample k of prompt i is drawn from seed
`seed + i * K + k` alone (K samples per prompt), for every checkpoint alike, so it does not depend on the batch
size or on the shard, and checkpoints are compared on the same draws.

Scorer (`--scorer`): name -> callable(image, PromptRow) -> bool, True when an image satisfies its prompt; such a
loser carries no preference signal and is skipped. Built in: `shapes` (the shapes-world GenEval rules on the
row's metadata). `module:NAME` loads another (a class, built without arguments, or a callable), which is the
place for a GenEval-detector scorer.

Output folder (`--out`)::

    run.json                  what decides the samples and pairs; a folder resumes only with the same values
    samples/m<j>/<i>-<k>.png  sample k of prompt i (index zero padded to 6) by the j-th --model
    winners/<i>-<n>.<ext>     copy of winner n of prompt i (so the folder is self-contained)
    parts/shard-<I>-of-<N>.jsonl   one line per finished prompt of shard I: its pair rows and skip counts
    pairs.jsonl               the merged pairs in prompt order (then checkpoint, then sample)
    stats.json                pairs written and candidate pairs skipped per reason

A pair row: `{"conversations": [{"role": "user", "content": prompt}], "chosen": {"role": "assistant",
"content": "<image_gen>"}, "rejected": {...}, "images": [winner, loser], "meta": {...}}` with image paths
relative to `pairs.jsonl`. Skip reasons count candidate pairs (one per checkpoint sample): `no_winner`,
`loser_satisfies_prompt`, `winner_unreadable`, `invalid_prompt` (it holds a control token or an image
placeholder); `prompts_without_winner` counts prompts.

Resuming: images are written to a hidden temporary name and renamed into place; a prompt's line is appended to
its shard's part file only once all its images exist, in one write, flushed and synced. A re-run with the same
`--out` skips samples on disk and prompts already recorded, and cuts a line an interruption left half written.

Processes: `--num-shards N --shard-index I` (or, when unset, `WORLD_SIZE` / `RANK` as `accelerate launch` or
`torchrun` set them; `LOCAL_RANK` picks the GPU) give process I the prompts with index % N == I. Whichever
process finds every prompt recorded merges the part files into `pairs.jsonl` and `stats.json` (atomically);
`--merge` only merges, e.g. after shards ran on separate machines. `--strict` makes a prompt with no image in
`--winners` an error (raised before any model loads) instead of a counted skip.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..atomic_files import save_png_atomic, write_text_atomic
from ..pipeline import VARGPTPipeline
from ..tokenization import (
    IMAGE_GEN_SPECIAL_TOKENS,
    QWEN2_VL_SPECIAL_TOKENS,
    SHAREGPT_IMAGE_GEN_PLACEHOLDER,
    SHAREGPT_IMAGE_PLACEHOLDER,
)
from .preference_pairs import PromptRow, PromptScorer

FORMAT = "vargpt-dpo-pairs/1"
INDEX_DIGITS = 6
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet"}  # files read through `datasets`' packaged loaders
DEFAULT_RESPONSE = SHAREGPT_IMAGE_GEN_PLACEHOLDER
# skip reasons (stable names for stats.json and tests)
NO_WINNER = "no_winner"
LOSER_SATISFIES_PROMPT = "loser_satisfies_prompt"
WINNER_UNREADABLE = "winner_unreadable"
INVALID_PROMPT = "invalid_prompt"


# ---------------------------------------------------------------- prompts


def load_prompts(
    source: str | os.PathLike, column: str = "prompt", split: str = "train", limit: int | None = None
) -> list[PromptRow]:
    """Prompt rows of a text / JSONL file or of a `datasets` dataset (see the module docstring)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    path = Path(source)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        texts = _prompts_of_dataset(TABLE_SUFFIXES[path.suffix.lower()], column, split, data_files=str(path))
    elif path.is_file():
        texts = _prompts_of_file(path, column)
    elif path.is_dir() or not _looks_like_a_file(str(source)):
        texts = _prompts_of_dataset(str(source), column, split)
    else:
        raise FileNotFoundError(f"prompt file {str(source)!r} does not exist or is not a file")
    if not texts:
        raise ValueError(f"{source} holds no prompts")
    rows = [PromptRow(i, text, metadata, _prompt_problem(text)) for i, (text, metadata) in enumerate(texts)]
    return rows[:limit] if limit is not None else rows


def _looks_like_a_file(name: str) -> bool:
    return name.lower().endswith((*TEXT_SUFFIXES, *TABLE_SUFFIXES)) or name.startswith((".", os.sep))


def _prompts_of_file(path: Path, column: str) -> list[tuple[str, dict[str, Any]]]:
    """Lines of text or JSON objects (JSONL), or one JSON array of objects."""
    content = path.read_text(encoding="utf-8-sig")
    if content.lstrip().startswith("["):
        try:
            array = json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON (line {error.lineno}): {error.msg}") from None
        return [(_prompt_field(row, column, f"{path} item {i}"), row) for i, row in enumerate(array)]
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            texts.append((line.strip(), {}))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON: {error.msg}") from None
        texts.append((_prompt_field(row, column, f"{path} line {number}"), row))
    return texts


def _prompts_of_dataset(
    name: str, column: str, split: str, data_files: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, data_files=data_files)
    except Exception as error:  # datasets raises many kinds (not found, offline, bad split): all mean "cannot use"
        what = data_files or name
        raise ValueError(f"--prompts {what!r} could not be loaded as a dataset: {error}") from error
    if column not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise ValueError(f"dataset {data_files or name!r} has no column {column!r} (columns: {columns})")
    return [(_prompt_field(row, column, f"dataset {name!r} row {i}"), row) for i, row in enumerate(dataset)]


def _prompt_field(row: Any, column: str, where: str) -> str:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, not an object")
    text = row.get(column)
    if not isinstance(text, str):
        raise ValueError(f"{where} has no string {column!r} field (--prompt-column names it)")
    if not text.strip():
        raise ValueError(f"{where} has an empty {column!r}")
    return text.strip()


def _prompt_problem(text: str) -> str | None:
    """Why the preference loader would refuse this prompt as a user turn (None if it would not)."""
    for token in (
        *QWEN2_VL_SPECIAL_TOKENS,
        *IMAGE_GEN_SPECIAL_TOKENS,
        SHAREGPT_IMAGE_PLACEHOLDER,
        SHAREGPT_IMAGE_GEN_PLACEHOLDER,
    ):
        if token in text:
            return f"the prompt contains {token}"
    return None


def slug(prompt: str) -> str:
    """The file stem a winner image may carry for its prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")


# ---------------------------------------------------------------- winners


class WinnerIndex:
    """Winner image paths per prompt, from a folder keyed by index or slug, or from a JSONL mapping."""

    def __init__(
        self, by_index: dict[int, list[Path]], by_key: dict[str, list[Path]], keyed_by_slug: bool, source: str
    ) -> None:
        self.by_index, self.by_key, self.keyed_by_slug, self.source = by_index, by_key, keyed_by_slug, source

    @classmethod
    def load(cls, source: str | os.PathLike) -> WinnerIndex:
        path = Path(source)
        if path.is_dir():
            return cls._of_folder(path)
        if path.is_file():
            return cls._of_mapping(path)
        raise FileNotFoundError(f"winners {str(source)!r} is neither a folder nor a JSONL file")

    @classmethod
    def _of_folder(cls, folder: Path) -> WinnerIndex:
        by_index: dict[int, list[Path]] = {}
        by_slug: dict[str, list[Path]] = {}
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                inner = entry / "samples" if (entry / "samples").is_dir() else entry
                images, key = _images_in(inner), entry.name
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                images, key = [entry], entry.stem
            else:
                continue
            if key.isdigit():
                by_index.setdefault(int(key), []).extend(images)
            else:
                by_slug.setdefault(key, []).extend(images)
        return cls(by_index, by_slug, keyed_by_slug=True, source=str(folder))

    @classmethod
    def _of_mapping(cls, path: Path) -> WinnerIndex:
        by_text: dict[str, list[Path]] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{where} needs a string "prompt" and an "image" (or "images") path')
            images = row.get("images", [row["image"]] if "image" in row else None)
            if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
                raise ValueError(f'{where} needs an "image" path or a non-empty "images" list')
            for name in images:
                image = Path(name) if Path(name).is_absolute() else path.parent / name
                if not image.is_file():
                    raise FileNotFoundError(f"{where}: winner image {name!r} not found (looked at {image})")
                by_text.setdefault(row["prompt"].strip(), []).append(image)
        return cls({}, by_text, keyed_by_slug=False, source=str(path))

    def winners(self, row: PromptRow) -> list[Path]:
        """The prompt's winner images: by index, else by slug (a folder) or by prompt text (a mapping)."""
        if row.index in self.by_index:
            return self.by_index[row.index]
        return self.by_key.get(slug(row.prompt) if self.keyed_by_slug else row.prompt, [])


def _images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]


# ---------------------------------------------------------------- scorers


# built-in scorers by name: `module:NAME` as `--scorer` takes it, loaded only when asked for (a world's scorer
# is evaluation code, which training does not import)
BUILTIN_SCORERS: Mapping[str, str] = MappingProxyType({"shapes": "vargpt.shapes.recipe:ShapesScorer"})


def load_scorer(name: str) -> PromptScorer:
    """A built-in scorer by name, or `module:NAME` (a class built without arguments, or a callable)."""
    module_name, _, attribute = BUILTIN_SCORERS.get(name, name).partition(":")
    if not attribute:
        raise ValueError(f"unknown scorer {name!r}: built in are {', '.join(BUILTIN_SCORERS)}; or give module:NAME")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"scorer {name!r} cannot be loaded: {error}") from error
    scorer = found() if isinstance(found, type) else found
    if not callable(scorer):
        raise ValueError(f"scorer {name!r} is not callable")
    return scorer


# ---------------------------------------------------------------- configuration


@dataclass
class DPOPairsConfig:
    """Everything one `vargpt dpo-pairs` process does (the command line's flags, by the same names; the command,
    `vargpt.cli.training`, fills it and calls `build_dpo_pairs`)."""

    prompts: str
    models: list[str]
    out: str
    winners: str | None = None
    scorer: str | None = None
    prompt_column: str = "prompt"
    prompt_split: str = "train"
    limit: int | None = None
    samples_per_prompt: int = 1
    batch_size: int = 8
    seed: int = 0
    num_shards: int = 1
    shard_index: int = 0
    merge_only: bool = False
    strict: bool = False
    progress: bool = True
    preset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    response: str = DEFAULT_RESPONSE

    def validate(self) -> None:
        if not self.models:
            raise ValueError("give at least one --model checkpoint to draw losers from")
        for name, value in (("--samples-per-prompt", self.samples_per_prompt), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard {self.shard_index} of {self.num_shards}: need 0 <= --shard-index < --num-shards")
        if self.winners is None and self.scorer is None:
            raise ValueError(
                "give --winners (a folder or a JSONL mapping), or a --scorer to pick winners among samples"
            )
        if self.response.count(SHAREGPT_IMAGE_GEN_PLACEHOLDER) != 1:
            raise ValueError(
                f"the response text must hold {SHAREGPT_IMAGE_GEN_PLACEHOLDER} once, got {self.response!r}"
            )

    def identity(self, rows: Sequence[PromptRow]) -> dict[str, Any]:
        """What decides the samples and pairs: a folder is resumed only when these agree."""
        digest = hashlib.sha256("\n".join(r.prompt for r in rows).encode("utf-8")).hexdigest()
        return {
            "format": FORMAT,
            "prompts": {"count": len(rows), "sha256": digest},
            "models": list(self.models),
            "samples_per_prompt": self.samples_per_prompt,
            "seed": self.seed,
            "preset": self.preset,
            "settings": dict(sorted(self.settings.items())),
            "winners": self.winners,
            "scorer": self.scorer,
            "response": self.response,
        }


def resolve_shard(num_shards: int | None, shard_index: int | None, environ: Mapping[str, str]) -> tuple[int, int]:
    """(N, I) from the flags, else from WORLD_SIZE / RANK (accelerate launch, torchrun), else (1, 0)."""
    if (num_shards is None) != (shard_index is None):
        raise ValueError("give --num-shards and --shard-index together")
    if num_shards is not None and shard_index is not None:
        return num_shards, shard_index
    if "WORLD_SIZE" in environ:
        try:
            return int(environ["WORLD_SIZE"]), int(environ.get("RANK", "0"))
        except ValueError:
            raise ValueError("WORLD_SIZE and RANK must be integers") from None
    return 1, 0


# ---------------------------------------------------------------- the output folder


class PairsFolder:
    """Paths of the output folder and its atomic writes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def sample(self, model: int, index: int, k: int) -> Path:
        return self.root / "samples" / f"m{model}" / f"{index:0{INDEX_DIGITS}d}-{k}.png"

    def winner_copy(self, index: int, n: int, source: Path) -> Path:
        return self.root / "winners" / f"{index:0{INDEX_DIGITS}d}-{n}{source.suffix.lower()}"

    def part(self, shard: int, shards: int) -> Path:
        return self.root / "parts" / f"shard-{shard:03d}-of-{shards:03d}.jsonl"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def check_identity(self, identity: dict[str, Any]) -> None:
        path = self.root / "run.json"
        if path.is_file():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error.msg}); remove it to start afresh") from None
            for key, value in identity.items():
                if existing.get(key) != value:
                    raise ValueError(
                        f"{path} was written with {key}={existing.get(key)!r}, this run has {value!r}; "
                        "resume with the same inputs and settings, or use another --out"
                    )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(identity, indent=2), path)

    def copy_atomic(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)

    def records(self, own_part: Path | None = None) -> dict[int, dict[str, Any]]:
        """Finished prompts of every part file, by index; `own_part` loses a line an interruption cut short."""
        found: dict[int, dict[str, Any]] = {}
        folder = self.root / "parts"
        for path in sorted(folder.glob("shard-*.jsonl")) if folder.is_dir() else []:
            records, valid_bytes = _read_records(path)
            if path == own_part and valid_bytes < path.stat().st_size:
                with path.open("r+b") as handle:
                    handle.truncate(valid_bytes)
            for record in records:
                found.setdefault(record["index"], record)
        return found


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of a part file, and how many bytes they take (the rest is a cut line)."""
    records, valid = [], 0
    data = path.read_bytes()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            break
        records.append(record)
        valid += len(line)
    return records, valid


def _append_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write((json.dumps(record) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------- the run


Pipeline = Any  # VARGPTPipeline or anything with its `generate(prompts, num_images=, seed=, **settings)`
PipelineLoader = Callable[[str], Pipeline]


def build_dpo_pairs(config: DPOPairsConfig, load_pipeline: PipelineLoader | None = None) -> dict[str, Any]:
    """Draw this shard's missing samples, pair its unfinished prompts, and merge when every prompt is done.

    `load_pipeline(model_name)` loads one checkpoint (default: `VARGPTPipeline.from_pretrained` with the
    config's device, dtype, preset and loading options); it is called only for checkpoints with samples left
    to draw. Returns what this process did and, once merged, the stats written to stats.json.
    """
    config.validate()
    rows = load_prompts(config.prompts, config.prompt_column, config.prompt_split, config.limit)
    scorer = _checked_scorer(config.scorer, rows) if config.scorer else None
    winners = WinnerIndex.load(config.winners) if config.winners is not None else None
    folder = PairsFolder(config.out)
    folder.check_identity(config.identity(rows))
    if config.merge_only:
        return _merge_only(folder, rows, config)
    part = folder.part(config.shard_index, config.num_shards)
    done = folder.records(own_part=part)
    mine = [r for r in rows if r.index % config.num_shards == config.shard_index and r.index not in done]
    if config.strict and winners is not None:
        _refuse_missing_winners(mine, winners)
    # a prompt without a winner is skipped anyway: drawing its losers would waste the model's time
    to_draw = [r for r in mine if r.problem is None and (winners is None or winners.winners(r))]
    loader = load_pipeline or _default_loader(config)
    for m, model in enumerate(config.models):
        _draw_samples(folder, m, model, to_draw, config, loader)
    bar = _progress_bar(len(mine), config, "pairing")
    for row in mine:
        _append_line(part, _pair_prompt(row, folder, winners, scorer, config))
        bar.update(1)
    bar.close()
    stats = merge_parts(folder, rows, config)
    result = {"shard": [config.shard_index, config.num_shards], "prompts_done_now": len(mine), "merged": False}
    return result | ({"merged": True, "stats": stats} if stats is not None else {})


def _checked_scorer(name: str, rows: Sequence[PromptRow]) -> PromptScorer:
    """The named scorer, after its own `check(row)` (where it has one) accepted every row: a scorer that cannot
    read the prompts fails before any model loads."""
    scorer = load_scorer(name)
    check = getattr(scorer, "check", None)
    if check is not None:
        for row in rows:
            check(row)
    return scorer


def _merge_only(folder: PairsFolder, rows: Sequence[PromptRow], config: DPOPairsConfig) -> dict[str, Any]:
    stats = merge_parts(folder, rows, config)
    if stats is None:
        missing = len(rows) - len(folder.records())
        raise ValueError(f"{missing} of {len(rows)} prompts are not finished yet: run the missing shards first")
    return {"merged": True, "stats": stats}


def _refuse_missing_winners(rows: Sequence[PromptRow], winners: WinnerIndex) -> None:
    lacking = [r for r in rows if r.problem is None and not winners.winners(r)]
    if lacking:
        named = ", ".join(f"{r.index} ({r.prompt!r})" for r in lacking[:5])
        raise ValueError(f"{len(lacking)} prompt(s) have no winner in {winners.source}, e.g. {named}")


def _default_loader(config: DPOPairsConfig) -> PipelineLoader:
    def load(name: str) -> Pipeline:
        return VARGPTPipeline.from_pretrained(
            name, device=config.device, dtype=config.dtype, image_preset=config.preset, **config.load_kwargs
        )

    return load


def _draw_samples(
    folder: PairsFolder, m: int, model: str, rows: Sequence[PromptRow], config: DPOPairsConfig, load: PipelineLoader
) -> None:
    """Every missing sample of checkpoint `m` for `rows`, `batch_size` images per call (whole prompts)."""
    k_count = config.samples_per_prompt
    todo = [r for r in rows if not all(folder.sample(m, r.index, k).is_file() for k in range(k_count))]
    if not todo:
        return
    pipe = load(model)
    per_call = max(1, config.batch_size // k_count)
    batches = [todo[start : start + per_call] for start in range(0, len(todo), per_call)]
    bar = _progress_bar(len(todo), config, f"sampling m{m}")
    for batch in batches:
        seeds = [config.seed + r.index * k_count for r in batch]
        images = pipe.generate([r.prompt for r in batch], num_images=k_count, seed=seeds, **config.settings)
        if len(images) != len(batch) * k_count:
            raise RuntimeError(f"the pipeline returned {len(images)} images for {len(batch)} x {k_count}")
        for b, row in enumerate(batch):
            for k in range(k_count):
                target = folder.sample(m, row.index, k)
                target.parent.mkdir(parents=True, exist_ok=True)
                save_png_atomic(images[b * k_count + k], target)
        bar.update(len(batch))
    bar.close()
    del pipe
    _release_memory()


def _progress_bar(total: int, config: DPOPairsConfig, what: str) -> Any:
    desc = f"{what} [shard {config.shard_index + 1}/{config.num_shards}]"
    return tqdm(total=total, desc=desc, unit="prompt", disable=not config.progress, file=sys.stderr)


def _release_memory() -> None:
    """Free one checkpoint before the next loads (a GPU holds one model of this size at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pair_prompt(
    row: PromptRow,
    folder: PairsFolder,
    winners: WinnerIndex | None,
    scorer: PromptScorer | None,
    config: DPOPairsConfig,
) -> dict[str, Any]:
    """The part-file record of one prompt: its pair rows (their images already in place) and its skipped
    candidates per reason."""
    candidates = [(m, k) for m in range(len(config.models)) for k in range(config.samples_per_prompt)]
    record: dict[str, Any] = {"index": row.index, "prompt": row.prompt, "pairs": [], "skipped": {}}
    if row.problem is not None:
        return record | {"skipped": {INVALID_PROMPT: len(candidates)}, "problem": row.problem}
    samples = {c: folder.sample(c[0], row.index, c[1]) for c in candidates}
    if winners is not None:
        given = winners.winners(row)
        chosen = [path for path in given if _readable(path)]
        reason = WINNER_UNREADABLE if given else NO_WINNER
        if not chosen:  # its losers were never drawn
            return record | {"skipped": {reason: len(candidates)}, "without_winner": True}
    satisfied = {c: _satisfies(scorer, path, row) for c, path in samples.items()} if scorer else {}
    if winners is None:  # the scorer picks the winners among the samples
        chosen = [samples[c] for c in candidates if satisfied[c]]
        reason = NO_WINNER
    if not chosen:
        return record | {"skipped": {reason: len(candidates)}, "without_winner": True}
    skipped: Counter[str] = Counter()
    for p, candidate in enumerate(candidates):
        if satisfied.get(candidate, False):
            skipped[LOSER_SATISFIES_PROMPT] += 1
            continue
        n = p % len(chosen)
        winner = chosen[n]
        if winners is not None:  # copied in, so the output folder holds every image its rows name
            copy = folder.winner_copy(row.index, n, winner)
            if not copy.is_file():
                folder.copy_atomic(winner, copy)
            winner = copy
        loser = samples[candidate]
        record["pairs"].append(
            _pair_row(row, folder.relative(winner), folder.relative(loser), chosen[n], candidate, config)
        )
    return record | {"skipped": dict(skipped)}


def _satisfies(scorer: PromptScorer, path: Path, row: PromptRow) -> bool:
    with Image.open(path) as image:
        return bool(scorer(image.convert("RGB"), row))


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _pair_row(
    row: PromptRow, winner: str, loser: str, winner_source: Path, candidate: tuple[int, int], config: DPOPairsConfig
) -> dict[str, Any]:
    m, k = candidate
    answer = {"role": "assistant", "content": config.response}
    return {
        "conversations": [{"role": "user", "content": row.prompt}],
        "chosen": answer,
        "rejected": answer,
        "images": [winner, loser],
        "meta": {
            "prompt_index": row.index,
            "model": config.models[m],
            "sample": k,
            "seed": config.seed + row.index * config.samples_per_prompt + k,
            "winner_source": str(winner_source),
        },
    }


def merge_parts(folder: PairsFolder, rows: Sequence[PromptRow], config: DPOPairsConfig) -> dict[str, Any] | None:
    """pairs.jsonl (prompt order) and stats.json from the part files, once every prompt is recorded; else None."""
    records = folder.records()
    if any(r.index not in records for r in rows):
        return None
    ordered = [records[r.index] for r in rows]
    pairs = [pair for record in ordered for pair in record["pairs"]]
    skipped: Counter[str] = Counter()
    per_model: Counter[str] = Counter()
    for record in ordered:
        skipped.update(record["skipped"])
    for pair in pairs:
        per_model[pair["meta"]["model"]] += 1
    stats = {
        "prompts": len(rows),
        "pairs": len(pairs),
        "candidates": len(rows) * len(config.models) * config.samples_per_prompt,
        "skipped": dict(sorted(skipped.items())),
        "prompts_without_winner": sum(bool(r.get("without_winner")) for r in ordered),
        "pairs_per_model": {name: per_model[name] for name in config.models},
        "winners": config.winners if config.winners is not None else f"samples the scorer accepts ({config.scorer})",
        "scorer": config.scorer,
        "samples_per_prompt": config.samples_per_prompt,
        "seed": config.seed,
    }
    write_text_atomic("".join(json.dumps(p) + "\n" for p in pairs), folder.root / "pairs.jsonl")
    write_text_atomic(json.dumps(stats, indent=2), folder.root / "stats.json")
    return stats
