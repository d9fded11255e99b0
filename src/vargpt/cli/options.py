"""Argument groups the `vargpt` commands share, each flag spelled one way.

Image flags are spelled as the `ImageGenerationConfig` fields (and the server's JSON fields) they set:
`--cfg-scale`, `--tau`, `--top-k`, `--top-p`, `--resolution`, `--aspect-ratio`, `--position-mode`,
`--uncond-mode`, parsed into attributes of the same names, so `image_settings(args)` hands them on unchanged.
The earlier spellings `--cfg` and `--size` still parse for one release, with a line on stderr naming the new one.

`--model`'s default is looked up when a command line is parsed (the shipped shapes model when it is installed,
else the `tiny` preset), never at import: importing a command module reads no file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..generation.config import POSITION_MODES, UNCOND_MODES
from ..quantization import QUANTIZATION_MODES

# `--model`'s default as the help shows it; `model_name` turns it into the model's name at parse time
MODEL_DEFAULT = "the shipped vargpt-shapes-tiny when installed, else the tiny preset"
IMAGE_SETTINGS = ("cfg_scale", "tau", "top_k", "top_p", "resolution", "aspect_ratio", "position_mode", "uncond_mode")
# old spelling -> the setting it sets (removed in the release after this one)
DEPRECATED_SPELLINGS = {"--cfg": "cfg_scale", "--size": "resolution"}
_IMAGE_FLAGS: dict[str, dict[str, Any]] = {
    "cfg_scale": {"type": float, "help": "classifier-free guidance scale"},
    "tau": {"type": float, "help": "bit-logit temperature"},
    "top_k": {"type": int, "help": "bit top-k"},
    "top_p": {"type": float, "help": "bit top-p"},
    "resolution": {"type": int, "help": "square side in pixels (default: the model's)"},
    "aspect_ratio": {"type": float, "help": "height / width, snapped to the decoder's templates"},
    "position_mode": {"choices": POSITION_MODES, "help": "LLM rotary positions of the scale tokens"},
    "uncond_mode": {"choices": UNCOND_MODES, "help": "guidance's unconditional branch"},
}


def flag(setting: str) -> str:
    """The one command-line spelling of an image setting: `cfg_scale` -> `--cfg-scale`."""
    return "--" + setting.replace("_", "-")


# -- the model -----------------------------------------------------------------------------------------------------
def model_name(text: str) -> str:
    """`--model`'s type. argparse runs a string default through `type` only when the option is not given, and only
    while parsing: so the default's description becomes the default model's name then, not at import."""
    if text != MODEL_DEFAULT:
        return text
    from ..pipeline import default_model_name

    return default_model_name()


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--model` and `--revision` (how every command names the model it loads, resolved by `vargpt.hub`) and the
    loading options that `model_load_kwargs` turns into `VARGPTPipeline.from_pretrained` keywords."""
    parser.add_argument(
        "--model",
        default=default or MODEL_DEFAULT,
        type=model_name,
        help="checkpoint folder, shipped model, preset or Hub repo id owner/name (default: %(default)s)",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id (default: main)")
    parser.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZATION_MODES,
        help="store the LLM's layers and the decoder's blocks in 8 or 4 bits (bitsandbytes)",
    )
    parser.add_argument(
        "--device-map",
        default=None,
        choices=("auto",),
        help="spread the model over the GPUs, then the CPU, then --offload-folder (see --max-memory)",
    )
    parser.add_argument(
        "--max-memory",
        nargs="+",
        default=None,
        metavar="DEVICE=SIZE",
        help="weight budget per device for --device-map auto, in order of use, e.g. 0=20GiB cpu=60GiB disk=200GB",
    )
    parser.add_argument("--offload-folder", default=None, help="folder for weights offloaded to disk")


