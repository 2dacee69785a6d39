"""What this device computes fast: its half-precision capabilities, read from the hardware and confirmed by timing.

Half precision is only a speed-up where the hardware has a path for it. On a CPU with AMX-BF16 a bfloat16 GEMM runs
~6x float32 and float16 runs at float32 speed; on an AMD Zen 4 (AVX512-BF16 only) bfloat16 runs 2.6x and float16
0.23x float32, because PyTorch converts float16 element by element. Nothing here is hard-coded per vendor: the
capability flags say what could be fast, and micro-benchmarks say what is:

* :func:`kernel_profile`: the two kernels the dtype choices affect (a linear layer per dtype, and scaled-dot-product
  attention including its casts), once per device;
* :func:`gemm_profile`: one forward pass's float32 linear layers at the model's own shapes, per kernel that can
  compute them (MKL through ``F.linear``, oneDNN with a prepacked weight and fused activation, compensated bf16x3).
  A single probe shape misleads here: bf16x3 splits every input into two bfloat16 tensors, a memory-bound pass that
  costs little on a 768-wide projection but more than the three bfloat16 products save on a 3072-wide FFN input
  (measured on a Xeon with AMX, torch 2.13: 1.12x float32 on a 768x768 probe, 0.89x on MPNet's FFN down projection
  at 2,048 rows; chosen by the single probe, bf16x3 ran MPNet and MiniLM slower than float32).

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hyprec.layers import onednn
from hyprec.layers.compensated import bf16_gemm_available
from hyprec.layers.linear import Linear

log = logging.getLogger("hyprec")

#: CPU flags that decide which half-precision kernels exist (bfloat16/float16 dot products, AMX tiles).
HALF_PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PROFILE_VERSION = 4
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


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpuinfo_field(name: str) -> str:
    for line in _cpuinfo():
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
            ``linear_ms`` may add :data:`BF16X3` and :data:`FLOAT32_ONEDNN`, which then pin :func:`gemm_profile`).
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
        return times["float32"] / times[_name(dtype)]

    def describe(self, kernel: str) -> str:
        """E.g. ``attention fp32 3.1 ms, fp16 2.9 ms, bf16 1.2 ms``."""
        times = self.linear_ms if kernel == "linear" else self.attention_ms
        return f"{kernel} {_describe_times(times)}"

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("source")
        return {"version": _PROFILE_VERSION, **out}


def _describe_times(times: dict[str, float]) -> str:
    return ", ".join(f"{_SHORT_NAMES[k]} {v:.2f} ms" for k, v in times.items())


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hardware(device: torch.device) -> str:
    cap = cuda_capability(device)
    if cap is not None:
        return f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    return f"{cpu_model()} [{describe_flags()}]"


def _interleaved_ms(
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
    for name, dtype in _DTYPES.items():
        xd, wd = x.to(dtype), w.to(dtype)
        linears[name] = lambda xd=xd, wd=wd: F.linear(xd, wd)

        def attention(dtype: torch.dtype = dtype) -> torch.Tensor:
            return F.scaled_dot_product_attention(q.to(dtype), kk.to(dtype), v.to(dtype)).float()

        attentions[name] = attention
    linear_ms, attention_ms = _interleaved_ms(linears, device), _interleaved_ms(attentions, device)
    return KernelProfile(
        device=device.type,
        hardware=_hardware(device),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        linear_ms=linear_ms,
        attention_ms=attention_ms,
    )


def _cache_file(device: torch.device, kind: str = "", extra: str = "") -> Path:
    from hyprec.model_sources import cache_dir

    key = f"{_hardware(device)}|{torch.__version__}|{torch.get_num_threads()}|{_PROFILE_VERSION}{extra}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "kernel-profiles" / f"{device.type}{kind}-{digest}.json"


def _write_cache(path: Path, content: dict) -> None:
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
        if raw.pop("version", None) != _PROFILE_VERSION:
            return None
        profile = KernelProfile(**raw, source=source)
        for times, optional in ((profile.linear_ms, _OPTIONAL_LINEAR), (profile.attention_ms, set())):
            if not set(_DTYPES) <= set(times) <= set(_DTYPES) | optional:
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
    return _kernel_profile(device, os.environ.get("HYPREC_KERNEL_PROFILE") or None, _cache_file(device))


@cache
def _kernel_profile(device: torch.device, pinned: str | None, path: Path) -> KernelProfile:
    if pinned:
        profile = _read(Path(pinned), f"HYPREC_KERNEL_PROFILE={pinned}")
        if profile is None:
            from hyprec.errors import ConfigError

            raise ConfigError(
                f"HYPREC_KERNEL_PROFILE={pinned}: expected a readable kernel-profile JSON file "
                f"(version {_PROFILE_VERSION}, linear_ms and attention_ms for float32, float16 and bfloat16; "
                f"linear_ms may add {', '.join(sorted(_OPTIONAL_LINEAR))})"
            )
        return profile
    profile = _read(path, f"cached in {path}")
    if profile is not None:
        return profile
    start = time.perf_counter()
    profile = measure(device)
    profile.source = f"measured in {time.perf_counter() - start:.2f} s, cached in {path}"
    _write_cache(path, profile.to_json())
    return profile


@dataclass(frozen=True, order=True)
class LinearShape:
    """The shape of a float32 linear layer as a GEMM kernel sees it; ``count``: how many layers of a model have it."""

    in_features: int
    out_features: int
    bias: bool
    activation: str
    count: int = 1


def linear_shapes(model: nn.Module) -> tuple[LinearShape, ...]:
    """The distinct shapes of ``model``'s float32 :class:`~hyprec.layers.linear.Linear` layers, with their counts."""
    counts: dict[tuple, int] = {}
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.dtype == torch.float32:
            key = (m.in_features, m.out_features, m.bias is not None, m.activation or "")
            counts[key] = counts.get(key, 0) + 1
    return tuple(sorted(LinearShape(*key, count) for key, count in counts.items()))


