"""Native kernels: small C sources compiled once per machine and called through ``ctypes``.

PyTorch has no CPU matmul over GGUF's block formats with float32 activations (its weight-only int8 matmul took
69 ms for Gemma's 262144x640 head at one row with float32 activations, against 25 ms for a float32 GEMM). The
kernels here are plain C with OpenMP, so they build in about a second with the system compiler (no PyTorch headers),
for the CPU they run on (``-march=native``: AVX-512 where the CPU has it). Each library is cached under the cache
directory, keyed by its source, the flags, the compiler and the CPU, so a change of any of them builds it again.
``make`` builds them at set-up (``python -m hyprec.kernels``); otherwise the first use does. Where no compiler
works, :func:`load` returns None and callers use their pure-torch reference (slower, same results up to the order
of float32 sums).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger("hyprec")

#: where the kernel sources (``<name>.c``) are
SOURCE_DIR = Path(__file__).parent
# -std=c11 turns off GCC's implicit contraction of a * b + c into one fused operation: the kernels state their fused
# operations explicitly, so that every code path (AVX-512 or portable) rounds alike.
#: the compiler flags every kernel is built with (then the source, ``-o`` and :data:`LIBS`)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)


def find_compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc`` or ``gcc`` on the PATH; None if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _library_path(name: str, compiler: str) -> Path:
    from hyprec.hardware import cpu_flags, cpu_model
    from hyprec.model_sources import cache_dir

    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = "|".join([(SOURCE_DIR / f"{name}.c").read_text(), *FLAGS, *LIBS, version, cpu_model(), *sorted(cpu_flags())])
    return cache_dir() / "kernels" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def sources() -> list[str]:
    """The names of the kernels this package ships (``kernels/<name>.c``)."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.c"))


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` (``kernels/<name>.c``), built now if it is not cached; None (with one
    warning) where it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        log.warning("hyprec: no C compiler (cc/gcc, or $CC) for the %s kernel; using the slower torch reference", name)
        return None
    path = _library_path(name, compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            subprocess.run(
                [compiler, *FLAGS, str(SOURCE_DIR / f"{name}.c"), "-o", str(tmp), *LIBS],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
            tmp.replace(path)  # atomic: concurrent builders (processes, threads) each write their own file
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            log.warning("hyprec: building the %s kernel failed (%s); using the slower torch reference", name, detail)
            tmp.unlink(missing_ok=True)
            return None
    return ctypes.CDLL(str(path))
