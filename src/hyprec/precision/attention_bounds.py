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

from hyprec.models.base import EncoderModel

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
SAFETY_MARGIN = 2.0  # a worst-case bound needs little margin: only the fp32 round-off of the projection


@dataclass
class LayerBound:
    layer: str
    bound: float  # worst-case max |q|, |k| or |v| over all inputs


def _norm_affine(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    gain = norm.weight.detach().float()
    bias = getattr(norm, "bias", None)
    return gain, None if bias is None else bias.detach().float()


@torch.no_grad()
def attention_input_bounds(model: EncoderModel) -> list[LayerBound]:
    """Per layer, the largest |q|, |k| or |v| any input can produce (from the weights alone)."""
    bounds = []
    for item in model.attention_inputs():
        gain, shift = _norm_affine(item.norm)
        d = gain.numel()
        worst = 0.0
        for proj in item.projections:
            w = proj.weight.detach().float()
            row = (w * gain).norm(dim=1) * d**0.5
            offset = torch.zeros_like(row)
            if shift is not None:
                offset += w @ shift
            if proj.bias is not None:
                offset += proj.bias.detach().float()
            worst = max(worst, float((row + offset.abs()).max()))
        bounds.append(LayerBound(item.layer, worst))
    return bounds


def fp16_attention_check(model: EncoderModel) -> tuple[bool, str]:
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