#: Rows of the GEMM probe: half the CPU encoder's default token budget (:data:`hyprec.config.CPU_ENCODER_TOKEN_BUDGET`);
#: GEMM efficiency has saturated long before, and the probe of BERT-base shapes stays near half a second.
GEMM_ROWS = 1024


@dataclass
class GemmProfile:
    """Milliseconds one probe pass over a model's float32 linear layers took per kernel (:data:`GEMM_KERNELS`):
    every distinct shape of :func:`linear_shapes` run on :data:`GEMM_ROWS` rows as the model runs it (bias,
    activation fused where the kernel fuses it), weighted by its count."""

    ms: dict[str, float]
    rows: int
    source: str = "measured"

    def describe(self) -> str:
        """E.g. ``model GEMMs (1024 rows) fp32 9.10 ms, fp32-onednn 8.70 ms, bf16x3 10.20 ms``."""
        return f"model GEMMs ({self.rows} rows) {_describe_times(self.ms)}"


def _gemm_kernels(device: torch.device) -> list[str]:
    kernels = ["float32"]
    if device.type == "cpu" and onednn.available():
        kernels.append(FLOAT32_ONEDNN)
    if device.type == "cpu" and bf16_gemm_available():
        kernels.append(BF16X3)
    return kernels


# Not inference mode: a Linear keys its prepared (packed, split) weight by the weight's version counter.
@torch.no_grad()
def measure_gemms(shapes: Iterable[LinearShape], device: torch.device, rows: int = GEMM_ROWS) -> dict[str, float]:
    """Time every available kernel on every shape (median of 3), weighted by the shape's count."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    totals = dict.fromkeys(_gemm_kernels(device), 0.0)
    for shape in shapes:
        weight = torch.randn(shape.out_features, shape.in_features, generator=gen) * shape.in_features**-0.5
        x = torch.randn(rows, shape.in_features, generator=gen).to(device)
        calls = {}
        for name in totals:  # one layer per kernel: each keeps its own prepared (packed, split) weight
            layer = Linear(shape.in_features, shape.out_features, bias=shape.bias, activation=shape.activation or None)
            layer.weight.copy_(weight)
            layer = layer.to(device)
            layer.kernel = GEMM_KERNELS[name]
            calls[name] = lambda layer=layer, x=x: layer(x)
        for name, ms in _interleaved_ms(calls, device, repeats=3).items():
            totals[name] += shape.count * ms
    return totals


def gemm_profile(shapes: tuple[LinearShape, ...], device_name: str = "cpu") -> GemmProfile:
    """The GEMM speeds of a model with these float32 linear ``shapes`` on ``device_name``: pinned by
    ``HYPREC_KERNEL_PROFILE`` (its ``linear_ms``), else cached per machine and shapes, else measured now (~0.2 s for
    MiniLM, ~0.6 s for BERT-base shapes on 2 cores) and cached."""
    device = torch.device(device_name)
    pinned = os.environ.get("HYPREC_KERNEL_PROFILE") or None
    if pinned:
        profile = kernel_profile(device_name)
        times = {k: v for k, v in profile.linear_ms.items() if k in GEMM_KERNELS}
        return GemmProfile(times, GEMM_ROWS, profile.source)
    return _gemm_profile(device, shapes, _cache_file(device, "-gemm", f"|{GEMM_ROWS}|{shapes}"))


@cache
def _gemm_profile(device: torch.device, shapes: tuple[LinearShape, ...], path: Path) -> GemmProfile:
    try:
        raw = json.loads(path.read_text())
        times = raw["ms"]
        valid = all(isinstance(t, (int, float)) and t > 0 for t in times.values())
        if valid and raw.get("version") == _PROFILE_VERSION and "float32" in times and set(times) <= set(GEMM_KERNELS):
            return GemmProfile(times, raw["rows"], f"cached in {path}")
    except (OSError, ValueError, TypeError, KeyError):
        pass
    start = time.perf_counter()
    times = measure_gemms(shapes, device)
    profile = GemmProfile(times, GEMM_ROWS, f"measured in {time.perf_counter() - start:.2f} s, cached in {path}")
    shapes_json = [asdict(s) for s in shapes]
    _write_cache(path, {"version": _PROFILE_VERSION, "rows": GEMM_ROWS, "shapes": shapes_json, "ms": times})
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
