"""Linear layers over weights kept in a checkpoint's stored block format, with float32 activations.

Decoding one token reads every weight once, so at small batches its speed is the weight bytes over the memory
bandwidth. A GGUF file stores most weights in blocks of small integers with a scale; dequantising them to float32 at
load quadruples (Q8_0) the bytes each token reads. :class:`Q8_0Weight` keeps a Q8_0 tensor as it is stored (int8 values,
one scale per 32) and multiplies float32 activations by it directly (``hyprec/kernels/q8_0.c``), accumulating in
float32: the result equals the float32-dequantised layer up to the order of float32 operations (``w = d * q`` is
exact in float32, an 11-bit float16 scale times an 8-bit integer). Where the kernel cannot be built,
:meth:`Q8_0Weight.linear` runs the pure-torch reference (dequantise a slab of rows, ``F.linear``), which is also what
the tests compare the kernel against.

Rows of the output are independent (each is one row of ``x`` against the whole weight, summed in an order that
depends on the weight's width alone), so the layer is batch-invariant as it stands.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyprec import kernels

#: Values per Q8_0 block (one scale each).
Q8_0_BLOCK = 32
#: Rows of ``x`` the kernel serves in one call. More rows (a prefill, teacher-forced scoring) are computed by
#: dequantised slabs of the weight and a float32 GEMM, which is faster there (the kernel's per-row loop is not a
#: blocked GEMM: 43 ms for 16 rows of Gemma's head where MKL's float32 GEMM takes 61 ms, and ~2.4x slower than the
#: GEMM at 256 rows) -- except in batch-invariant mode, where every row goes through the kernel, 16 at a time.
KERNEL_MAX_ROWS = 16
_SLAB_ROWS = 4096  # rows of the weight dequantised at a time by the reference: ~10 MB of float32 for K = 640


@functools.cache
def _q8_0_kernel() -> ctypes._CFuncPtr | None:
    lib = kernels.load("q8_0")
    if lib is None:
        return None
    fn = lib.q8_0_linear
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    fn.restype = None
    return fn


def native_kernel_available() -> bool:
    """Whether the compiled Q8_0 kernel loads on this machine."""
    return _q8_0_kernel() is not None


@dataclass
class Q8_0Weight:
    """A ``[out, in]`` weight stored as Q8_0: int8 ``values`` ``[out, in]`` and float32 ``scales``
    ``[out, in / 32]`` (GGUF's float16 scales, widened exactly)."""

    values: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        out, k = self.values.shape
        if self.values.dtype != torch.int8 or k % Q8_0_BLOCK:
            raise ValueError(f"Q8_0 values must be int8 with a width divisible by 32, got {self.values.dtype} {k}")
        if self.scales.shape != (out, k // Q8_0_BLOCK) or self.scales.dtype != torch.float32:
            raise ValueError(f"Q8_0 scales must be float32 {(out, k // Q8_0_BLOCK)}, got {tuple(self.scales.shape)}")
        self.values, self.scales = self.values.contiguous(), self.scales.contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Float32 weight rows (all by default; ``rows``: indices or a slice), exactly ``scale * value``."""
        values, scales = self.values[rows], self.scales[rows]
        return (values.float().view(*values.shape[:-1], -1, Q8_0_BLOCK) * scales[..., None]).flatten(-2)

    def linear(self, x: torch.Tensor, *, invariant: bool = False) -> torch.Tensor:
        """``x @ W.T`` for float32 ``x [..., in]`` -> float32 ``[..., out]``. ``invariant``: every row's result
        independent of the other rows, whatever their number (batch-invariant mode)."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        kernel = _q8_0_kernel() if x.device.type == "cpu" else None
        if kernel is None or (rows.shape[0] > KERNEL_MAX_ROWS and not invariant):
            return self.reference_linear(rows).reshape(*lead, self.shape[0])
        out = torch.empty(rows.shape[0], self.shape[0], dtype=torch.float32)
        for start in range(0, rows.shape[0], KERNEL_MAX_ROWS):
            part = rows[start : start + KERNEL_MAX_ROWS]
            kernel(
                part.data_ptr(), part.shape[0], part.shape[1],
                self.values.data_ptr(), self.scales.data_ptr(), self.shape[0],
                out[start:].data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        return out.reshape(*lead, self.shape[0])

    def reference_linear(self, rows: torch.Tensor) -> torch.Tensor:
        """The pure-torch path: dequantise a slab of weight rows at a time, multiply in float32."""
        out = torch.empty(rows.shape[0], self.shape[0], dtype=torch.float32, device=rows.device)
        for start in range(0, self.shape[0], _SLAB_ROWS):
            part = slice(start, start + _SLAB_ROWS)
            out[:, part] = F.linear(rows, self.dequantize(part).to(rows.device))
        return out
