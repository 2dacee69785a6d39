"""Building a model under a dtype policy: the one place that ties policy resolution to weight loading."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.dtype_policy import DtypePolicy, plan_policy, resolve_matmul, resolve_policy
from hyprec.errors import ConfigError
from hyprec.hardware import gemm_profile, kernel_profile, linear_shapes
from hyprec.layers.linear import set_matmul_precision
from hyprec.layers.quantized import Q8_0Weight
from hyprec.loading.weights import WeightSource, load_weights
from hyprec.precision.attention_bounds import fp16_attention_check
from hyprec.precision.emulation import emulate, emulated_formats
from hyprec.precision.plan import PrecisionPlan


# Weights are ordinary tensors even when a guard fallback reloads them inside an inference-mode forward pass: layers
# that keep a prepared copy of a weight (packed, split) key it by the weight's version counter, which inference
# tensors do not have.
@torch.inference_mode(False)
@torch.no_grad()
def load_model(
    cls: type[nn.Module],
    config: ModelConfig,
    checkpoint: WeightSource,
    *,
    dtype: str,
    attn_dtype: str,
    kv_cache_dtype: str,
    device: torch.device,
    checkpoint_dtype: torch.dtype,
    plan: PrecisionPlan | None = None,
    half_arithmetic: str = "native",
    matmul_precision: str = "auto",
    float32_gemm: str = "auto",
    weights: str = "auto",
    generative: bool = False,
) -> tuple[nn.Module, DtypePolicy]:
    """Resolve the dtype policy and load the model in its compute dtype.

    ``attn_dtype='auto'`` in hybrid mode needs the weights (a weight-only bound decides whether float16 is safe) and
    the device's measured kernel speeds (which format is fast), so the float32 model is built lazily for that check
    and reused when hybrid is the answer. A precision ``plan`` is
    applied to the float32 build (it checks that it was made for these weights). Half formats that
    ``half_arithmetic`` (:data:`hyprec.config.HALF_ARITHMETIC`) emulates stay float32 and are rounded to instead
    (:mod:`hyprec.precision.emulation`). Float32 linear layers then multiply at
    ``matmul_precision``, their float32 GEMMs on ``float32_gemm`` (:func:`hyprec.dtype_policy.resolve_matmul`;
    emulation keeps ``F.linear``). Weights the checkpoint stores in a block format stay packed where ``weights``
    (:data:`hyprec.dtype_policy.WEIGHTS`) allows and the policy computes them in float32 (:func:`_with_stored_weights`).
    """
    matmul = (matmul_precision, float32_gemm)

    @functools.cache
    def build(compute_dtype: torch.dtype) -> nn.Module:
        with torch.device("meta"):
            model = cls(config)
        load_weights(
            model,
            checkpoint,
            compute_dtype=compute_dtype,
            device=device,
            prefixes=model.checkpoint_prefixes,
            ignored=model.ignored_weights,
        )
        return model.eval().requires_grad_(False)  # inference only; also keeps .item() and float() quiet

    if plan is not None:
        policy = plan_policy(plan, dtype, attn_dtype, kv_cache_dtype)
        emulated = emulated_formats(half_arithmetic, policy, device)
        if emulated:
            model = plan.apply(build(torch.float32), emulated=emulated)
        else:
            model, policy = _with_matmul(plan.apply(build(torch.float32)), policy, matmul, device, generative)
        return _with_stored_weights(model, policy, checkpoint, weights)
    policy = resolve_policy(
        dtype,
        attn_dtype,
        kv_cache_dtype,
        checkpoint_dtype=checkpoint_dtype,
        checkpoint_storage=checkpoint.storage(),
        fp16_attention_safe=lambda: fp16_attention_check(build(torch.float32)),
        kernel_speeds=lambda: kernel_profile(device.type),
    )
    if emulated_formats(half_arithmetic, policy, device):  # a policy without a plan has one half format
        return _with_stored_weights(emulate(build(torch.float32), policy), policy, checkpoint, weights)
    model, policy = _with_matmul(build(policy.compute_dtype), policy, matmul, device, generative)
    return _with_stored_weights(model, policy, checkpoint, weights)


def _with_matmul(
    model: nn.Module, policy: DtypePolicy, requested: tuple[str, str], device: torch.device, generative: bool
) -> tuple[nn.Module, DtypePolicy]:
    """``model`` with its float32 linear layers set to the resolved ``(matmul_precision, float32_gemm)``."""
    precision, gemm = requested
    policy = resolve_matmul(
        policy,
        precision,
        float32_gemm=gemm,
        device=device,
        generative=generative,
        gemm_speeds=lambda: gemm_profile(linear_shapes(model), device.type),
    )
    set_matmul_precision(model, policy.matmul, policy.float32_gemm)
    return model, policy


def _with_stored_weights(
    model: nn.Module, policy: DtypePolicy, checkpoint: WeightSource, requested: str
) -> tuple[nn.Module, DtypePolicy]:
    """``model`` computing its output head from the checkpoint's stored Q8_0 blocks (:mod:`hyprec.layers.quantized`)
    where ``requested`` (``auto``/``stored``) allows it and it applies: a decoder whose head the checkpoint stores as
    Q8_0, computed in float32 (no precision plan, which may rescale or cast the head), on the CPU. ``weights='stored'``
    where it does not apply is an error that says why. The float32 table stays loaded: the embedding lookup, the
    precision tools and a guard fallback read it."""
    if requested == "float32":
        return model, replace(policy, weights="float32")
    head, why_not = _stored_head(model, policy, checkpoint)
    if head is None:
        if requested == "stored":
            raise ConfigError(f"weights='stored' does not apply here: {why_not}; use weights='auto' or 'float32'")
        return model, replace(policy, weights="float32")
    model.stored_head = head
    return model, replace(
        policy,
        weights="stored: head Q8_0",
        reason=f"{policy.reason}; output head from the checkpoint's Q8_0 blocks ({head.nbytes / 2**20:.0f} MiB)",
    )


def _stored_head(model: nn.Module, policy: DtypePolicy, checkpoint: WeightSource) -> tuple[Q8_0Weight | None, str]:
    """The model's output head as the checkpoint stores it, or None and why not. The cheap conditions come first:
    reading the blocks of Gemma's head takes ~0.5 s, spent only where they will be used."""
    head_name = getattr(model, "head_weight_name", None)
    read_q8_0 = getattr(checkpoint, "q8_0", None)
    if head_name is None or read_q8_0 is None:
        return None, "the checkpoint stores no Q8_0 output head (a GGUF file with one)"
    if policy.plan is not None or policy.compute_dtype != torch.float32:
        return None, f"the policy computes the head in {policy.mode}"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return None, f"the stored-format kernels run on the CPU, not {device}"
    blocks = read_q8_0(head_name)
    if blocks is None:
        return None, "the checkpoint stores no Q8_0 output head (a GGUF file with one)"
    return Q8_0Weight(*blocks), ""


def model_summary(name: str, config: ModelConfig, model: nn.Module, checkpoint_dtype: torch.dtype) -> dict[str, Any]:
    """The architecture and size fields every engine's ``info()`` starts with."""
    return {
        "model": name,
        "architecture": ", ".join(config.architectures) or config.model_type,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": config.get("hidden_size"),
        "num_layers": config.get("num_hidden_layers"),
        "num_heads": config.get("num_attention_heads"),
        "vocab_size": config.get("vocab_size"),
        "checkpoint_dtype": str(checkpoint_dtype).removeprefix("torch."),
    }
