"""Applying a precision plan to a model: exact rescaling, then casts at the declared plan points.

A plan (:mod:`hyprec.precision.plan`) is data; this is the one place that changes a model's dtypes by it. A layer's
input is cast to the layer's dtype as it enters, and each attention module gets the layer's attention dtype; norms
stay float32 (:class:`~hyprec.layers.norm.Float32Params`).
"""

from __future__ import annotations

import torch
from torch import nn

from hyprec.dtypes import LayerDtypes
from hyprec.layers.attention import Attention
from hyprec.layers.norm import Float32Params
from hyprec.precision.emulation import emulate
from hyprec.precision.plan import PrecisionPlan
from hyprec.precision.policy import plan_policy
from hyprec.precision.rescale import rescale_ffn, rescale_residual


def apply_plan(plan: PrecisionPlan, model: nn.Module, *, emulated: frozenset[torch.dtype] = frozenset()) -> nn.Module:
    """Rescale and cast a freshly built float32 ``model`` in place according to ``plan``; returns it. The half
    formats in ``emulated`` stay float32 and are rounded to instead (:mod:`hyprec.precision.emulation`)."""
    plan.check_model(model)
    rescale_residual(model, plan.residual_scale_log2)
    for i, k in enumerate(plan.ffn_scale_log2):
        rescale_ffn(model, i, k)

    def native(dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype in emulated else dtype

    for module in model.edge_modules():
        _cast_weights(module, native(plan.edges_dtype))
    for block, layer in zip(model.blocks(), plan.layers, strict=True):
        linear = native(layer.compute)
        _cast_weights(block, linear)
        block.register_forward_pre_hook(_cast_input(linear))
    set_attention_dtypes(model, plan.layers, emulated)
    return emulate(model, plan_policy(plan), emulated) if emulated else model


def set_attention_dtypes(
    model: nn.Module, layers: list[LayerDtypes], emulated: frozenset[torch.dtype] = frozenset()
) -> None:
    """Give each layer's attention modules the dtype q/k/v enter its kernel in: the one route of a policy's attention
    dtype to the kernel. An emulated half format runs the kernel in float32 on rounded inputs
    (:mod:`hyprec.precision.emulation`)."""
    for block, dtypes in zip(model.blocks(), layers, strict=True):
        for attn in block.modules():
            if isinstance(attn, Attention):
                attn.attn_dtype = torch.float32 if dtypes.attn in emulated else dtypes.attn


def _cast_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters of ``module`` and its children, except float32-only modules (norms)."""
    for sub in module.modules():
        if isinstance(sub, Float32Params):
            continue
        for name, param in sub.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(sub, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))


def _cast_input(dtype: torch.dtype):
    """A plan point: the hidden state entering a layer is cast to the layer's dtype."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].to(dtype), *args[1:])

    return hook
