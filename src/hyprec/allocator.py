"""The process's C allocator, set up for tensor workloads.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (128 KiB at start,
raised adaptively up to 32 MiB) with fresh pages from the kernel and returns them on ``free``, and trims the heap's
top whenever more than twice that threshold is free. An engine allocates and frees the same large activations in
every layer of every pass, so each op page-faults its output in again: measured with torch 2.13 on a 2-core Xeon,
casting attention's q/k/v to bfloat16 took 0.13 ms in some processes and 0.7 ms in others (0.13 ms in every process
once tuned), and MPNet with compensated bf16x3 GEMMs embedded 200 texts at a 16,384-token
budget in 11.6 s with glibc's defaults and 10.0 s tuned (two runs of ``benchmarks/token_budget.py``). This is what
jemalloc/tcmalloc (``LD_PRELOAD``) fix for serving stacks; a Python package cannot preload them, but it can set
glibc's own thresholds (``mallopt``) once the process runs: blocks up to :data:`MMAP_THRESHOLD` then come from the
heap and are reused, and up to :data:`TRIM_THRESHOLD` of free heap is kept rather than returned to the kernel (the
process keeps the memory of its largest pass, as a caching allocator does).

``HYPREC_TUNE_MALLOC=0`` leaves the allocator alone; other C libraries (musl, macOS) are left alone too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger("hyprec")

#: Blocks below this many bytes come from the heap (a 16,384-token pass of a BERT-base FFN is ~200 MB).
MMAP_THRESHOLD = 256 << 20
#: Free memory at the heap's top up to this many bytes is kept for the next pass.
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds for this process (once); returns what was done, for ``info``."""
    if os.environ.get("HYPREC_TUNE_MALLOC", "1") == "0":
        return "unchanged (HYPREC_TUNE_MALLOC=0)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, libc_version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return "unchanged (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc_version.argtypes, libc_version.restype = [], ctypes.c_char_p
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.warning("hyprec: glibc rejected the malloc thresholds; the allocator is unchanged")
        return "unchanged (mallopt failed)"
    return (
        f"glibc {libc_version().decode()} malloc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
        f"trim threshold {TRIM_THRESHOLD >> 20} MiB"
    )
