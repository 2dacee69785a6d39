"""Float32 linear layers computed on bfloat16 hardware: one bfloat16 product, or three (compensated, "bf16x3").

A float32 number x splits exactly into a bfloat16 head and a float32 tail, ``x = hi + (x - hi)``, and the tail
rounded to bfloat16 (``lo``) carries the next 8 bits, so ``hi + lo`` holds ~16 of float32's 24 mantissa bits. Then

    x @ W  ~=  x_hi @ W_hi  +  x_lo @ W_hi  +  x_hi @ W_lo        (the dropped x_lo @ W_lo is ~2^-16 of the result)

with every product a bfloat16 GEMM that accumulates in float32. This is torch's own ``"high"`` float32 matmul
precision ("treat each float32 number as the sum of two bfloat16 numbers"), which PyTorch implements on CUDA only.
On a CPU with AMX-BF16 a bfloat16 GEMM runs ~6x float32, so three of them still beat one float32 GEMM; on a CPU with
AVX512-BF16 only (~2.6x) they do not, which is why the engine only uses this where the kernel probe
(:mod:`hyprec.hardware`) measured it faster.

The products need a GEMM that reads bfloat16 and writes float32: PyTorch's CPU ``mm`` returns bfloat16 for bfloat16
inputs (rounding the result to 8 bits would undo the compensation). MKL, which PyTorch links, provides exactly
that GEMM as its public CBLAS function ``cblas_gemm_bf16bf16f32``; it is called here through ``ctypes`` (no build
step; the call releases the GIL and runs on MKL's threads, which ``torch.set_num_threads`` also sets).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

#: ``matmul_precision`` values (torch's vocabulary): ``highest`` float32 GEMMs; ``high`` three bfloat16 products
#: (float32-grade); ``medium`` one bfloat16 product with a float32 result.
MATMUL_PRECISIONS = ("highest", "high", "medium")
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _gemm_bf16bf16f32() -> ctypes._CFuncPtr | None:
    """MKL's ``cblas_gemm_bf16bf16f32`` from the libraries PyTorch loaded, or None where it has none (non-MKL
    builds, non-x86 machines)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = lib_dir / name
        if not path.exists():
            continue
        try:
            fn = ctypes.CDLL(str(path)).cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            return None
        c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        fn.argtypes = [c_int] * 6 + [c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
        fn.restype = None
        return fn
    return None


def bf16_gemm_available() -> bool:
    """Whether this PyTorch build exposes a bfloat16 x bfloat16 -> float32 GEMM on the CPU."""
    return _gemm_bf16bf16f32() is not None


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, beta: float) -> None:
    """``out = a @ b.T + beta * out`` for row-major bfloat16 ``a [M, K]``, ``b [N, K]`` and float32 ``out [M, N]``."""
    m, k = a.shape
    _gemm_bf16bf16f32()(
        _ROW_MAJOR, _NO_TRANS, _TRANS, m, b.shape[0], k, 1.0,
        a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), beta, out.data_ptr(), out.stride(0),
    )  # fmt: skip


@dataclass
class SplitWeight:
    """A float32 weight ``[out, in]`` as a bfloat16 head and, for ``high`` precision, a bfloat16 tail."""

    hi: torch.Tensor
    lo: torch.Tensor | None

    @classmethod
    def of(cls, weight: torch.Tensor, precision: str) -> SplitWeight:
        w = weight.detach().float().contiguous()
        hi = w.to(torch.bfloat16)
        lo = (w - hi.float()).to(torch.bfloat16) if precision == "high" else None
        return cls(hi, lo)


def split_linear(x: torch.Tensor, weight: SplitWeight, bias: torch.Tensor | None, out: torch.Tensor | None = None):
    """``x @ W.T + bias`` in float32 from bfloat16 products (see the module docstring); ``x`` is float32
    ``[..., in]``. ``out`` (``[rows, out]``, contiguous) receives the result when given."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n = weight.hi.shape[0]
    if out is None:
        out = torch.empty(rows.shape[0], n, dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        if bias is not None:
            out.copy_(bias.expand_as(out))
        x_hi = rows.to(torch.bfloat16)
        _gemm(x_hi, weight.hi, out, 1.0 if bias is not None else 0.0)
        if weight.lo is not None:
            # The tail of x is exact in float32 (x and x_hi share their leading bits); rounding it keeps 8 more.
            x_lo = (rows - x_hi.float()).to(torch.bfloat16)
            _gemm(x_lo, weight.hi, out, 1.0)
            _gemm(x_hi, weight.lo, out, 1.0)
    return out.reshape(*lead, n)
