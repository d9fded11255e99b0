"""Timing primitives of `vargpt bench`: a synchronised clock, peak memory, and the machine's matmul peak."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones, the device synchronised around each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """GPU: bytes allocated at peak since the last reset. CPU: the process's peak resident set size, which
    never resets (a run's figure is the maximum over everything the process did before it)."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"kind": "process_peak_rss", "bytes": int(peak * scale)}


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of a square `size` matmul in `dtype` (the best of `repeats`): the machine's practical peak."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    times = time_call(lambda: torch.matmul(a, b), device, repeats, warmup=2)
    best = min(times)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "seconds": best,
        "flops_per_s": 2.0 * size**3 / best,
    }
