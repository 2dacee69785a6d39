"""The vocabulary of precision that every floor shares: format names, their torch dtypes and ranges, the choices of
the precision options, and the dtypes of one layer.

Only names and facts live here (no decisions): :mod:`hyprec.precision.policy` resolves the user's names into a
policy, and the engine config (:mod:`hyprec.config`) validates its options against the choices below.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyprec.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16", "hybrid")
ATTN_DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ATTN_DTYPES
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = (torch.float16, torch.bfloat16)
#: Largest finite values: float16 overflows above 65504, where a float32 residual stream can reach ~1e5 (Gemma-3).
FP16_MAX = float(torch.finfo(torch.float16).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)

#: How float32 linear layers multiply (:func:`hyprec.precision.policy.resolve_matmul`).
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")
#: Which library computes float32 GEMMs (``highest`` matmul precision): ``torch`` (``F.linear``, MKL on x86) or
#: ``onednn`` (prepacked weights, fused activations; :mod:`hyprec.layers.onednn`).
FLOAT32_GEMMS = ("auto", "torch", "onednn")
#: Whether weights a checkpoint stores in a block format stay as stored (``stored``: a GGUF file's linear weights and
#: embedding tables, multiplied by :mod:`hyprec.layers.quantized` with float32 activations, exact up to the order of
#: float32 sums) or are dequantised to float32 at load (``float32``). ``auto``: stored where it applies.
WEIGHTS = ("auto", "stored", "float32")
#: What the run-time guard does when a pass produces NaN/inf (:mod:`hyprec.precision.guard`).
ON_NONFINITE = ("fallback", "raise", "ignore")
#: How half-precision arithmetic runs (:mod:`hyprec.precision.emulation`): on the device's half kernels, emulated in
#: float32 (rounded to the half format wherever the native model holds it), or emulated only where the device has
#: no half hardware path (:func:`hyprec.hardware.native_half`).
HALF_ARITHMETIC = ("native", "emulated", "auto")

_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def canonical(value: object, field: str, valid: tuple[str, ...]) -> str:
    """``value`` as one of the ``valid`` names (dtype aliases such as ``fp16`` and torch dtypes accepted); anything
    else raises a :class:`ConfigError` naming ``field`` and the choices."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if not isinstance(value, str):
        raise ConfigError(f"{field}={value!r}: expected one of {', '.join(valid)}")
    name = _ALIASES.get(value.lower(), value.lower())
    if name not in valid:
        raise ConfigError(f"{field}={value!r} is not valid; expected one of {', '.join(valid)}")
    return name


def check_choice(field: str, value: object, valid: tuple[str, ...]) -> None:
    """Raise a :class:`ConfigError` naming ``field`` unless ``value`` is exactly one of ``valid``."""
    if value not in valid:
        raise ConfigError(f"{field}={value!r}: expected one of {', '.join(valid)}")


def dtype_name(dtype: torch.dtype) -> str:
    """Short name used in policy labels: fp32, fp16, bf16."""
    return _SHORT[dtype]


def full_name(dtype: torch.dtype) -> str:
    """``float32``, ``float16`` or ``bfloat16``: the name options and files use."""
    return str(dtype).removeprefix("torch.")


class LayerDtypes(NamedTuple):
    """The dtypes one transformer layer runs in: under a plain policy every layer's, under a precision plan its own."""

    compute: torch.dtype  # weights, activations and residual add
    attn: torch.dtype  # q/k/v at the fused kernel
    kv_cache: torch.dtype  # this layer's cached keys/values
