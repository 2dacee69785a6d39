"""Linear layers whose rows can be made independent of the batch they are computed in.

A BLAS GEMM does not promise that row ``i`` of ``x @ W^T`` depends on row ``i`` of ``x`` alone: the library picks
its kernel, its blocking and its split across threads from the shape, so the same row gives results that differ in
the last bits depending on how many rows it was packed with (measured with torch 2.13's MKL: a row differs
between M=1..15, M=64 and M=300 for a 1536x384 float32 weight; gemv at M=1 sums K in another order altogether).
Half-precision attention then rounds those last bits differently, and a text's embedding changes with its
neighbours.

The batch-invariant mode computes every GEMM on tiles of exactly :data:`ROW_TILE` rows (the last one zero-padded),
so every call has the same shape and the same kernel, blocking and thread split; within one shape, rows are
computed by the same code regardless of their position and of the other rows' data. Tiles start on 64-byte
boundaries (MKL's reproducibility conditions include alignment): ``ROW_TILE * K * itemsize`` is a multiple of 64
for any ``K`` once the input itself is aligned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Rows per GEMM call in batch-invariant mode: large enough that MKL/oneDNN run their blocked kernels at a fair
#: share of full speed, small enough that a single short input wastes little on padding.
ROW_TILE = 64
_ALIGN = 64


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with every output row independent of the other rows of ``x``.

    ``x`` is ``[..., in_features]``; the leading dimensions are flattened into rows and computed in tiles of
    :data:`ROW_TILE` rows. Full tiles are read in place; only the last, partial tile is copied into a zero-padded
    buffer.
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous() or rows.data_ptr() % _ALIGN:
        rows = rows.clone(memory_format=torch.contiguous_format)
    n = rows.shape[0]
    full = n - n % ROW_TILE
    out = rows.new_empty(full + (ROW_TILE if full < n else 0), weight.shape[0])
    weight_t = weight.t()
    for start in range(0, full, ROW_TILE):
        _tile_mm(rows[start : start + ROW_TILE], weight_t, bias, out[start : start + ROW_TILE])
    if full < n:
        tail = rows.new_zeros(ROW_TILE, rows.shape[1])
        tail[: n - full] = rows[full:]
        _tile_mm(tail, weight_t, bias, out[full:])
    return out[:n].reshape(*lead, weight.shape[0])


def _tile_mm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(x, weight_t, out=out)
    else:
        torch.addmm(bias, x, weight_t, out=out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and weight names) that can run batch-invariant (:func:`set_batch_invariant`)."""

    batch_invariant: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return row_invariant_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, invariant: bool) -> torch.Tensor:
    """Functional form for weights that live outside a :class:`Linear` (a tied output head)."""
    return row_invariant_linear(x, weight, bias) if invariant else F.linear(x, weight, bias)


def set_batch_invariant(module: nn.Module, enabled: bool) -> None:
    """Switch every submodule that declares a ``batch_invariant`` class attribute (the :class:`Linear` layers, and
    models whose output head is a plain weight) into or out of batch-invariant mode."""
    for m in module.modules():
        if hasattr(type(m), "batch_invariant"):
            m.batch_invariant = enabled
