"""Rotary position embeddings (the "rotate half" / NeoX layout Hugging Face models use), in float32.

Angles are computed in float32 from integer positions and applied to float32 q/k before they are cast for the
attention kernel: half-precision angles at positions in the thousands would lose most of their digits.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from torch import nn

from hyprec.errors import UnsupportedArchitectureError


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths slowed by ``factor``, short ones kept."""
    factor = params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to packed q ``[N, H, D]`` and k ``[N, Hkv, D]`` at integer ``positions`` ``[N]``.

    Args:
        head_dim: rotated size (the whole head).
        base: ``rope_theta``.
        params: Hugging Face ``rope_parameters`` / ``rope_scaling``: ``rope_type`` default, linear or llama3.
    """

    def __init__(self, head_dim: int, base: float, params: dict[str, Any] | None = None):
        super().__init__()
        params = params or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        # float32, as transformers computes it: the checkpoints were trained with exactly these frequencies.
        # Explicit CPU device: models are constructed under the meta device, but these are computed, not loaded.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
        if rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        elif rope_type != "default":
            raise UnsupportedArchitectureError(
                f"rope_type={rope_type!r} is not supported; expected default, linear or llama3"
            )
        self.inv_freq = inv_freq
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def shared(cls, head_dim: int, base: float, params: dict[str, Any] | None = None) -> RotaryEmbedding:
        """One instance per set of arguments, so that every layer of a kind reuses the cos/sin of a step."""
        return _shared(head_dim, base, json.dumps(params or {}, sort_keys=True))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[N, 1, D]`` at ``positions``; a forward pass hands every layer the same positions tensor,
        so they are computed once per pass (and per rotary kind), not once per layer."""
        last = self._last  # one read: the tuple is replaced whole, never mutated
        if last is not None and last[0] is positions:
            return last[1], last[2]
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D]
        cos, sin = emb.cos(), emb.sin()
        self._last = (positions, cos, sin)
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


@functools.cache
def _shared(head_dim: int, base: float, params_json: str) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, base, json.loads(params_json))
