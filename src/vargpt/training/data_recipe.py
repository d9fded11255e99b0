"""Fine-tuning recipes on your own data: a checkpoint, then stages of SFT / DPO run in order.

A recipe of this kind is JSON with `"kind": "finetune"` (shapes-world recipes, `vargpt.training.recipe`, have no
`kind` and keep working unchanged; `is_data_recipe` tells them apart):

    {"kind": "finetune", "name": "...", "model": "checkpoint folder, shipped name, Hub id or preset",
     "seed": 0, "bf16": true, "options": {FinetuneArgs fields for every stage, e.g. "gradient_checkpointing"},
     "stages": [{"name": "sft-256", "plan": "stage3-decoder", "data": [sources], "resolution": 256,
                 "steps": 40000, "batch_size": 8, "gradient_accumulation_steps": 16, "learning_rate": 5e-5,
                 "warmup_ratio": 0.1, "trainable": null, "beta": 0.1, "chosen_nll_weight": 0.0,
                 "save_steps": 500, "options": {...}, "notes": "..."}, ...]}

`plan` names a freeze plan of `stages.STAGES` (whose kind, SFT or DPO, decides the data kind); `data` lists sources
(`vargpt.data.sources`) whose paths are relative to the data root given at run time, so a packaged recipe names
files like `sft/stage2.jsonl`. Every stage runs through `run_finetune` in its own folder and starts from the
previous stage's saved model:

    <out>/stages/NN-<name>/   checkpoint-N/ (resumable), final/ (the stage's model), stage.json (its settings),
                              metrics.json and DONE once finished
    <out>/summary.json        stages, their status and the final model's folder

A re-run skips finished stages and resumes an interrupted one from its last complete checkpoint; it refuses a
stage whose saved settings differ from the recipe's (a new --out, or delete that stage's folder).

`vargpt train --recipe R` (its flags are `vargpt.cli.training`'s) calls `run_data_recipe` for such a recipe.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..data.sources import (
    SourceSpec,
    build_stage_data,
    check_files_exist,
    check_mixture,
    parse_source,
    plain_files,
)
from .finetune import FinetuneArgs, run_finetune
from .recipe import read_recipe_text
from .stages import STAGES

RECIPE_KIND = "finetune"
DONE = "DONE"
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RECIPE_FIELDS = ("kind", "name", "model", "seed", "bf16", "options", "notes", "stages")
_STAGE_FIELDS = (
    "name",
    "plan",
    "data",
    "steps",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "warmup_ratio",
    "resolution",
    "trainable",
    "beta",
    "chosen_nll_weight",
    "save_steps",
    "options",
    "notes",
)
# FinetuneArgs fields a recipe sets itself: `options` may not name them
_MANAGED = (
    "model",
    "data",
    "out",
    "stage",
    "trainable",
    "resolution",
    "steps",
    "batch_size",
    "learning_rate",
    "gradient_accumulation_steps",
    "save_steps",
    "seed",
    "bf16",
    "beta",
    "chosen_nll_weight",
    "strict_data",
    "cpu",
    "quiet",
    "warmup_ratio",
    "train_dataset",
)


@dataclass(frozen=True)
class DataStageSpec:
    """One stage of a fine-tuning recipe (fields as in the module docstring)."""

    name: str
    plan: str
    data: tuple[SourceSpec, ...]
    steps: int
    batch_size: int
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    warmup_ratio: float = 0.1
    resolution: int | None = None
    trainable: tuple[str, ...] | None = None
    beta: float = 0.1
    chosen_nll_weight: float = 0.0
    save_steps: int = 500
    options: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def kind(self) -> str:
        return STAGES[self.plan].kind


@dataclass(frozen=True)
class DataRecipe:
    name: str
    model: str
    stages: tuple[DataStageSpec, ...]
    seed: int = 0
    bf16: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    # the recipe file's folder (None for a packaged recipe): the default data root
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScaleDown:
    """Run a recipe small: cap every stage's steps, force one resolution, a per-device batch (accumulation then
    defaults to 1: the global batch is batch x processes) or an accumulation."""

    max_steps: int | None = None
    resolution: int | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None

    def apply(self, stage: DataStageSpec) -> DataStageSpec:
        changes: dict[str, Any] = {}
        if self.max_steps is not None:
            changes["steps"] = min(stage.steps, self.max_steps)
        if self.resolution is not None:
            changes["resolution"] = self.resolution
        if self.batch_size is not None:
            changes["batch_size"] = self.batch_size
            changes["gradient_accumulation_steps"] = 1
        if self.gradient_accumulation_steps is not None:
            changes["gradient_accumulation_steps"] = self.gradient_accumulation_steps
        return replace(stage, **changes)


# --- loading and validation ----------------------------------------------------------------------------------


def read_recipe_json(name_or_path: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The JSON of a packaged recipe (by name) or of a file, and the file's path (None when packaged)."""
    text, origin = read_recipe_text(name_or_path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe {name_or_path!s} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {name_or_path!s} must be a JSON object")
    return raw, origin


def is_data_recipe(name_or_path: str | Path) -> bool:
    """Whether `vargpt train` should run this recipe with `run_data_recipe` (else the shapes-world runner)."""
    raw, _ = read_recipe_json(name_or_path)
    return raw.get("kind") == RECIPE_KIND


def load_data_recipe(name_or_path: str | Path) -> DataRecipe:
    raw, origin = read_recipe_json(name_or_path)
    return parse_data_recipe(raw, origin=None if origin is None else str(origin.parent))


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _number(value: Any, where: str, minimum: float, inclusive: bool = True, below: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum) and (below is None or value < below)
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        bound += f" and < {below}" if below is not None else ""
        raise ValueError(f"{where} must be a number {bound}, got {value!r}")
    return float(value)


def _options(raw: Any, where: str) -> dict[str, Any]:
    """Extra `FinetuneArgs` fields (e.g. gradient_checkpointing, deepspeed): only real ones, never managed ones."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object of FinetuneArgs fields, got {raw!r}")
    managed = sorted(set(raw) & set(_MANAGED))
    if managed:
        raise ValueError(f"{where}: {managed} are set by the recipe's own fields, not options")
    unknown = sorted(set(raw) - set(FinetuneArgs.__dataclass_fields__))
    if unknown:
        known = sorted(set(FinetuneArgs.__dataclass_fields__) - set(_MANAGED))
        raise ValueError(f"{where}: unknown option(s) {unknown}; choose from {known}")
    return dict(raw)


def _stage_name(raw: Any, index: int) -> str:
    """The stage's name (a folder name), after checking the stage is an object with only known fields."""
    if not isinstance(raw, dict):
        raise ValueError(f"stage {index} must be an object, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not _STAGE_NAME.match(name):
        raise ValueError(f"stage {index}: name must be letters, digits, '.', '_' or '-' (a folder name), got {name!r}")
    unknown = sorted(set(raw) - set(_STAGE_FIELDS))
    if unknown:
        raise ValueError(f"stage {name!r}: unknown field(s) {unknown}; a stage takes {list(_STAGE_FIELDS)}")
    for key in ("plan", "data", "steps", "batch_size"):
        if key not in raw:
            raise ValueError(f"stage {name!r}: missing field {key!r}")
    return name


def _refuse_dpo_settings_of_sft(raw: dict[str, Any], plan: str, where: str) -> None:
    if STAGES[plan].kind != "dpo":
        for key in ("beta", "chosen_nll_weight"):
            if key in raw:
                raise ValueError(f"{where}: {key} is a DPO setting, but plan {plan!r} is SFT")


def _stage_sources(raw: dict[str, Any], where: str) -> tuple[SourceSpec, ...]:
    if not isinstance(raw["data"], list) or not raw["data"]:
        raise ValueError(f"{where}: data must be a non-empty list of sources")
    sources = tuple(parse_source(s, f"{where} data[{i}]") for i, s in enumerate(raw["data"]))
    check_mixture(sources, f"{where} data")
    return sources


def _stage_trainable(trainable: Any, where: str) -> tuple[str, ...] | None:
    if trainable is None:
        return None
    if not isinstance(trainable, list) or not trainable or not all(isinstance(t, str) and t for t in trainable):
        raise ValueError(f"{where}: trainable must be a non-empty list of parameter-name prefixes")
    if any(t.startswith("vae_local.") for t in trainable):
        raise ValueError(f"{where}: trainable names the image tokenizer (vae_local.), which never trains in a stage")
    return tuple(trainable)


def _stage(raw: Any, index: int) -> DataStageSpec:
    name = _stage_name(raw, index)
    where = f"stage {name!r}"
    plan = raw["plan"]
    if plan not in STAGES:
        raise ValueError(f"{where}: unknown plan {plan!r}; choose one of {sorted(STAGES)}")
    sources = _stage_sources(raw, where)
    trainable = _stage_trainable(raw.get("trainable"), where)
    _refuse_dpo_settings_of_sft(raw, plan, where)
    learning_rate = raw.get("learning_rate")
    resolution = raw.get("resolution")
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise ValueError(f"{where}: notes must be a string")
    return DataStageSpec(
        name=name,
        plan=plan,
        data=sources,
        steps=_positive_int(raw["steps"], f"{where}: steps"),
        batch_size=_positive_int(raw["batch_size"], f"{where}: batch_size"),
        gradient_accumulation_steps=_positive_int(
            raw.get("gradient_accumulation_steps", 1), f"{where}: gradient_accumulation_steps"
        ),
        learning_rate=None
        if learning_rate is None
        else _number(learning_rate, f"{where}: learning_rate", 0.0, inclusive=False),
        warmup_ratio=_number(raw.get("warmup_ratio", 0.1), f"{where}: warmup_ratio", 0.0, below=1.0),
        resolution=None if resolution is None else _positive_int(resolution, f"{where}: resolution"),
        trainable=trainable,
        beta=_number(raw.get("beta", 0.1), f"{where}: beta", 0.0, inclusive=False),
        chosen_nll_weight=_number(raw.get("chosen_nll_weight", 0.0), f"{where}: chosen_nll_weight", 0.0),
        save_steps=_positive_int(raw.get("save_steps", 500), f"{where}: save_steps"),
        options=_options(raw.get("options", {}), f"{where}: options"),
        notes=notes,
    )


def parse_data_recipe(raw: dict[str, Any], origin: str | None = None) -> DataRecipe:
    """A `DataRecipe` from its JSON; every error names the stage and the field."""
    if raw.get("kind") != RECIPE_KIND:
        raise ValueError(f'a fine-tuning recipe has "kind": "{RECIPE_KIND}", got {raw.get("kind")!r}')
    unknown = sorted(set(raw) - set(_RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"recipe: unknown field(s) {unknown}; a recipe takes {list(_RECIPE_FIELDS)}")
    for key in ("name", "model"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ValueError(f"recipe: {key} must be a non-empty string, got {raw.get(key)!r}")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ValueError("recipe: stages must be a non-empty list")
    stages = tuple(_stage(s, i) for i, s in enumerate(raw["stages"]))
    names = [s.name for s in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"recipe: stage names must be unique; repeated: {duplicates}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"recipe: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(raw.get("bf16", False), bool):
        raise ValueError(f"recipe: bf16 must be true or false, got {raw['bf16']!r}")
    return DataRecipe(
        name=raw["name"],
        model=raw["model"],
        stages=stages,
        seed=seed,
        bf16=raw.get("bf16", False),
        options=_options(raw.get("options", {}), "recipe: options"),
        notes=raw.get("notes", ""),
        origin=origin,
    )


# --- running -------------------------------------------------------------------------------------------------


def _rank() -> int:
    """This process's rank; before the first stage has set up the process group, the launcher's RANK."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _write_atomically(path: Path, text: str) -> None:
    """Other processes read these files: never let them see half of one."""
    staging = path.with_name(f".{path.name}.writing")
    staging.write_text(text)
    os.replace(staging, path)


def _barrier() -> None:
    """All processes wait here (after a stage, so none loads its model before the main process has saved it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finetune_args(**kwargs: Any):
    """`FinetuneArgs(**kwargs)`, with an unknown setting named instead of a bare TypeError."""
    unknown = sorted(set(kwargs) - set(FinetuneArgs.__dataclass_fields__))
    if unknown:
        raise ValueError(f"vargpt finetune has no setting {', '.join(unknown)}")
    return FinetuneArgs(**kwargs)


def _stage_settings(
    recipe: DataRecipe, stage: DataStageSpec, model: str, data_root: Path | None, strict: bool, cpu: bool, bf16: bool
) -> dict[str, Any]:
    """Everything that decides what a stage trains: saved with it, compared on a re-run."""
    settings = {
        "model": model,
        "plan": stage.plan,
        "trainable": list(stage.trainable) if stage.trainable else None,
        "data": [s.to_dict() for s in stage.data],
        "data_root": None if data_root is None else str(data_root),
        "resolution": stage.resolution,
        "steps": stage.steps,
        "batch_size": stage.batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "learning_rate": stage.learning_rate,
        "warmup_ratio": stage.warmup_ratio,
        "save_steps": stage.save_steps,
        "seed": recipe.seed,
        "bf16": bf16,
        "strict_data": strict,
        "cpu": cpu,
        "options": recipe.options | stage.options,
    }
    if stage.kind == "dpo":
        settings |= {"beta": stage.beta, "chosen_nll_weight": stage.chosen_nll_weight}
    return settings


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _run_stage(stage: DataStageSpec, folder: Path, settings: dict[str, Any], data_root: Path | None, quiet: bool):
    """One stage through `run_finetune`; returns its result and the data report (None when finetune read files)."""
    files = plain_files(stage.data, data_root)
    common = {
        "model": settings["model"],
        "out": str(folder),
        "stage": stage.plan,
        "trainable": settings["trainable"],
        "resolution": stage.resolution,
        "steps": stage.steps,
        "batch_size": stage.batch_size,
        "learning_rate": stage.learning_rate,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "save_steps": stage.save_steps,
        "seed": settings["seed"],
        "bf16": settings["bf16"],
        "strict_data": settings["strict_data"],
        "cpu": settings["cpu"],
        "quiet": quiet,
        "warmup_ratio": stage.warmup_ratio,
        **settings["options"],
    }
    if stage.kind == "dpo":
        common |= {"beta": stage.beta, "chosen_nll_weight": stage.chosen_nll_weight}
    if files is not None:
        return run_finetune(finetune_args(data=files, **common)), None
    data = build_stage_data(stage.data, stage.kind, data_root, strict=settings["strict_data"], seed=settings["seed"])
    result = run_finetune(finetune_args(data=[], train_dataset=data.dataset, **common))
    return result, data.report


def run_data_recipe(
    recipe: DataRecipe,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    model: str | None = None,
    scale: ScaleDown | None = None,
    strict_data: bool = False,
    cpu: bool = False,
    bf16: bool | None = None,
    stop_after: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the recipe's stages in order under `out` (layout in the module docstring); return the summary.

    `model` replaces the recipe's starting checkpoint; `scale` runs it small; `bf16` None keeps the recipe's;
    `stop_after` ends after that stage (e.g. to build the next DPO stage's pairs from its model, or to relaunch
    the next stages under another DeepSpeed config). Every process of a distributed launch calls this.
    """
    out = Path(out)
    root = Path(data_root) if data_root is not None else (Path(recipe.origin) if recipe.origin else None)
    stages = [scale.apply(s) if scale else s for s in recipe.stages]
    to_run = _stages_to_run(recipe, stages, stop_after, root)
    use_bf16 = recipe.bf16 if bf16 is None else bf16
    current = model or recipe.model
    summary: dict[str, Any] = {"recipe": recipe.name, "stages": []}
    for index, stage in enumerate(to_run):
        folder = out / "stages" / f"{index + 1:02d}-{stage.name}"
        settings = _stage_settings(recipe, stage, current, root, strict_data, cpu, use_bf16)
        _check_saved_settings(stage, folder, settings)
        if (folder / DONE).is_file():
            status, metrics = "done earlier", json.loads((folder / "metrics.json").read_text())
        else:
            status, metrics = "trained", _train_stage(stage, folder, settings, root, quiet)
        summary["stages"].append({"stage": stage.name, "folder": str(folder), "status": status, **metrics})
        current = str(folder / "final")
    summary["final"] = current
    summary["complete"] = len(to_run) == len(stages)
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _stages_to_run(
    recipe: DataRecipe, stages: list[DataStageSpec], stop_after: str | None, root: Path | None
) -> list[DataStageSpec]:
    """The stages up to `stop_after` (all when None), after checking their data files exist (before any trains)."""
    names = [s.name for s in stages]
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"--stop-after {stop_after!r} is not a stage of {recipe.name}; stages: {names}")
    last = names.index(stop_after) if stop_after is not None else len(stages) - 1
    for stage in stages[: last + 1]:
        if root is None and any(s.path is not None and not Path(s.path).is_absolute() for s in stage.data):
            raise ValueError(f"stage {stage.name!r} names files relative to a data root: give --data-root")
        check_files_exist(stage.data, root, f"stage {stage.name!r}")
    return stages[: last + 1]


def _check_saved_settings(stage: DataStageSpec, folder: Path, settings: dict[str, Any]) -> None:
    saved = folder / "stage.json"
    if saved.is_file():
        changes = _changed(json.loads(saved.read_text()), settings)
        if changes:
            raise ValueError(
                f"stage {stage.name!r} in {folder} was started with other settings ({'; '.join(changes)}): "
                "use a new --out or delete that stage's folder"
            )


def _train_stage(
    stage: DataStageSpec, folder: Path, settings: dict[str, Any], root: Path | None, quiet: bool
) -> dict[str, Any]:
    """Train one stage in every process; the main one records its settings first and its metrics and DONE
    marker once all processes have finished it."""
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / "stage.json", json.dumps(settings, indent=2))
    started = time.time()
    result, report = _run_stage(stage, folder, settings, root, quiet)
    metrics = {
        "stage": stage.name,
        "plan": stage.plan,
        "steps": stage.steps,
        "seconds": round(time.time() - started, 1),
        "losses": result.get("losses", []),
        "trainable": result.get("trainable"),
        "data": None if report is None else report.to_dict(),
    }
    _barrier()
    if _rank() == 0:
        _write_atomically(folder / "metrics.json", json.dumps(metrics, indent=2))
        _write_atomically(folder / DONE, time.strftime("%Y-%m-%dT%H:%M:%S"))
    _barrier()
    return metrics
