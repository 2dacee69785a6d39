"""What this device computes fast: its half-precision capabilities, read from the hardware and confirmed by timing.

Half precision is only a speed-up where the hardware has a path for it. On a CPU with AMX-BF16 a bfloat16 GEMM runs
~6x float32 and float16 runs at float32 speed; on an AMD Zen 4 (AVX512-BF16 only) bfloat16 runs 2.6x and float16
0.23x float32, because PyTorch converts float16 element by element. Nothing here is hard-coded per vendor: the
capability flags say what could be fast, and micro-benchmarks say what is:

* :func:`kernel_profile`: the two kernels the dtype choices affect (a linear layer per dtype, and scaled-dot-product
  attention including its casts), once per device;
* :func:`hyprec.layers.gemm_probe.gemm_profile`: the model's own float32 linear layers per GEMM kernel.

Both are cached per machine, torch version and thread count (the GEMM probe also per set of shapes) under the cache
directory, so each costs well under a second once and nothing afterwards.

``HYPREC_KERNEL_PROFILE`` may name a JSON file of the same shape as the device cache file, to pin the measured speeds
(reproducible policy choices in tests and CI, or a profile measured under production load); its ``linear_ms`` then
also stands for every model's GEMM probe (``float32``, and the optional ``bfloat16x3`` and ``float32-onednn``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from hyprec.dtypes import TORCH_DTYPES, full_name
from hyprec.errors import ConfigError
from hyprec.model_sources import cache_dir

log = logging.getLogger("hyprec")

#: CPU flags that decide which half-precision kernels exist (bfloat16/float16 dot products, AMX tiles).
HALF_PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")
PROFILE_VERSION = 4
#: The compensated float32 linear layer (three bfloat16 products, :mod:`hyprec.layers.compensated`), timed by the
#: GEMM probe where this PyTorch build has the GEMM it needs.
BF16X3 = "bfloat16x3"
#: The float32 linear layer on oneDNN with a prepacked weight (:mod:`hyprec.layers.onednn`), timed by the GEMM probe
#: where this PyTorch build has it; ``float32`` is PyTorch's own ``F.linear`` (MKL on x86 CPUs).
FLOAT32_ONEDNN = "float32-onednn"
_OPTIONAL_LINEAR = {BF16X3, FLOAT32_ONEDNN}
#: GEMM probe kernel name -> :data:`hyprec.layers.linear.KERNELS` name.
GEMM_KERNELS = {"float32": "torch", FLOAT32_ONEDNN: "onednn", BF16X3: "bf16x3"}
_SHORT_NAMES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    BF16X3: "bf16x3",
    FLOAT32_ONEDNN: "fp32-onednn",
}

# Probe shapes: a BERT-base projection on 256 packed tokens, and attention over 2 sequences of 256 tokens with
# 12 heads of 64 (query/key/value arrive in float32 and are cast, as the attention seam does). Shorter sequences
# shrink half precision's gain (the casts weigh more); longer ones grow it.
_LINEAR_SHAPE = (256, 768, 768)
_ATTENTION_SHAPE = (2, 12, 256, 64)
_REPEATS = 9


def cpuinfo_lines() -> list[str]:
    """The lines of ``/proc/cpuinfo`` (empty where it is unavailable): what :func:`cpu_model` and :func:`cpu_flags`
    read."""
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpuinfo_field(name: str) -> str:
    for line in cpuinfo_lines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """Every flag the CPU reports (empty where ``/proc/cpuinfo`` is unavailable)."""
    return frozenset(_cpuinfo_field("flags").split())


def describe_flags(flags: frozenset[str] | None = None) -> str:
    """The half-precision flags, e.g. ``avx2 avx512f avx512_bf16 -avx512_fp16 -amx_bf16`` (``-``: lacking)."""
    flags = cpu_flags() if flags is None else flags
    return " ".join(f if f in flags else f"-{f}" for f in HALF_PRECISION_FLAGS)


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (bfloat16 tensor cores from 8.0), or None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@dataclass
class KernelProfile:
    """Measured milliseconds of the probe kernels per dtype on one device, and what the hardware reports.

    Attributes:
        device: ``cpu`` or ``cuda``.
        hardware: CPU model and half-precision flags, or the GPU name and compute capability.
        threads: intra-op threads the probe ran with (CPU).
        linear_ms / attention_ms: dtype name -> median milliseconds of the probe kernel (a pinned profile's
            ``linear_ms`` may add :data:`BF16X3` and :data:`FLOAT32_ONEDNN`, which then pin the GEMM probe,
            :func:`hyprec.layers.gemm_probe.gemm_profile`).
        source: where the numbers came from (measured now, the cache file, or ``HYPREC_KERNEL_PROFILE``).
    """

    device: str
    hardware: str
    threads: int
    torch_version: str
    linear_ms: dict[str, float]
    attention_ms: dict[str, float]
    source: str = field(default="measured", compare=False)

    def speedup(self, kernel: str, dtype: torch.dtype) -> float:
        """How many times faster than float32 ``kernel`` (``linear`` or ``attention``) runs in ``dtype``."""
        times = self.linear_ms if kernel == "linear" else self.attention_ms
        return times["float32"] / times[full_name(dtype)]

    def describe(self, kernel: str) -> str:
        """E.g. ``attention fp32 3.1 ms, fp16 2.9 ms, bf16 1.2 ms``."""
        times = self.linear_ms if kernel == "linear" else self.attention_ms
        return f"{kernel} {describe_times(times)}"

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("source")
        return {"version": PROFILE_VERSION, **out}


def describe_times(times: dict[str, float]) -> str:
    return ", ".join(f"{_SHORT_NAMES[k]} {v:.2f} ms" for k, v in times.items())


def _hardware(device: torch.device) -> str:
    cap = cuda_capability(device)
    if cap is not None:
        return f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    return f"{cpu_model()} [{describe_flags()}]"


def interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = _REPEATS
) -> dict[str, float]:
    """Median milliseconds of each function, timed in interleaved rounds so that load on a shared machine hits every
    candidate alike (a probe measured once is cached for good)."""
    for fn in fns.values():
        for _ in range(2):  # warm-up: first calls allocate and JIT (oneDNN)
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def measure(device: torch.device) -> KernelProfile:
    """Time the probe kernels in float32, float16 and bfloat16 on ``device`` (~0.1 s on a CPU with half-precision
    hardware, ~0.3 s without)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, k, n = _LINEAR_SHAPE
    x = torch.randn(rows, k, generator=gen).to(device)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device)
    q, kk, v = (torch.randn(*_ATTENTION_SHAPE, generator=gen).to(device) for _ in range(3))
    linears, attentions = {}, {}
    for name, dtype in TORCH_DTYPES.items():
        xd, wd = x.to(dtype), w.to(dtype)
        linears[name] = lambda xd=xd, wd=wd: F.linear(xd, wd)

        def attention(dtype: torch.dtype = dtype) -> torch.Tensor:
            return F.scaled_dot_product_attention(q.to(dtype), kk.to(dtype), v.to(dtype)).float()

        attentions[name] = attention
    linear_ms, attention_ms = interleaved_ms(linears, device), interleaved_ms(attentions, device)
    return KernelProfile(
        device=device.type,
        hardware=_hardware(device),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        linear_ms=linear_ms,
        attention_ms=attention_ms,
    )


