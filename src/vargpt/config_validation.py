"""Checks on a `config.json` before it becomes a `VARGPTConfig`, so a bad file fails in one line naming it.

transformers reports a JSON syntax error as an `OSError` without the position, a JSON list as a `TypeError` about
`**`, and a wrong type as a multi-line error naming the field but not its section (`hidden_size` of which part?).
Worse, nothing bounds sizes: a typo such as `"num_hidden_layers": 1000000000000` or an `embed_dim` of 1e9 would
try to allocate the model and hang the machine. Here every size field must be a positive integer (never a bool or
a float, even 1e6), layer counts stay under `MAX_LAYERS`, and the whole model under `MAX_PARAMETERS`, estimated
analytically (the published 7B + 2B model has about 1.1e10).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError

# 90 times the published model: room for any model of this family one could train, far below a typo's size.
MAX_PARAMETERS = 10**12
# Layer counts beyond this are typos (the published model has 28 LLM, 32 ViT and 32 decoder blocks).
MAX_LAYERS = 1024

_SECTIONS = ("text_config", "vision_config", "visual_decoder_config", "image_tokenizer_config")
_LLM_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
# Fields that must be positive integers, per section ("" = the top level, which also holds the flat LLM layout).
_SIZE_FIELDS: dict[str, tuple[str, ...]] = {
    "": (*_LLM_SIZES, "image_resolution", "image_gen_pad_multiple"),
    "text_config": _LLM_SIZES,
    "vision_config": (
        "depth",
        "embed_dim",
        "hidden_size",
        "num_heads",
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "in_channels",
    ),
    "visual_decoder_config": (
        "depth",
        "embed_dim",
        "num_heads",
        "bits",
        "context_dim",
        "num_block_chunks",
        "num_scale_levels",
        "cfg_uncond_length",
        "rope_max_grid",
        "ffn_hidden_multiple",
    ),
    "image_tokenizer_config": ("in_channels", "base_channels", "num_res_blocks", "norm_groups", "bits"),
}
_LAYER_FIELDS = ("num_hidden_layers", "depth", "num_res_blocks")
# What building a configuration from bad values raises: our checks, transformers' strict dataclass checks, and
# the TypeErrors of values that reach arithmetic or `**` unchecked.
CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)


class ConfigFileError(ValueError):
    """A `config.json` that cannot describe a model; the message names the file and the field."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (the commands print errors as one line)."""
    return re.sub(r"\s*\n\s*", "; ", str(error).strip())


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a config.json that must hold one JSON object, naming the file and the position on failure."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigFileError(
            f"{os.fspath(path)} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"{os.fspath(path)} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    if not isinstance(values, dict):
        raise ConfigFileError(f"{os.fspath(path)} must hold a JSON object of settings, found a {_json_type(values)}")
    return values


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_config_values(values: Mapping[str, Any]) -> None:
    """Reject sub-configs that are not objects and size fields that are not positive integers, naming the field
    as `section.field`; layer counts above `MAX_LAYERS` too (the configuration itself would allocate per layer)."""
    for section in _SECTIONS:
        if values.get(section) is not None and not isinstance(values[section], Mapping):
            raise ValueError(f"{section} must be an object of settings, found a {_json_type(values[section])}")
    for section, fields in _SIZE_FIELDS.items():
        settings = values.get(section) if section else values
        for name in fields if settings else ():
            if name in settings:
                _check_size(f"{section}.{name}" if section else name, settings[name], name in _LAYER_FIELDS)


def _check_size(field: str, value: Any, is_layer_count: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if is_layer_count and value > MAX_LAYERS:
        raise ValueError(f"{field} is {value}, above the limit of {MAX_LAYERS} layers (a typo?)")


def estimated_parameters(config: Any) -> float:
    """About how many weights `VARGPTForConditionalGeneration(config)` holds (within 15% for the presets),
    from the sizes alone: fast enough to check every configuration before anything is allocated."""
    text, vision = config.text_config, config.vision_config
    decoder, tokenizer = config.visual_decoder_config, config.image_tokenizer_config
    width = text.hidden_size
    llm = text.num_hidden_layers * (4 * width**2 + 3 * width * text.intermediate_size)
    merged = vision.embed_dim * vision.spatial_merge_size**2
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * vision.embed_dim
    vit = vision.depth * (4 + 2 * vision.mlp_ratio) * vision.embed_dim**2 + patch + merged**2 + merged * width
    dim = decoder.embed_dim
    block = (14 + 2 * decoder.mlp_ratio) * dim**2 + 2 * decoder.context_dim * dim
    gen = decoder.depth * block + decoder.cfg_uncond_length * decoder.context_dim + text.vocab_size * dim
    projectors = 2 * (dim**2 + dim * width + width**2)
    channels = [tokenizer.base_channels * m for m in tokenizer.channel_multipliers]
    vae = sum(2 * (2 * tokenizer.num_res_blocks + 1) * 9 * c**2 for c in channels)
    return float(2 * text.vocab_size * width + llm + vit + gen + projectors + vae)


def check_parameter_count(config: Any) -> None:
    """Refuse a configuration whose model would exceed `MAX_PARAMETERS` (a typo in a size, not a real model)."""
    count = estimated_parameters(config)
    if not count <= MAX_PARAMETERS:  # also catches NaN from a float setting such as mlp_ratio
        raise ValueError(
            f"the settings describe a model of about {count:.2g} parameters, above the limit of "
            f"{MAX_PARAMETERS:.0g} (is a size mistyped? vocab_size, hidden_size, intermediate_size, embed_dim, ...)"
        )


def config_source(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """The config.json a folder (or a file path) stands for, to name in error messages."""
    location = Path(os.fspath(path))
    if location.is_dir():
        location = location / (subfolder or "") / "config.json"
    return str(location)
