"""Linear and embedding layers over weights kept in a checkpoint's stored block format, with float32 activations.

Decoding one token reads every weight once, so at small batches its speed is the weight bytes over the memory
bandwidth. A GGUF file stores most weights in blocks of small integers with float16 scales; dequantising them to
float32 at load multiplies the bytes each token reads by 3.8 (Q8_0) to 7.1 (Q4_K). The layers here keep the blocks
as stored and multiply float32 activations by them directly (``hyprec/kernels/gguf_blocks.c``), accumulating in
float32: each weight is dequantised in registers exactly as llama.cpp's reference dequantiser computes it (the same
float32 operations), so the result equals the float32-dequantised layer up to the order of float32 sums. Activations
are never quantised (llama.cpp rounds them to 8 bits for its integer dot products; that is where its fidelity goes).

Where the kernels cannot be built, :meth:`StoredWeight.linear` runs the reference: dequantise a slab of weight rows
(gguf-py's dequantiser, or plain torch for Q8_0) and multiply with ``F.linear``; the tests compare the kernels
against it. More than :data:`KERNEL_MAX_ROWS` rows (a prefill) take that path too, with the kernels' dequantiser:
the per-row kernels are not blocked GEMMs, and a float32 GEMM over a freshly dequantised weight is faster there.

Rows of the output are independent (each is one row of ``x`` against the whole weight, summed in an order that
depends on the weight's width alone), so the kernels are batch-invariant as they stand.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyprec import kernels
from hyprec.layers.activation import ACTIVATIONS


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF storage format: GGML's type id, values per block and bytes per block."""

    type_id: int
    block_values: int
    block_bytes: int


