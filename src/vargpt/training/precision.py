"""Whether bf16 pays on this CPU: without bf16 instructions, CPU bf16 autocast emulates the arithmetic and runs
the convolutions about 17x slower than fp32 (measured on an AVX2-only host), so a run that asks for bf16 there is
warned once, before it starts, instead of silently taking hours."""

from __future__ import annotations

import warnings
from pathlib import Path

SLOW_BF16_WARNING = (
    "this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 autocast runs its convolutions about 17x slower "
    "than fp32 (measured on an AVX2-only host), so this run may take hours; {remedy}"
)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo's flags; True where they
    cannot be read (not Linux), so that nothing is claimed about an unknown CPU."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})


def warn_if_bf16_is_slow_here(bf16: bool, on_cpu: bool, remedy: str, cpuinfo: str | None = None) -> bool:
    """Warn (and return True) when a run asks for bf16 on a CPU without bf16 instructions."""
    if not (bf16 and on_cpu) or cpu_has_fast_bf16(cpuinfo):
        return False
    warnings.warn(SLOW_BF16_WARNING.format(remedy=remedy), stacklevel=3)
    return True
