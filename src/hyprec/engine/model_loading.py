"""Building a model under a dtype policy: the one place that ties policy resolution to weight loading."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.dtype_policy import DtypePolicy, plan_policy, resolve_matmul, resolve_policy
from hyprec.hardware import gemm_profile, kernel_profile, linear_shapes
from hyprec.layers.linear import set_matmul_precision
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
    emulation keeps ``F.linear``).
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
            return plan.apply(build(torch.float32), emulated=emulated), policy
        return _with_matmul(plan.apply(build(torch.float32)), policy, matmul, device, generative)
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
        return emulate(build(torch.float32), policy), policy
    return _with_matmul(build(policy.compute_dtype), policy, matmul, device, generative)


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