def cache_file(device: torch.device, kind: str = "", extra: str = "") -> Path:
    key = f"{_hardware(device)}|{torch.__version__}|{torch.get_num_threads()}|{PROFILE_VERSION}{extra}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "kernel-profiles" / f"{device.type}{kind}-{digest}.json"


def write_cache(path: Path, content: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a read-only cache costs a re-measurement per process, nothing else
        log.warning("hyprec: could not cache a kernel profile in %s: %s", path, exc)


def _read(path: Path, source: str) -> KernelProfile | None:
    try:
        raw = json.loads(path.read_text())
        raw.pop("note", None)  # a pinned profile may say why it exists
        if raw.pop("version", None) != PROFILE_VERSION:
            return None
        profile = KernelProfile(**raw, source=source)
        for times, optional in ((profile.linear_ms, _OPTIONAL_LINEAR), (profile.attention_ms, set())):
            if not set(TORCH_DTYPES) <= set(times) <= set(TORCH_DTYPES) | optional:
                return None
            if not all(isinstance(t, (int, float)) and t > 0 for t in times.values()):
                return None
        return profile
    except (OSError, ValueError, TypeError):
        return None


def kernel_profile(device_name: str = "cpu") -> KernelProfile:
    """The kernel speeds of ``device_name``: from ``HYPREC_KERNEL_PROFILE``, else the per-machine cache, else
    measured now and cached. Memoised per process (and per pinned file and cache file)."""
    device = torch.device(device_name)
    return _kernel_profile(device, os.environ.get("HYPREC_KERNEL_PROFILE") or None, cache_file(device))


def clear_profile_memo() -> None:
    """Forget the kernel profiles memoised in this process, as a new process starts without them: the next
    :func:`kernel_profile` reads the pinned or cached file again (or measures). The cache files stay."""
    _kernel_profile.cache_clear()


@cache
def _kernel_profile(device: torch.device, pinned: str | None, path: Path) -> KernelProfile:
    if pinned:
        profile = _read(Path(pinned), f"HYPREC_KERNEL_PROFILE={pinned}")
        if profile is None:
            raise ConfigError(
                f"HYPREC_KERNEL_PROFILE={pinned}: expected a readable kernel-profile JSON file "
                f"(version {PROFILE_VERSION}, linear_ms and attention_ms for float32, float16 and bfloat16; "
                f"linear_ms may add {', '.join(sorted(_OPTIONAL_LINEAR))})"
            )
        return profile
    profile = _read(path, f"cached in {path}")
    if profile is not None:
        return profile
    start = time.perf_counter()
    profile = measure(device)
    profile.source = f"measured in {time.perf_counter() - start:.2f} s, cached in {path}"
    write_cache(path, profile.to_json())
    return profile


def hardware_summary(device: torch.device | str = "cpu") -> dict[str, str]:
    """What ``info`` shows about the device: the hardware, threads, and the measured kernel speeds per dtype."""
    profile = kernel_profile(torch.device(device).type)
    return {
        "hardware": profile.hardware,
        "threads": str(profile.threads),
        "kernel_speeds": f"{profile.describe('linear')}; {profile.describe('attention')} ({profile.source})",
    }


#: A half format whose linear layers run below this fraction of float32's speed has no hardware path worth using.
NATIVE_SPEEDUP = 0.8


def native_half(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether ``dtype`` arithmetic has a hardware path on ``device`` (its measured linear layers run at least
    :data:`NATIVE_SPEEDUP` times float32's speed). Where it has none, tools emulate half precision (round to it,
    compute in float32) instead of running it: a float16 GEMM on a CPU without AVX512-FP16 runs at ~0.2x."""
    return kernel_profile(torch.device(device).type).speedup("linear", dtype) >= NATIVE_SPEEDUP
