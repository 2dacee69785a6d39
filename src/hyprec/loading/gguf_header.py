"""A GGUF file's header -- metadata and tensor table -- read with ``struct`` from a memory map.

gguf-py's ``GGUFReader`` turns every metadata value into numpy views, one string at a time: 11 s for Gemma-3's
262,144-token vocabulary on the benchmark machine, paid by every process that opens the file. hyprec builds the
tokenizer through transformers' converter, which reads the vocabulary itself, so this reader skips arrays of strings
(their value here is their length) and reads everything else as Python values, in 0.05 s. Tensor data stay in the
map until read, as the same raw arrays ``GGUFReader`` gives (float32/float16 values in numpy order, else the bytes
of each row's blocks). The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

# Scalar value types: struct format and width. 8 (string) and 9 (array) are read by _value.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY_TYPES = {QType.F32: np.float32, QType.F16: np.float16}  # what GGUFReader returns as typed values


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor's entry (the attribute names of gguf-py's ``ReaderTensor``)."""

    name: str
    shape: tuple[int, ...]  # ggml order: fastest-moving dimension first
    tensor_type: QType
    data_offset: int  # absolute, in the file
    n_bytes: int
    _map: np.ndarray

    @property
    def data(self) -> np.ndarray:
        """The tensor as stored: values (F32/F16) in numpy order, else uint8 rows of blocks."""
        raw = self._map[self.data_offset : self.data_offset + self.n_bytes]
        dtype = _NUMPY_TYPES.get(self.tensor_type)
        if dtype is not None:
            return raw.view(dtype).reshape(tuple(reversed(self.shape)))
        return raw.reshape(*reversed(self.shape[1:]), -1)


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[HeaderTensor]
    size: int  # bytes in the file


def read_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s header. Raises ValueError/struct.error/IndexError on a file that is not a readable GGUF
    (the caller names the file)."""
    data = np.memmap(path, mode="r", dtype=np.uint8)
    buf = memoryview(data)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"bad magic {bytes(buf[:4])!r}")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; readable: 2, 3")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _value(buf, pos + 4, value_type)
    entries = []
    for _ in range(tensor_count):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, tuple(int(d) for d in shape), QType(type_id), offset))
    alignment = metadata.get("general.alignment", 32)
    start = -(-pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in entries:
        block_values, block_bytes = GGML_QUANT_SIZES[qtype]
        n_bytes = math.prod(shape) // block_values * block_bytes
        tensors.append(HeaderTensor(name, shape, qtype, start + offset, n_bytes, data))
    return GGUFHeader(metadata, tensors, data.size)


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _value(buf: memoryview, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type in _SCALARS:
        fmt = _SCALARS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _string(buf, pos)
    if value_type != _ARRAY:
        raise ValueError(f"metadata value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _SCALARS:
        fmt = _SCALARS[item_type]
        return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)), pos + count * struct.calcsize(fmt)
    if item_type != _STRING:
        raise ValueError(f"metadata array of type {item_type}")
    for _ in range(count):  # a vocabulary or merge table: skipped, its value is its length
        (length,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + length
    return count, pos
