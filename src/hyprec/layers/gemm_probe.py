"""The GEMM probe: one forward pass's float32 linear layers at the model's own shapes, timed per kernel that can
compute them (MKL through ``F.linear``, oneDNN with a prepacked weight and fused activation, compensated bf16x3).

A single probe shape misleads here: bf16x3 splits every input into two bfloat16 tensors, a memory-bound pass that
costs little on a 768-wide projection but more than the three bfloat16 products save on a 3072-wide FFN input
(measured on a Xeon with AMX, torch 2.13: 1.12x float32 on a 768x768 probe, 0.89x on MPNet's FFN down projection at
2,048 rows; chosen by the single probe, bf16x3 ran MPNet and MiniLM slower than float32). Cached per machine, torch
version, thread count and set of shapes, beside the device's kernel profile (:mod:`hyprec.hardware`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from hyprec.hardware import (
    BF16X3,
    FLOAT32_ONEDNN,
    GEMM_KERNELS,
    PROFILE_VERSION,
    cache_file,
    describe_times,
    interleaved_ms,
    kernel_profile,
    write_cache,
)
from hyprec.layers import onednn
from hyprec.layers.compensated import bf16_gemm_available
from hyprec.layers.linear import Linear


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
        return f"model GEMMs ({self.rows} rows) {describe_times(self.ms)}"


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
        for name, ms in interleaved_ms(calls, device, repeats=3).items():
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
    return _gemm_profile(device, shapes, cache_file(device, "-gemm", f"|{GEMM_ROWS}|{shapes}"))


def clear_profile_memo() -> None:
    """Forget the GEMM profiles memoised in this process, as a new process starts without them: the next
    :func:`gemm_profile` reads the cache file again (or measures). The cache files stay."""
    _gemm_profile.cache_clear()


@cache
def _gemm_profile(device: torch.device, shapes: tuple[LinearShape, ...], path: Path) -> GemmProfile:
    try:
        raw = json.loads(path.read_text())
        times = raw["ms"]
        valid = all(isinstance(t, (int, float)) and t > 0 for t in times.values())
        if valid and raw.get("version") == PROFILE_VERSION and "float32" in times and set(times) <= set(GEMM_KERNELS):
            return GemmProfile(times, raw["rows"], f"cached in {path}")
    except (OSError, ValueError, TypeError, KeyError):
        pass
    start = time.perf_counter()
    times = measure_gemms(shapes, device)
    profile = GemmProfile(times, GEMM_ROWS, f"measured in {time.perf_counter() - start:.2f} s, cached in {path}")
    shapes_json = [asdict(s) for s in shapes]
    write_cache(path, {"version": PROFILE_VERSION, "rows": GEMM_ROWS, "shapes": shapes_json, "ms": times})
    return profile
