"""Normalisation layers. They always compute in float32 and keep float32 parameters, whatever the policy:
mean/variance of a half-precision row lose digits quickly, and norm gains can be large (numerics notes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Float32Params:
    """Marker: the weight loader keeps this module's parameters in float32 under every dtype policy."""


class LayerNorm(nn.LayerNorm, Float32Params):
    """``nn.LayerNorm`` computed in float32; the result is returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Float32Embedding(nn.Embedding, Float32Params):
    """An embedding table that stays float32 (used for position biases, which are part of the positions)."""


class RMSNorm(nn.Module, Float32Params):
    """Root-mean-square norm computed in float32, returned in the input's dtype.

    Args:
        dim: normalised size.
        eps: added to the mean square.
        offset: added to the stored gain: 0 for Llama-style ``weight * x``, 1 for Gemma's ``(1 + weight) * x``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))
        self.eps = eps
        self.offset = offset

    def gain(self) -> torch.Tensor:
        """The effective per-channel gain (used by weight-only overflow bounds)."""
        return self.weight.float() + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.gain()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
