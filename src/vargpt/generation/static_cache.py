"""The optional fast path of decoding: a preallocated (static) LLM KV cache and compiled model calls.

Eager decoding with transformers' `DynamicCache` grows every key/value tensor by one token per step, so each
step has new shapes and pays Python and kernel-launch overhead; on a GPU a 100M model spends ~10 ms per token
there. With `static_cache`, the LLM's cache is a transformers `StaticCache` preallocated for the prompt, the new
tokens and an image block, and the attention mask handed to the LLM is padded to that capacity, so a decode
step always sees the same shapes. With `compile`, the LLM call and the decoder's per-scale forward run through
`torch.compile` ("reduce-overhead", i.e. CUDA graphs, on CUDA; "default" elsewhere); shapes that differ between
scales are marked dynamic by torch's automatic dynamic shapes after the first recompile, so a generation
compiles a handful of graphs rather than one per step.

The prefill stays eager on a `DynamicCache` (it runs once, and its logits then equal the default path's bit for
bit); its keys/values are copied into the static cache afterwards. Static attention runs over the whole
capacity with the unused slots masked out, so logits equal the eager path's up to float summation order, not
bit for bit.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticCache

logger = logging.getLogger(__name__)

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
_warned: set[str] = set()


@dataclass(frozen=True)
class FastDecoding:
    """Which fast-path pieces a generation uses (both off: the default eager path, unchanged).

    * `static_cache`: preallocated LLM KV cache (fixed shapes per step).
    * `compile`: `torch.compile` the LLM call and the decoder's scale step; implies `static_cache`.
    * `compile_mode`: torch.compile's mode; None picks "reduce-overhead" (CUDA graphs) on CUDA, else "default".
    """

    static_cache: bool = False
    compile: bool = False
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if self.compile and not self.static_cache:
            object.__setattr__(self, "static_cache", True)

    @classmethod
    def from_flags(cls, cache_implementation: str | None, compile: bool) -> FastDecoding:
        """The setting of `model.generate(cache_implementation=..., compile=...)` (transformers' names)."""
        impl = cache_implementation or "dynamic"
        if impl not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {impl!r}")
        return cls(static_cache=impl == "static", compile=bool(compile))

    def mode_for(self, device: torch.device) -> str:
        if self.compile_mode is not None:
            return self.compile_mode
        return "reduce-overhead" if device.type == "cuda" else "default"


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile's inductor cannot build kernels here (None when it can): on a CPU it needs a C++
    compiler, which slim containers lack; failing at the first call would surface deep inside a forward."""
    if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return "no C++ compiler (g++) on PATH, which torch.compile needs for CPU kernels"
    return None


def compiled(fn: Callable[..., Any], settings: FastDecoding, device: torch.device) -> Callable[..., Any]:
    """`fn` through torch.compile when asked for and possible; otherwise `fn` itself (one warning line).

    dynamic=None: the first call compiles for its exact shapes, a second shape recompiles with the changing
    sizes symbolic, so the per-scale token counts cost two or three compiles, not one per scale."""
    if not settings.compile:
        return fn
    reason = compile_unavailable_reason(device)
    if reason is not None:
        if reason not in _warned:  # one line per process, not one per compiled call
            _warned.add(reason)
            logger.warning("compile=True ignored, decoding eagerly: %s", reason)
        return fn
    return torch.compile(fn, mode=settings.mode_for(device), dynamic=None, fullgraph=False)


def static_copy(cache: Cache, config: Any, rows: torch.Tensor, length: int, capacity: int) -> StaticCache:
    """A `StaticCache` of `capacity` slots holding the first `length` cached tokens of rows `rows` of `cache`.

    Used after the eager prefill, to repeat a one-row prefix for B rows, and to grow a full cache: copying
    through `update` keeps the new cache's buffers at fixed addresses (what CUDA graphs need)."""
    if length > capacity:
        raise ValueError(f"{length} cached tokens do not fit a static cache of {capacity}")
    static = StaticCache(config=config, max_cache_len=capacity)
    for index, layer in enumerate(cache.layers):
        keys = layer.keys[rows, :, :length]
        values = layer.values[rows, :, :length]
        static.update(keys, values, index)
    return static


def padded_mask(mask_BT: torch.Tensor, capacity: int) -> torch.Tensor:
    """The 2-D attention mask right-padded with zeros to the static cache's capacity (fixed shape per call)."""
    return torch.nn.functional.pad(mask_BT, (0, capacity - mask_BT.shape[1]))
