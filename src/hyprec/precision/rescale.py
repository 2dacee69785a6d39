"""Exact power-of-two rescaling: make activations fit float16 without changing what the model computes.

Two rewrites, both exact in floating point because multiplying by a power of two only moves the exponent (as long
as nothing under- or overflows):

* **Residual stream** (pre-norm decoders). A norm reading the stream gives the same output when its input is scaled
  by ``s``, provided its ``eps`` is scaled by ``s**2``. So the stream can be multiplied by ``s = 2**k``: the
  embedding (its table, or its output scale when the table is tied to the output head) and every module writing
  to the stream (output projections, or Gemma's post-norm gains) are multiplied by ``s``, the norms reading it
  get ``eps * s**2``, and every float32 output is unchanged.
* **Gated FFN intermediate**. ``down(act(gate(x)) * up(x))`` is linear in ``up``: dividing ``up`` by ``2**k`` and
  multiplying ``down``'s weight by ``2**k`` shrinks the intermediate and leaves the output unchanged.

Post-norm encoders (BERT) have no rescalable stream: each layer normalises right after the residual add.
"""

from __future__ import annotations

import torch
from torch import nn

from hyprec.errors import UnsupportedArchitectureError
from hyprec.layers.norm import LayerNorm, RMSNorm


@torch.no_grad()
def _scale_output(module: nn.Module, factor: float) -> None:
    """Multiply what ``module`` outputs by ``factor`` by folding it into its weights."""
    if isinstance(module, RMSNorm):
        # Fold the (1 + w) offset into the stored gain first: (gain * s) - 1 would round, gain * s does not.
        module.weight.copy_(module.gain() * factor)
        module.offset = 0.0
    elif isinstance(module, (nn.Linear, LayerNorm)):
        module.weight.mul_(factor)
        if module.bias is not None:
            module.bias.mul_(factor)
    else:
        raise UnsupportedArchitectureError(f"cannot rescale the output of {type(module).__name__}")


def _scale_input(norm: nn.Module, factor: float) -> None:
    """A norm whose input is multiplied by ``factor`` keeps its output when eps is multiplied by ``factor**2``."""
    if not isinstance(norm, (RMSNorm, LayerNorm)):
        raise UnsupportedArchitectureError(f"cannot rescale the input of {type(norm).__name__}")
    norm.eps = norm.eps * factor * factor


def rescale_residual(model: nn.Module, log2_scale: int) -> None:
    """Multiply the residual stream of ``model`` by ``2**log2_scale`` in place (float32 outputs unchanged)."""
    if log2_scale == 0:
        return
    stream = model.residual_stream()
    if stream is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} normalises after every residual add (post-norm): its residual stream cannot "
            "be rescaled"
        )
    factor = 2.0**log2_scale
    if stream.table is not None:
        with torch.no_grad():
            stream.table.weight.mul_(factor)
    else:  # tied to the output head: scale the embedding output instead
        stream.embedding.embed_scale = stream.embedding.embed_scale * factor
    for module in stream.writers:
        _scale_output(module, factor)
    for norm in stream.readers:
        _scale_input(norm, factor)


@torch.no_grad()
def rescale_ffn(model: nn.Module, layer: int, log2_scale: int) -> None:
    """Multiply the FFN intermediate of ``layer`` by ``2**log2_scale`` in place (the layer's output unchanged)."""
    if log2_scale == 0:
        return
    block = model.blocks()[layer]
    up = model.ffn_up(block)
    if up is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} layer {layer}: the FFN intermediate is not linear in any projection "
            "(no gated MLP), so it cannot be rescaled exactly"
        )
    _scale_output(up, 2.0**log2_scale)
    model.ffn_down(block).weight.mul_(2.0**-log2_scale)  # its bias is added after the product: unchanged
