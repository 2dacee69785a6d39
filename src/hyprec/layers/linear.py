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

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from hyprec.layers import onednn
from hyprec.layers.activation import ACTIVATIONS
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
    product: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with every output row independent of the other rows of ``x``.

    ``x`` is ``[..., in_features]``; the leading dimensions are flattened into rows. Rows are computed in tiles of
    ``tile`` rows when given, else the leading decode rows (:func:`leading_decode_rows`) in tiles of
    :data:`DECODE_ROW_TILE` and the rest in tiles of :data:`ROW_TILE`. Full tiles are read and written in place;
    only a partial last tile goes through a zero-padded buffer. ``product`` (rows -> result rows) replaces the
    plain GEMM of each tile (another GEMM library, bfloat16 parts, a fused activation).
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    out = rows.new_empty(n, weight.shape[0])
    weight_t = weight.t()

    def tile_mm(x: torch.Tensor, target: torch.Tensor) -> None:
        if product is not None:
            target.copy_(product(x))
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


#: How a float32 :class:`Linear` multiplies (:func:`set_matmul_precision`): ``torch`` (``F.linear``: MKL on CPU),
#: ``onednn`` (prepacked weight, fused activation; :mod:`hyprec.layers.onednn`), ``bf16x3`` (three bfloat16
#: products, float32-grade) or ``bf16`` (one; :mod:`hyprec.layers.compensated`).
KERNELS = ("torch", "onednn", "bf16x3", "bf16")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and weight names) that can run batch-invariant (:func:`set_batch_invariant`),
    on another float32 kernel (:data:`KERNELS`, :func:`set_matmul_precision`), and with its activation applied to
    its output (``activation``: a Hugging Face ``hidden_act`` name of :data:`hyprec.layers.activation.ACTIVATIONS`),
    fused into the GEMM where the kernel can.

    A kernel other than ``torch`` reads a prepared copy of the weight (packed, or split into bfloat16 parts). The copy
    is keyed by the weight's identity and version counter, so it is rebuilt after any change to the weight (a
    rescale, a cast, a reload) and never read stale; it is not copied with the module (``deepcopy``).
    """

    batch_invariant: bool = False
    kernel: str = "torch"

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = activation
        self._prepared: tuple[tuple, object] | None = None

    def __getstate__(self) -> dict:
        # oneDNN's packed tensors cannot be copied (opaque storage); the copy prepares its own on first use.
        return {**self.__dict__, "_prepared": None}

    @property
    def prepared(self) -> object | None:
        """The prepared weight the last forward of a kernel other than ``torch`` read (a packed oneDNN tensor or a
        :class:`SplitWeight`), or None: none ran yet, or a kernel change or a copy dropped it."""
        return None if self._prepared is None else self._prepared[1]

    def _prepared_weight(self) -> object | None:
        """The weight as :attr:`kernel` reads it, or None where ``F.linear`` runs (``torch``, or a weight that is
        not float32 on the CPU: half-precision layers keep their own arithmetic; engines load ordinary tensors)."""
        w = self.weight
        if self.kernel == "torch" or w.dtype != torch.float32 or w.device.type != "cpu" or w.is_inference():
            return None  # (an inference tensor has no version counter to key a prepared copy by)
        key = (self.kernel, w.data_ptr(), w._version)
        if self._prepared is None or self._prepared[0] != key:
            if self.kernel == "onednn":
                prepared = onednn.pack(w)
            else:
                prepared = SplitWeight.of(w, "high" if self.kernel == "bf16x3" else "medium")
            self._prepared = (key, prepared)
        return self._prepared[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = self._prepared_weight()
        fused = isinstance(prepared, torch.Tensor) and self.activation in onednn.POST_OPS
        product = None
        if isinstance(prepared, SplitWeight):
            product = functools.partial(split_linear, weight=prepared, bias=self.bias)
        elif prepared is not None:
            product = functools.partial(
                onednn.linear, packed=prepared, bias=self.bias, activation=self.activation if fused else None
            )
        if self.batch_invariant:
            out = row_invariant_linear(x, self.weight, self.bias, product=product)
        elif product is not None:
            out = product(x)
        else:
            out = F.linear(x, self.weight, self.bias)
        return out if fused or self.activation is None else ACTIVATIONS[self.activation](out)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("activation", self.activation), ("kernel", self.kernel)) if v)
        return super().extra_repr() + extra


def head_linear(x: torch.Tensor, weight: torch.Tensor, *, invariant: bool) -> torch.Tensor:
    """An output head (one row per sequence): batch-invariant in tiles of :data:`DECODE_ROW_TILE` rows."""
    return row_invariant_linear(x, weight, tile=DECODE_ROW_TILE) if invariant else F.linear(x, weight)


def set_matmul_precision(module: nn.Module, precision: str, float32_gemm: str = "torch") -> None:
    """Compute every float32 :class:`Linear` under ``module`` at ``precision`` (``highest``: float32 GEMMs, from
    ``float32_gemm``: ``torch`` or ``onednn``; ``high``: three bfloat16 products; ``medium``: one; see
    :data:`KERNELS`). Layers held in half precision keep their own arithmetic."""
    kernel = {"highest": float32_gemm, "high": "bf16x3", "medium": "bf16"}[precision]
    if kernel not in KERNELS:
        raise ValueError(f"float32_gemm={float32_gemm!r}")  # resolve_matmul validates user input
    for m in module.modules():
        if isinstance(m, Linear):
            m.kernel, m._prepared = kernel, None


def set_batch_invariant(module: nn.Module, enabled: bool) -> None:
    """Switch every submodule that declares a ``batch_invariant`` class attribute (the :class:`Linear` layers, and
    models whose output head is a plain weight) into or out of batch-invariant mode."""
    for m in module.modules():
        if hasattr(type(m), "batch_invariant"):
            m.batch_invariant = enabled
