"""Float32 linear layers on oneDNN, with prepacked weights and the activation fused into the GEMM.

PyTorch's CPU ``F.linear`` in float32 calls MKL's ``sgemm``. oneDNN (which PyTorch also links, for its fused CPU
kernels) JIT-compiles a GEMM for the CPU it runs on and reads the weight from a layout blocked for that kernel
("prepacked" once at load). Measured with torch 2.13 on an AMD Zen 4 (2 threads): 1.13-1.23x MKL's speed at encoder
shapes (256-2048 rows x 384-1536), 1.8x at one row; both compute in float32 with float32 accumulation, so results
agree to float32 roundoff (the order of the sums differs). Which library is faster depends on the CPU, so the engine
asks the kernel probe (:mod:`hyprec.hardware`) and uses oneDNN only where it measured it faster.

The GEMM can apply an elementwise activation to its output tile while it is still in cache ("post-op"), saving a
pass over the FFN intermediate (the largest activation of an encoder layer): the GELU of BERT-style FFNs measured
~6% of MiniLM's time as a separate op. oneDNN's GELU (erf or tanh form), ReLU, SiLU and tanh agree with
PyTorch's to float32 roundoff.

These are the operators PyTorch's own compiler (inductor) emits for CPU linear layers
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``); they are private, so their presence is checked
(:func:`available`) and every caller has the plain ``F.linear`` path.
"""

from __future__ import annotations

import functools

import torch

#: Hugging Face ``hidden_act`` names -> oneDNN post-op (attribute, algorithm); other activations run unfused.
POST_OPS: dict[str, tuple[str, str]] = {
    "gelu": ("gelu", "none"),
    "gelu_python": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "swish": ("swish", ""),
    "tanh": ("tanh", ""),
}
#: Row count the weight layout is packed for. Measured (Zen 4, torch 2.13): a layout packed for 1,024 rows ran as
#: fast as one packed for the exact row count at 1 to 2,048 rows, so one packed copy serves every batch.
PACK_ROWS = 1024


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has oneDNN and the operators used here."""
    ops = torch.ops.mkldnn
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` (float32, CPU) in oneDNN's blocked layout: an opaque tensor only :func:`linear` reads.
    It is a copy, so it must be packed again after the weight changes (:class:`hyprec.layers.linear.Linear` does)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """``activation(x @ W.T + bias)`` for float32 ``x [..., in]``; ``activation`` a key of :data:`POST_OPS` or
    None."""
    attr, algorithm = POST_OPS[activation] if activation is not None else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)
