"""Resumable, batched, multi-process sampling of benchmark prompts into a scorer's folder layout.

GenEval and DPG-Bench differ only in where a prompt's images go (`OutputLayout`); everything else lives here:

* Batching across prompts: one `pipe.generate` call draws `images_per_prompt` images for each of several
  prompts. Image j of the prompt with benchmark index i is drawn from seed `seed + i * images_per_prompt + j`
  alone, so a prompt's images do not depend on the batch size or on which prompts share its call; the
  manifest records each prompt's first seed.
* Resuming: a prompt whose outputs are all present and readable is skipped. Every file is written to a
  hidden temporary name (never matched by the official scorers' file patterns) and renamed into place, so
  an interrupted run leaves either a complete image or none.
* Processes: prompts are split with accelerate's `PartialState.split_between_processes`; each process
  writes its own prompts and appends a line per finished prompt to `.manifest/rank-<i>.jsonl`; the main
  process merges them into `manifest.json` at the end. A folder is only resumed with the same model,
  settings, seed and images per prompt (anything else would mix two experiments), else ValueError.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

from PIL import Image
from tqdm.auto import tqdm

from ..atomic_files import write_text_atomic
from ..generation.config import ImageGenerationConfig

MANIFEST_NAME = "manifest.json"
RANK_RECORDS_DIR = ".manifest"
# Fields that must agree for a folder to be resumed: they decide what the images are.
_RUN_IDENTITY = ("format", "model", "images_per_prompt", "seed", "settings")


@dataclass(frozen=True)
class PromptJob:
    """One benchmark prompt: `index` is its line in the benchmark file, `key` names its output."""

    index: int
    key: str
    prompt: str
    metadata: dict[str, Any]


class OutputLayout(Protocol):
    """Where a prompt's images go in a scorer's folder."""

    format_name: str

    def is_complete(self, job: PromptJob, images_per_prompt: int) -> bool:
        """True when every output of `job` is present and readable."""

    def write(self, job: PromptJob, images: Sequence[Image.Image]) -> None:
        """Write the images of one prompt (atomically, file by file)."""


class ProcessState(Protocol):
    """The part of accelerate's `PartialState` the sampler uses."""

    process_index: int
    num_processes: int
    is_main_process: bool
    is_local_main_process: bool

    def split_between_processes(self, inputs: list, apply_padding: bool = False): ...

    def wait_for_everyone(self) -> None: ...


# ---------------------------------------------------------------- atomic files


def is_readable_png(path: Path) -> bool:
    """True when `path` is a PNG whose chunks all check out (a truncated or foreign file is not)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


# ---------------------------------------------------------------- the run


def resolved_settings(pipe, preset: str | None, settings: dict[str, Any] | None) -> dict[str, Any]:
    """Every image setting the run uses, with the resolution made explicit (the manifest's record)."""
    base = ImageGenerationConfig.from_preset(preset) if preset else pipe.image_config
    config = base.updated(**(settings or {}))
    values = config.to_dict()
    if values["resolution"] is None:
        values["resolution"] = int(pipe.model.config.image_resolution)
    return values


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}); remove it to start the folder afresh") from err


def _check_same_run(existing: dict[str, Any], header: dict[str, Any], path: Path) -> None:
    for key in _RUN_IDENTITY:
        if existing.get(key) != header[key]:
            raise ValueError(
                f"{path} was written with {key}={existing.get(key)!r}, this run has {header[key]!r}; "
                "resume with the same model and settings, or use another --out"
            )


def _rank_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    folder = out_dir / RANK_RECORDS_DIR
    for file in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: its prompt is redone or already recorded again
                records[record["key"]] = record
    return records


@contextmanager
def _my_share(state: ProcessState, jobs: list[PromptJob]) -> Iterator[list[PromptJob]]:
    if state.num_processes == 1:
        yield jobs
        return
    with state.split_between_processes(jobs) as mine:
        yield list(mine)


def _batches(jobs: Sequence[PromptJob], size: int) -> Iterator[list[PromptJob]]:
    for start in range(0, len(jobs), size):
        yield list(jobs[start : start + size])


