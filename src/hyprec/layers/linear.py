"""Linear layers whose rows can be made independent of the batch they are computed in.

A BLAS GEMM does not promise that row ``i`` of ``x @ W^T`` depends on row ``i`` of ``x`` alone: the library picks
its kernel, its blocking and its split across threads from the shape, so the same row gives results that differ in
the last bits depending on how many rows it was packed with (measured with torch 2.13's MKL: a row differs
between M=1..15, M=64 and M=300 for a 1536x384 float32 weight; gemv at M=1 sums K in another order altogether).
Half-precision attention then rounds those last bits differently, and a text's embedding changes with its
neighbours.

The batch-invariant mode computes every GEMM on tiles of a fixed number of rows (the last one zero-padded), so
every call has the same shape and the same kernel, blocking and thread split; within one shape, rows are computed
by the same code regardless of their position and of the other rows' data. Prefill and encoder rows use tiles of
:data:`ROW_TILE`; decode rows and output-head rows, one per sequence, use :data:`DECODE_ROW_TILE`. Operands are
64-byte aligned (MKL's reproducibility conditions include alignment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from hyprec.layers.compensated import SplitWeight, split_linear

#: Rows per GEMM call in batch-invariant mode: large enough that MKL/oneDNN run their blocked kernels at a fair
#: share of full speed, small enough that a single short input wastes little on padding.
ROW_TILE = 64
#: Rows per GEMM call for decode rows (one generated token per sequence) and for output-head rows (one per
#: sequence). A 64-row tile would turn a memory-bound matrix-vector product into a compute-bound GEMM (measured:
#: Gemma's 262k x 640 head takes 24 ms at 1 row, 52 ms at 16 and 136 ms at 64); 16 rows cost about 2x of one and
#: are exactly a decode batch of 16.
DECODE_ROW_TILE = 16
_ALIGN = 64

# How many leading rows of the packed batch are decode rows, for the forward pass being run (set by the model
# runner, which packs decode rows first). Whether a row is a decode row depends on its token alone (a generated
# token is always computed one per step in deterministic mode), so its tile size does too.
_decode_rows: ContextVar[int] = ContextVar("hyprec_decode_rows", default=0)


@contextmanager
def leading_decode_rows(count: int) -> Iterator[None]:
    """Within this block, the first ``count`` rows given to a batch-invariant linear layer are decode rows."""
    token = _decode_rows.set(count)
    try:
        yield
    finally:
        _decode_rows.reset(token)


def row_invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tile: int | None = None,
    split: SplitWeight | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with every output row independent of the other rows of ``x``.

    ``x`` is ``[..., in_features]``; the leading dimensions are flattened into rows. Rows are computed in tiles of
    ``tile`` rows when given, else the leading decode rows (:func:`leading_decode_rows`) in tiles of
    :data:`DECODE_ROW_TILE` and the rest in tiles of :data:`ROW_TILE`. Full tiles are read and written in place;
    only a partial last tile goes through a zero-padded buffer. With ``split``, every tile is computed from the
    weight's bfloat16 parts (:func:`~hyprec.layers.compensated.split_linear`).
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    out = rows.new_empty(n, weight.shape[0])
    weight_t = weight.t()

    def tile_mm(x: torch.Tensor, target: torch.Tensor) -> None:
        if split is not None:
            split_linear(x, split, bias, out=target)
        elif bias is None:
            torch.mm(x, weight_t, out=target)
        else:
            torch.addmm(bias, x, weight_t, out=target)

    decode = 0 if tile is not None else min(_decode_rows.get(), n)
    if decode:
        _tiles(rows[:decode], tile_mm, out[:decode], DECODE_ROW_TILE)
    _tiles(rows[decode:], tile_mm, out[decode:], tile or ROW_TILE)
    return out.reshape(*lead, weight.shape[0])


def _tiles(
    rows: torch.Tensor, tile_mm: Callable[[torch.Tensor, torch.Tensor], None], out: torch.Tensor, tile: int
) -> None:
    """``tile_mm(rows, out)`` in calls of exactly ``tile`` rows, on 64-byte aligned operands (MKL's reproducibility
    conditions include alignment)."""
    if not rows.is_contiguous() or rows.data_ptr() % _ALIGN:
        rows = rows.clone(memory_format=torch.contiguous_format)
    n = rows.shape[0]
    for start in range(0, n, tile):
        chunk = rows[start : start + tile]
        target = out[start : start + tile]
        if chunk.shape[0] == tile and chunk.data_ptr() % _ALIGN == 0 and target.data_ptr() % _ALIGN == 0:
            tile_mm(chunk, target)
            continue
        padded = rows.new_zeros(tile, rows.shape[1])
        padded[: chunk.shape[0]] = chunk
        result = out.new_empty(tile, out.shape[1])
        tile_mm(padded, result)
        target.copy_(result[: chunk.shape[0]])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and weight names) that can run batch-invariant (:func:`set_batch_invariant`)
    and, in float32, from bfloat16 products (:func:`set_matmul_precision`)."""

    batch_invariant: bool = False
    #: The weight's bfloat16 parts under ``high``/``medium`` matmul precision; None computes in the weight's dtype.
    split: SplitWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return row_invariant_linear(x, self.weight, self.bias, split=self.split)
        if self.split is not None:
            return split_linear(x, self.split, self.bias)
        return F.linear(x, self.weight, self.bias)


def head_linear(x: torch.Tensor, weight: torch.Tensor, *, invariant: bool) -> torch.Tensor:
    """An output head (one row per sequence): batch-invariant in tiles of :data:`DECODE_ROW_TILE` rows."""
    return row_invariant_linear(x, weight, tile=DECODE_ROW_TILE) if invariant else F.linear(x, weight)


def set_matmul_precision(module: nn.Module, precision: str) -> None:
    """Compute every float32 :class:`Linear` under ``module`` at ``precision`` (``highest``: float32 GEMMs; ``high``:
    three bfloat16 products; ``medium``: one; see :mod:`hyprec.layers.compensated`). Layers held in half precision
    keep their own arithmetic."""
    for m in module.modules():
        if isinstance(m, Linear):
            use_split = precision != "highest" and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            m.split = SplitWeight.of(m.weight, precision) if use_split else None


def set_batch_invariant(module: nn.Module, enabled: bool) -> None:
    """Switch every submodule that declares a ``batch_invariant`` class attribute (the :class:`Linear` layers, and
    models whose output head is a plain weight) into or out of batch-invariant mode."""
    for m in module.modules():
        if hasattr(type(m), "batch_invariant"):
            m.batch_invariant = enabled