def model_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `VARGPTPipeline.from_pretrained` keywords the model arguments of a command give."""
    from ..device_map import parse_max_memory_argument

    max_memory = parse_max_memory_argument(args.max_memory)
    if max_memory is not None and args.device_map is None:
        raise ValueError("--max-memory needs --device-map auto")
    loading = {
        "quantization": args.quantize,
        "device_map": args.device_map,
        "max_memory": max_memory,
        "offload_folder": args.offload_folder,
    }
    return {"revision": args.revision} | {k: v for k, v in loading.items() if v is not None}


def add_device_arguments(
    parser: argparse.ArgumentParser,
    *,
    device: str | None = None,
    dtype: str | None = None,
    with_dtype: bool = True,
    role: str = "",
) -> None:
    """`--device` (and `--dtype`): where a command runs its model. Without a default, CUDA when available and
    bf16 there, fp32 on the CPU. `role` names whose device it is where a command has several models."""
    where = "(default: %(default)s)" if device else "(default: cuda when available)"
    parser.add_argument("--device", default=device, help=f"{role}cpu, cuda, cuda:1 ... {where}")
    if with_dtype:
        precision = "(default: %(default)s)" if dtype else "(default: bf16 on CUDA, fp32 on CPU)"
        parser.add_argument("--dtype", default=dtype, help=f"float32, bfloat16 ... {precision}")


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """`--quiet`: no progress bars (`vargpt.cli.main` then also hides transformers' own)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# -- image generation settings ---------------------------------------------------------------------------------
class _DeprecatedSpelling(argparse.Action):
    """An old spelling of a flag: stores like the new one and says on stderr which one to use."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        print(
            f"vargpt: deprecated: {option_string} is now spelled {self.new}; the old spelling goes in the next release",
            file=sys.stderr,
            flush=True,
        )
        setattr(namespace, self.dest, values)


def add_image_arguments(
    parser: argparse.ArgumentParser,
    settings: Sequence[str] = IMAGE_SETTINGS,
    *,
    preset_help: str | None = "image settings preset: original-code or paper (default: the model's own settings)",
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """`--preset` (unless `preset_help` is None) and one flag per image setting in `settings`; a flag without a
    default leaves the setting to the preset or the model. `helps` replaces a setting's help text."""
    unknown = set(settings) - set(IMAGE_SETTINGS)
    if unknown:
        raise ValueError(f"unknown image settings {sorted(unknown)}; known: {list(IMAGE_SETTINGS)}")
    defaults, helps = defaults or {}, helps or {}
    group = parser.add_argument_group("image generation settings")
    if preset_help is not None:
        group.add_argument("--preset", default=None, help=preset_help)
    for setting in settings:
        spec = dict(_IMAGE_FLAGS[setting])
        default = defaults.get(setting)
        text = helps.get(setting, spec.pop("help"))
        if "default:" not in text:
            text += " (overrides the preset)" if default is None else f" (default: {default})"
        group.add_argument(flag(setting), dest=setting, default=default, help=text, **spec)
        for old in (old for old, new in DEPRECATED_SPELLINGS.items() if new == setting):
            group.add_argument(
                old,
                dest=setting,
                type=spec.get("type"),
                action=_DeprecatedSpelling,
                new=flag(setting),
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def image_settings(args: argparse.Namespace, settings: Sequence[str] = IMAGE_SETTINGS) -> dict[str, Any]:
    """The image settings given on the command line (those left unset are not in it)."""
    return {name: getattr(args, name) for name in settings if getattr(args, name, None) is not None}


def image_config(args: argparse.Namespace, model_defaults: Any = None) -> Any:
    """`--preset` (else the model's own settings, else the default preset) with the command line's settings;
    invalid values raise ValueError naming them."""
    from ..generation.config import DEFAULT_IMAGE_PRESET, ImageGenerationConfig

    resolution = getattr(args, "resolution", None)
    if resolution is not None and resolution <= 0:
        raise ValueError(f"--resolution must be a positive number of pixels, got {resolution}")
    overrides = image_settings(args)
    if args.preset or model_defaults is None:
        return ImageGenerationConfig.from_preset(args.preset or DEFAULT_IMAGE_PRESET, **overrides)
    return model_defaults.updated(**overrides)