#: The GGUF formats the kernels read (ggml.h's ids and block sizes). Q2_K and Q3_K weights are dequantised at load.
FORMATS: dict[str, BlockFormat] = {
    # Unquantised halves, counted in "blocks" of 16 values: the kernels' sums run 16 lanes wide.
    "F16": BlockFormat(1, 16, 32),
    "BF16": BlockFormat(30, 16, 32),
    "Q4_0": BlockFormat(2, 32, 18),
    "Q4_1": BlockFormat(3, 32, 20),
    "Q5_0": BlockFormat(6, 32, 22),
    "Q5_1": BlockFormat(7, 32, 24),
    "Q8_0": BlockFormat(8, 32, 34),
    "Q4_K": BlockFormat(12, 256, 144),
    "Q5_K": BlockFormat(13, 256, 176),
    "Q6_K": BlockFormat(14, 256, 210),
}
#: Rows of ``x`` the kernels serve in one call. More rows are computed by dequantised slabs of the weight and a
#: float32 GEMM, which is faster there (the kernels' per-row loop is not a blocked GEMM: ~2.5x slower than MKL at 128
#: rows of Gemma's layers) -- except in batch-invariant mode, where every row goes through the kernels, 16 at a time.
KERNEL_MAX_ROWS = 16
_SLAB_ROWS = 4096  # weight rows dequantised at a time by the reference: ~10 MB of float32 for K = 640


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled block-format kernels (``kernels/gguf_blocks.c``) with their ctypes signatures set, or None where
    they cannot be built (callers then use the pure-torch reference)."""
    lib = kernels.load("gguf_blocks")
    if lib is None:
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q8_0_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.blocks_linear.argtypes = [i32, ptr, i64, i64, ptr, i64, i64, ptr, i32]
    lib.blocks_dequantize.argtypes = [i32, ptr, i64, i64, i64, ptr, i32]
    for fn in (lib.q8_0_linear, lib.blocks_linear, lib.blocks_dequantize):
        fn.restype = None
    return lib


def native_kernel_available() -> bool:
    """Whether the compiled block-format kernels load on this machine."""
    return library() is not None


class StoredWeight:
    """A ``[out, in]`` weight kept in a stored format; :meth:`linear` multiplies float32 activations by it."""

    #: the storage format's name (:data:`FORMATS`)
    format: str

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Float32 weight rows (all by default; ``rows``: indices or a slice), exactly as llama.cpp dequantises them."""
        raise NotImplementedError

    def kernel_linear(self, lib: ctypes.CDLL, rows: torch.Tensor, out: torch.Tensor) -> None:
        """``out = rows @ W.T`` by the compiled kernel (at most :data:`KERNEL_MAX_ROWS` contiguous float32 rows)."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, *, invariant: bool = False) -> torch.Tensor:
        """``x @ W.T`` for float32 ``x [..., in]`` -> float32 ``[..., out]``. ``invariant``: every row's result
        independent of the other rows, whatever their number (batch-invariant mode)."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        lib = library() if x.device.type == "cpu" else None
        if lib is None or (rows.shape[0] > KERNEL_MAX_ROWS and not invariant):
            return self.reference_linear(rows).reshape(*lead, self.shape[0])
        out = torch.empty(rows.shape[0], self.shape[0], dtype=torch.float32)
        for start in range(0, rows.shape[0], KERNEL_MAX_ROWS):
            self.kernel_linear(lib, rows[start : start + KERNEL_MAX_ROWS], out[start:])
        return out.reshape(*lead, self.shape[0])

    def reference_linear(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantise a slab of weight rows at a time and multiply in float32 (``F.linear``)."""
        out = torch.empty(rows.shape[0], self.shape[0], dtype=torch.float32, device=rows.device)
        for start in range(0, self.shape[0], _SLAB_ROWS):
            part = slice(start, start + _SLAB_ROWS)
            out[:, part] = F.linear(rows, self.dequantize(part).to(rows.device))
        return out


class Q8_0Weight(StoredWeight):
    """Q8_0 as int8 ``values [out, in]`` and float32 ``scales [out, in / 32]`` (GGUF's float16 scales, widened
    exactly). Its kernel scales each block's sum once (``acc += d * (q . x)``), 1.3x faster at one row than
    dequantising first; ``w = d * q`` is exact in float32 (an 11-bit scale times an 8-bit integer)."""

    format = "Q8_0"

    def __init__(self, values: torch.Tensor, scales: torch.Tensor):
        out, k = values.shape
        if values.dtype != torch.int8 or k % 32:
            raise ValueError(f"Q8_0 values must be int8 with a width divisible by 32, got {values.dtype} {k}")
        if scales.shape != (out, k // 32) or scales.dtype != torch.float32:
            raise ValueError(f"Q8_0 scales must be float32 {(out, k // 32)}, got {tuple(scales.shape)}")
        self.values, self.scales = values.contiguous(), scales.contiguous()

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> Q8_0Weight:
        """From GGUF's raw rows ``[out, in / 32 * 34]`` (uint8): per block a little-endian float16 scale, then 32
        int8 values."""
        out = blocks.shape[0]
        raw = blocks.reshape(out, -1, 34)
        scales = raw[..., :2].contiguous().view(torch.float16)[..., 0].float()
        return cls(raw[..., 2:].contiguous().view(torch.int8).reshape(out, -1), scales)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        values, scales = self.values[rows], self.scales[rows]
        return (values.float().view(*values.shape[:-1], -1, 32) * scales[..., None]).flatten(-2)

    def kernel_linear(self, lib: ctypes.CDLL, rows: torch.Tensor, out: torch.Tensor) -> None:
        lib.q8_0_linear(
            rows.data_ptr(), rows.shape[0], rows.shape[1],
            self.values.data_ptr(), self.scales.data_ptr(), self.shape[0],
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip


class BlockWeight(StoredWeight):
    """Any other :data:`FORMATS` entry as GGUF stores it: raw rows ``data [out, row bytes]`` (uint8)."""

    def __init__(self, format: str, data: torch.Tensor, in_features: int):
        self.format, self.spec, self.in_features = format, _check_rows(format, data, in_features), in_features
        self.data = data.contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        data = self.data[rows].contiguous()
        lead, raw = data.shape[:-1], data.reshape(-1, data.shape[-1])
        lib = library()
        if lib is None:  # gguf-py's dequantiser: llama.cpp's own reference, in numpy
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            values = dequantize(raw.numpy(), GGMLQuantizationType(self.spec.type_id))
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(*lead, self.in_features)
        out = torch.empty(raw.shape[0], self.in_features, dtype=torch.float32)
        lib.blocks_dequantize(
            self.spec.type_id, raw.data_ptr(), raw.shape[1], raw.shape[0], self.in_features, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out.reshape(*lead, self.in_features)

    def kernel_linear(self, lib: ctypes.CDLL, rows: torch.Tensor, out: torch.Tensor) -> None:
        lib.blocks_linear(
            self.spec.type_id, rows.data_ptr(), rows.shape[0], rows.shape[1],
            self.data.data_ptr(), self.data.shape[1], self.shape[0], out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip


def _check_rows(format: str, data: torch.Tensor, in_features: int) -> BlockFormat:
    """``format``'s spec, once ``data`` is checked to be its raw rows of ``in_features`` values (ValueError if not)."""
    spec = FORMATS.get(format)
    if spec is None:
        raise ValueError(f"no kernel reads GGUF format {format!r}; readable: {', '.join(FORMATS)}")
    row_bytes = in_features // spec.block_values * spec.block_bytes
    shape_ok = data.dim() == 2 and data.shape[1] == row_bytes and not in_features % spec.block_values
    if data.dtype != torch.uint8 or not shape_ok:
        raise ValueError(
            f"{format} rows of {in_features} values must be uint8 [out, {row_bytes}] (blocks of "
            f"{spec.block_values}), got {data.dtype} {tuple(data.shape)}"
        )
    return spec


def stored_weight(format: str, data: torch.Tensor, in_features: int) -> StoredWeight:
    """The layer weight for a tensor GGUF stores as ``data`` (raw uint8 rows) in ``format`` (:data:`FORMATS`)."""
    if format == "Q8_0":
        _check_rows(format, data, in_features)
        return Q8_0Weight.from_blocks(data)
    return BlockWeight(format, data, in_features)


class StoredLinear(nn.Module):
    """A linear layer computing from a :class:`StoredWeight` (same ``bias`` and ``activation`` as the
    :class:`~hyprec.layers.linear.Linear` it replaces).

    ``weight`` dequantises the whole weight to a new float32 tensor on each read, for the precision tools that read
    weights (attention bounds); writing to it changes nothing, so tools that rewrite weights (rescaling, precision
    plans) run on float32 weights instead (:func:`hyprec.engine.model_loading.load_model` never stores those).
    """

    batch_invariant: bool = False

    def __init__(self, stored: StoredWeight, bias: torch.Tensor | None = None, activation: str | None = None):
        super().__init__()
        self.stored = stored
        self.out_features, self.in_features = stored.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.activation = activation

    @property
    def weight(self) -> torch.Tensor:
        return self.stored.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stored.linear(x, invariant=self.batch_invariant)
        if self.bias is not None:
            out = out + self.bias
        return out if self.activation is None else ACTIVATIONS[self.activation](out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.stored.format}"


class StoredEmbedding(nn.Module):
    """An embedding table looked up from a :class:`StoredWeight`: each row dequantised exactly, on demand."""

    def __init__(self, stored: StoredWeight):
        super().__init__()
        self.stored = stored
        self.num_embeddings, self.embedding_dim = stored.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.stored.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.stored.dequantize(ids.reshape(-1).cpu()).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.stored.format}"
