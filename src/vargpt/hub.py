"""Where a model name points: a local folder, a model shipped in the package, or a Hugging Face Hub repo.

Every loader (`VARGPTForConditionalGeneration`, `VARGPTProcessor`, `VARGPTPipeline`, `vargpt inspect`, and so
every command's `--model`) calls `resolve_checkpoint` first and then reads a local folder only, so transformers
never goes to the network on its own (where it retries for minutes and ends in a long traceback) and a
name that is not a checkpoint fails in one line.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .configuration import PRESETS

SHIPPED_MODELS = ("vargpt-shapes-tiny",)
CONFIG_FILE = "config.json"
# What a checkpoint needs: configs and settings (*.json: config, generation and image settings, processor,
# tokenizer, safetensors index), weights, the chat template and tokenizer vocabularies. Nothing else in a repo
# (training logs, sample images, .bin duplicates) is downloaded.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja", "merges.txt", "*.model", "*.tiktoken")
_TRUE = {"1", "ON", "YES", "TRUE"}


def shipped_model_path(name: str) -> Path | None:
    """Folder of a model shipped inside the package (trained by this project's recipes), if present."""
    if name not in SHIPPED_MODELS:
        return None
    folder = Path(str(resources.files("vargpt").joinpath("models", name)))
    return folder if (folder / CONFIG_FILE).is_file() else None


def known_names() -> list[str]:
    """Names that need no folder: shipped models and presets (for error messages)."""
    return sorted([*PRESETS, *SHIPPED_MODELS])


HUB_ARGUMENTS = ("revision", "cache_dir", "local_files_only", "token")


def pop_hub_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Hub keywords transformers' `from_pretrained` takes (`HUB_ARGUMENTS`), removed from `kwargs`, so a
    `from_pretrained` override resolves the name first and passes the rest on."""
    return {name: kwargs.pop(name, None) for name in HUB_ARGUMENTS}


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    require: str | None = CONFIG_FILE,
) -> Path:
    """The local folder holding the checkpoint `name_or_path` names.

    In order: an existing folder (as is); a shipped model name ("vargpt-shapes-tiny"); a Hub repo id
    ("owner/name"), whose checkpoint files (`CHECKPOINT_FILES`) are downloaded into the Hub cache, or found
    there when `local_files_only` is set or `HF_HUB_OFFLINE=1`. `local_files_only=None` and `cache_dir=None`
    follow `HF_HUB_OFFLINE` and `HF_HUB_CACHE` / `HF_HOME` as they are when called (not when imported).

    `require` is the file the folder must hold (None: any folder; a processor's folder has no config.json).
    Raises `FileNotFoundError` (a folder without `require`; an id neither cached nor reachable) or
    `ValueError` (a preset, which has no folder; a name that is neither a folder nor a repo id), with one line.
    """
    name = str(name_or_path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _checked_folder(folder, name, require)
    if folder.exists():
        raise ValueError(f"{name} is a file, not a checkpoint folder: give the folder that holds {CONFIG_FILE}")
    shipped = shipped_model_path(name)
    if shipped is not None:
        return shipped
    if name in PRESETS:
        raise ValueError(
            f"{name} is a preset (random weights, no checkpoint folder): build it with "
            f"VARGPTPipeline.from_pretrained({name!r}) or VARGPTConfig.from_preset({name!r})"
        )
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(
            f"{name} is not a checkpoint folder, shipped model or preset ({', '.join(known_names())}), "
            "nor a Hub repo id (owner/name)"
        ) from None
    return _checked_folder(_download(name, revision, cache_dir, local_files_only, token), name, require)


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    token: str | bool | None,
) -> Path:
    """The repo's checkpoint files in the Hub cache (snapshot_download: it does not retry a dead network)."""
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    not_local = f"{repo_id} is not a local folder, shipped model or preset ({', '.join(known_names())})"
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir if cache_dir is not None else hub_cache_dir(),
                local_files_only=local_files_only,
                allow_patterns=list(CHECKPOINT_FILES),
                token=token,
            )
        )
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"Hub repo {repo_id} has no revision {revision}: check the branch, tag or commit"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{not_local}, nor a Hub repo that exists (private or gated ones need `hf auth login`): check the name"
        ) from None
    except OSError as error:  # not cached and offline, or the Hub unreachable (the hub's errors are OSErrors)
        cause = error.__cause__ or error
        if local_files_only or constants.HF_HUB_OFFLINE or isinstance(cause, OfflineModeIsEnabled):
            why = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only)"
        else:
            why = f"the Hub is unreachable ({type(cause).__name__})"
        raise FileNotFoundError(
            f"{not_local}, and the Hub cache does not hold it{at} while {why}: download it on a machine with "
            f"network (`hf download {repo_id}` or `huggingface-cli download {repo_id}`) and copy the cache "
            "(HF_HUB_CACHE), pass a local checkpoint folder, or check the name and revision"
        ) from None


def hub_cache_dir() -> str | None:
    """The Hub cache the environment names now (HF_HUB_CACHE, else HF_HOME/hub), else None: the hub's default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.environ[variable]
    home = os.environ.get("HF_HOME")
    return str(Path(home) / "hub") if home else None


def _checked_folder(folder: Path, name: str, require: str | None) -> Path:
    if require is not None and not (folder / require).is_file():
        raise FileNotFoundError(f"{name} has no {require}: it is not a checkpoint folder")
    return folder
