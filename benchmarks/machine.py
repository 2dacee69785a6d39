"""What every benchmark report records about the machine: CPU model, the flags that decide half-precision speed,
and the load average (shared machines are noisy; a number is only as good as the load it was taken under)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: CPU flags that change which half-precision kernels exist (bfloat16/float16 dot products, AMX tiles).
HALF_PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The half-precision-relevant flags the CPU reports, e.g. ``avx2 avx512f avx512_bf16 -avx512_fp16 -amx_bf16``
    (a leading ``-`` marks a flag it lacks)."""
    flags: set[str] = set()
    for line in _cpuinfo():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return " ".join(f if f in flags else f"-{f}" for f in HALF_PRECISION_FLAGS)


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def publish(report: str, path: Path | None) -> None:
    """Print ``report`` and, when ``path`` is given, write it there (the results file of a run)."""
    print(report)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
