"""A weights-only certificate that q/k/v cannot overflow float16, for any input.

Each layer's q/k/v projections read the output of a norm, ``y = gamma * xhat + beta`` with ``||xhat||_2 <= sqrt(d)``
(a LayerNorm or RMSNorm output has unit mean square). So for projection row ``i``::

    |q_i| = |(W_i * gamma) . xhat + (W_i . beta + b_i)| <= sqrt(d) * ||W_i * gamma||_2 + |W_i . beta + b_i|

by Cauchy-Schwarz. If every row's bound sits below the float16 maximum with a margin, the cast at the attention
boundary cannot overflow; the fused kernel then keeps QK^T and softmax statistics in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyprec.dtypes import FP16_MAX
from hyprec.models.base import AttentionInputs

SAFETY_MARGIN = 2.0  # a worst-case bound needs little margin: only the fp32 round-off of the projection


@dataclass
class LayerBound:
    layer: str
    bound: float  # worst-case max |q|, |k| or |v| over all inputs


def norm_affine(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 per-channel gain and bias a norm applies to its normalised input (bias None for RMSNorm)."""
    gain = norm.gain() if hasattr(norm, "gain") else norm.weight.detach().float()
    bias = getattr(norm, "bias", None)
    return gain.detach().float(), None if bias is None else bias.detach().float()


def _projection_rows(proj: torch.nn.Linear, gain: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Worst-case |output| of each projection row over all unit-mean-square norm outputs."""
    w = proj.weight.detach().float()
    row = (w * gain).norm(dim=1) * gain.numel() ** 0.5
    offset = torch.zeros_like(row)
    if shift is not None:
        offset += w @ shift
    if proj.bias is not None:
        offset += proj.bias.detach().float()
    return row + offset.abs()


def _after_qk_transforms(rows: torch.Tensor, item: AttentionInputs, which: int) -> torch.Tensor:
    """Per-element bounds of q (which=0) or k (which=1) after the per-head RMSNorm and RoPE, if the model has them.

    A per-head RMSNorm output has unit mean square, so ``|x_i| <= sqrt(head_dim) * |gain_i|`` whatever came in.
    RoPE rotates element pairs (i, i + head_dim/2), so each output element is bounded by the pair's norm.
    """
    if item.head_dim is None:
        return rows
    heads = rows.reshape(-1, item.head_dim)
    if item.qk_norms is not None:
        gain = item.qk_norms[which].gain().detach().float().abs()
        heads = (gain * item.head_dim**0.5).expand_as(heads)
    if item.rotary:
        half = item.head_dim // 2
        pair = torch.sqrt(heads[:, :half] ** 2 + heads[:, half : 2 * half] ** 2)
        heads = torch.cat([pair, pair, heads[:, 2 * half :]], dim=1)
    return heads.reshape(-1)


@torch.no_grad()
def attention_input_bounds(model: torch.nn.Module) -> list[LayerBound]:
    """Per layer, the largest |q|, |k| or |v| any input can produce (from the weights alone)."""
    bounds = []
    for item in model.attention_inputs():
        gain, shift = norm_affine(item.norm)
        rows = [_projection_rows(p, gain, shift) for p in item.projections]
        rows = [_after_qk_transforms(r, item, i) if i < 2 else r for i, r in enumerate(rows)]
        bounds.append(LayerBound(item.layer, max(float(r.max()) for r in rows)))
    return bounds


def fp16_attention_check(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether float16 attention inputs are certified safe, and the evidence (the tightest layer)."""
    bounds = attention_input_bounds(model)
    worst = max(bounds, key=lambda b: b.bound)
    limit = FP16_MAX / SAFETY_MARGIN
    if worst.bound <= limit:
        return True, f"q/k/v bound {worst.bound:.4g} <= {limit:.4g} in every layer (worst {worst.layer})"
    return (
        False,
        f"q/k/v bound {worst.bound:.4g} at {worst.layer} exceeds {limit:.4g}, float16 could overflow",
    )
