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
