"""Where each part of the model lives when it does not fit on one device (`device_map="auto"`).

accelerate places modules and wraps each placed module in a hook that brings its weights and inputs to its
device when the module is *called*. VARGPT's generation also reads some weights directly (the `sos`
embedding row, the decoder's `cfg_uncond`, `lvl_embed` and `word_embed`, the VAE) and mixes tensors between
module calls, so a generic placement that spreads or offloads those would hand the scale loop meta tensors.
This map therefore keeps everything on the first (main) device except the repeated blocks, which are only
ever called: the ViT's blocks, the LLM's layers and the visual decoder's blocks. Those fill the main device
after the pinned parts, then the next devices in `max_memory`'s order, then "cpu", then "disk".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .quantization import QUANTIZED_BLOCK_CONTAINERS

# containers of blocks that run only through their own forward, in execution order
MOVABLE_BLOCK_CONTAINERS = ("visual.blocks", "model.layers", "vargpt_gen.block_chunks")

_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_memory(value: int | str) -> int:
    """Bytes in a `max_memory` value: an int, or a string such as "20GiB", "500MB", "1.5 GB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a memory size cannot be negative, got {value}")
        return value
    text = str(value).strip()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.upper().endswith(unit.upper()):
            number = text[: -len(unit)].strip()
            try:
                amount = float(number)
            except ValueError:
                break
            if not math.isfinite(amount) or amount < 0:
                break
            return int(amount * _UNITS[unit])
    raise ValueError(f"cannot read the memory size {value!r}: write e.g. 20GiB, 500MB or a number of bytes")


def parse_max_memory_argument(items: list[str] | None) -> dict[Any, int] | None:
    """`--max-memory 0=20GiB cpu=30GiB` (command-line form) -> `{0: ..., "cpu": ...}` in bytes."""
    if not items:
        return None
    budget: dict[Any, int] = {}
    for item in items:
        device, sep, size = item.partition("=")
        if not sep or not device or not size:
            raise ValueError(f"--max-memory takes DEVICE=SIZE items such as 0=20GiB or cpu=30GiB, got {item!r}")
        key: Any = int(device) if device.isdecimal() else device
        budget[key] = parse_memory(size)
    return budget


def _tensor_bytes(module: nn.Module, dtype: torch.dtype, quantized_bits: int | None = None) -> int:
    """Bytes of a module's parameters and buffers once cast to `dtype` (integer buffers keep their size);
    with `quantized_bits`, linear weights count at that width (their scales are a rounding error here)."""
    total = 0
    for name, t in [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)]:
        size = dtype.itemsize if t.is_floating_point() else t.element_size()
        if quantized_bits and name.endswith("weight") and t.ndim == 2 and isinstance(_owner(module, name), nn.Linear):
            size = quantized_bits / 8
        total += int(t.numel() * size)
    return total


def _owner(module: nn.Module, tensor_name: str) -> nn.Module:
    owner, _, _ = tensor_name.rpartition(".")
    return module.get_submodule(owner) if owner else module