class SamplingOptions(TypedDict, total=False):
    """The keyword arguments of `sample_prompts` that the benchmark samplers pass through unchanged."""

    batch_size: int
    seed: int
    preset: str | None
    settings: dict[str, Any] | None
    state: ProcessState | None
    progress: bool


def sample_prompts(
    pipe,
    jobs: Sequence[PromptJob],
    layout: OutputLayout,
    out_dir: str | os.PathLike,
    *,
    model_name: str,
    images_per_prompt: int,
    batch_size: int = 16,
    seed: int = 0,
    preset: str | None = None,
    settings: dict[str, Any] | None = None,
    state: ProcessState | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the missing outputs of `jobs` into `out_dir`; returns the manifest (merged on the main process).

    `batch_size` is the number of images per model call; a call holds `max(1, batch_size // images_per_prompt)`
    prompts. `settings` are `ImageGenerationConfig` fields on top of `preset` (or the pipeline's default).
    """
    _check_request(jobs, images_per_prompt, batch_size)
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RANK_RECORDS_DIR).mkdir(exist_ok=True)
    header = {
        "format": layout.format_name,
        "model": model_name,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "settings": resolved_settings(pipe, preset, settings),
        "preset": preset,
        "batch_size": batch_size,
        "num_processes": state.num_processes,
        "seeding": (
            "image j of the prompt with benchmark index i is drawn from seed + i * images_per_prompt + j alone "
            "(independent of batch size and batch mates); prompts[key].seed is its first seed"
        ),
    }
    _start_manifest(out / MANIFEST_NAME, header, state)
    with _my_share(state, list(jobs)) as mine:
        _draw_share(pipe, mine, layout, out, header, state, progress)
    state.wait_for_everyone()
    merged = _read_manifest(out / MANIFEST_NAME) or header
    if state.is_main_process:
        merged["prompts"] = {**merged.get("prompts", {}), **_rank_records(out)}
        write_text_atomic(json.dumps(merged, indent=2), out / MANIFEST_NAME)
    state.wait_for_everyone()
    return merged


def _check_request(jobs: Sequence[PromptJob], images_per_prompt: int, batch_size: int) -> None:
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("two prompts share an output name; the benchmark file has duplicate ids")


def _start_manifest(manifest_path: Path, header: dict[str, Any], state: ProcessState) -> None:
    """Refuse a folder written by another run, then (main process) write the header over the prompts so far."""
    existing = _read_manifest(manifest_path)
    if existing is not None:
        _check_same_run(existing, header, manifest_path)
    if state.is_main_process:
        previous = existing.get("prompts", {}) if existing else {}
        write_text_atomic(json.dumps(header | {"prompts": previous}, indent=2), manifest_path)
    state.wait_for_everyone()


def _draw_share(
    pipe,
    mine: list[PromptJob],
    layout: OutputLayout,
    out: Path,
    header: dict[str, Any],
    state: ProcessState,
    progress: bool,
) -> None:
    """Draw this process's unfinished prompts batch by batch, recording each finished prompt in its rank file."""
    images_per_prompt, seed = header["images_per_prompt"], header["seed"]
    per_call = max(1, header["batch_size"] // images_per_prompt)
    records_file = out / RANK_RECORDS_DIR / f"rank-{state.process_index}.jsonl"
    todo = [job for job in mine if not layout.is_complete(job, images_per_prompt)]
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=f"{layout.format_name} sampling",
        unit="prompt",
        disable=not (progress and state.is_local_main_process),
    )
    for batch in _batches(todo, per_call):
        prompt_seeds = [seed + job.index * images_per_prompt for job in batch]
        images = pipe.generate(
            [job.prompt for job in batch], num_images=images_per_prompt, seed=prompt_seeds, **header["settings"]
        )
        for row, job in enumerate(batch):
            layout.write(job, images[row * images_per_prompt : (row + 1) * images_per_prompt])
            record = {
                "key": job.key,
                "index": job.index,
                "prompt": job.prompt,
                "seed": prompt_seeds[row],
                "rank": state.process_index,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            with records_file.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.update(len(batch))
    bar.close()