def movable_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks that may live on any device, in execution order."""
    names = []
    for container in MOVABLE_BLOCK_CONTAINERS:
        parent = model.get_submodule(container)
        if container.endswith("block_chunks"):
            names += [f"{container}.{i}.module.{j}" for i, chunk in enumerate(parent) for j in range(len(chunk.module))]
        else:
            names += [f"{container}.{i}" for i in range(len(parent))]
    return names


def _pinned_modules(model: nn.Module, movable: list[str]) -> list[str]:
    """The smallest set of module names that covers every tensor outside the movable blocks."""
    covered = set(movable)
    pinned: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in covered:
                continue
            if any(m.startswith(full + ".") for m in covered):
                visit(full + ".", child)
                for pname, _ in child.named_parameters(recurse=False):
                    pinned.append(f"{full}.{pname}")
                for bname, _ in child.named_buffers(recurse=False):
                    pinned.append(f"{full}.{bname}")
            else:
                pinned.append(full)

    visit("", model)
    for pname, _ in model.named_parameters(recurse=False):
        pinned.append(pname)
    return pinned


def build_device_map(
    model: nn.Module,
    max_memory: Mapping[Any, int | str],
    dtype: torch.dtype = torch.bfloat16,
    quantized_bits: int | None = None,
) -> dict[str, Any]:
    """A `device_map` for `model` (built on the meta device) under `max_memory` (devices in order of use).

    The first device of `max_memory` is the main one: it takes every pinned part (see the module docstring)
    and then blocks until its budget is spent. A device's budget is an upper bound on weights only; leave room
    for activations and both KV caches. Raises if the pinned parts alone do not fit the main device, or if the
    blocks do not fit anywhere (give "disk" a budget to offload to disk).
    """
    if not max_memory:
        raise ValueError("max_memory must name at least one device, e.g. {0: '20GiB', 'cpu': '60GiB'}")
    budgets = [(device, parse_memory(size)) for device, size in max_memory.items()]
    main, main_budget = budgets[0]
    movable = movable_blocks(model)
    pinned = _pinned_modules(model, movable)
    pinned_bytes = sum(_named_bytes(model, name, dtype) for name in pinned)  # pinned parts are never quantized
    if pinned_bytes > main_budget:
        raise ValueError(
            f"the parts that must stay on the main device {main!r} need {pinned_bytes / 2**20:,.1f} MiB but its "
            f"max_memory is {main_budget / 2**20:,.1f} MiB"
        )
    device_map: dict[str, Any] = {name: main for name in pinned}
    remaining = [main_budget - pinned_bytes] + [b for _, b in budgets[1:]]
    devices = [d for d, _ in budgets]
    slot = 0
    for name in movable:
        bits = quantized_bits if name.startswith(tuple(f"{c}." for c in QUANTIZED_BLOCK_CONTAINERS)) else None
        size = _tensor_bytes(model.get_submodule(name), dtype, bits)
        while slot < len(devices) and size > remaining[slot]:
            slot += 1
        if slot == len(devices):
            raise ValueError(
                f"the model does not fit max_memory {dict(max_memory)}: {name} finds no room; raise a budget or "
                "add 'disk' to offload the rest"
            )
        device_map[name] = devices[slot]
        remaining[slot] -= size
    return device_map


def _named_bytes(model: nn.Module, name: str, dtype: torch.dtype) -> int:
    """Bytes of a named module, or of a single named parameter / buffer, in `dtype`."""
    owner, _, attr = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    target = getattr(parent, attr)
    if isinstance(target, nn.Module):
        return _tensor_bytes(target, dtype)
    return target.numel() * (dtype.itemsize if target.is_floating_point() else target.element_size())


AUTO_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(
    model_class: type,
    config: Any,
    device_map: Any,
    max_memory: Mapping[Any, int | str] | None,
    dtype: torch.dtype,
    quantization_config: Any = None,
) -> Any:
    """Turn `device_map="auto"` (or accelerate's other placement names) into this model's own map.

    Without `max_memory` the budgets are what accelerate sees free (every GPU, then the CPU). Explicit maps
    (a dict, `{"": "cuda:0"}`, a device string) pass through unchanged: the caller took responsibility.
    """
    if not (isinstance(device_map, str) and device_map in AUTO_PLACEMENTS):
        if max_memory is not None and device_map is None:
            raise ValueError('max_memory needs device_map="auto"')
        return device_map
    if max_memory is None:
        from accelerate.utils import get_max_memory

        max_memory = get_max_memory()
    with torch.device("meta"):
        skeleton = model_class(config)
    return build_device_map(skeleton, max_memory, dtype, quantized_bits=quantized_bits(quantization_config))


def quantized_bits(quantization_config: Any) -> int | None:
    """Bits per quantized weight of a bitsandbytes config (None when not quantized)."""
    if quantization_config is None:
        return None
    if getattr(quantization_config, "load_in_4bit", False):
        return 4
    return 8 if getattr(quantization_config, "load_in_8bit", False) else None


def storage_dtype(dtype: Any, config: Any) -> torch.dtype:
    """The dtype weights will have once loaded: the requested one, or the checkpoint's own for "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if isinstance(stored, torch.dtype) else torch.float32
