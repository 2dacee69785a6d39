"""Building a model under a dtype policy: the one place that ties policy resolution to weight loading."""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.dtype_policy import DtypePolicy, plan_policy, resolve_matmul, resolve_policy
from hyprec.errors import ConfigError
from hyprec.hardware import gemm_profile, kernel_profile, linear_shapes
from hyprec.layers.linear import Linear, set_matmul_precision
from hyprec.layers.quantized import FORMATS, StoredEmbedding, StoredLinear, StoredWeight, stored_weight
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
    """``model`` computing from the checkpoint's stored blocks (:mod:`hyprec.layers.quantized`) where ``requested``
    (``auto``/``stored``) allows it and it applies: every linear layer and embedding table the checkpoint stores in a
    format the kernels read (:data:`~hyprec.layers.quantized.FORMATS`) becomes a :class:`StoredLinear` /
    :class:`StoredEmbedding`, and its float32 weight is freed; a decoder's output head is the stored table too. It
    applies to float32 compute without a precision plan (which rescales or casts weights) on the CPU.
    ``weights='stored'`` where it does not apply is an error that says why."""
    if requested == "float32":
        return model, replace(policy, weights="float32")
    why_not = _why_not_stored(model, policy, checkpoint)
    stored = {} if why_not else _stored_weights(model, checkpoint)
    if not stored:
        why_not = why_not or "the checkpoint stores no layer weights in a block format the kernels read"
        if requested == "stored":
            raise ConfigError(f"weights='stored' does not apply here: {why_not}; use weights='auto' or 'float32'")
        return model, replace(policy, weights="float32")
    dense_bytes = 0
    for name, weight in stored.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, attr)
        dense_bytes += old.weight.nbytes
        if isinstance(old, nn.Embedding):
            setattr(owner, attr, StoredEmbedding(weight))
        else:
            setattr(owner, attr, StoredLinear(weight, old.bias, old.activation))
    head_module = getattr(model, "head_weight_name", "").removesuffix(".weight")
    if head_module in stored:
        model.stored_head = stored[head_module]
    formats = Counter(w.format for w in stored.values())
    listed = ", ".join(f"{count} {name}" for name, count in formats.most_common())
    stored_bytes = sum(w.nbytes for w in stored.values())
    return model, replace(
        policy,
        weights="stored",
        reason=f"{policy.reason}; weights kept as the checkpoint stores them ({listed}: {stored_bytes / 2**20:.0f} MiB "
        f"where float32 takes {dense_bytes / 2**20:.0f} MiB)",
    )


def _why_not_stored(model: nn.Module, policy: DtypePolicy, checkpoint: WeightSource) -> str | None:
    """Why the model cannot compute from stored blocks under ``policy`` (None: it can)."""
    if not hasattr(checkpoint, "stored"):
        return "the checkpoint stores no weights in blocks (a GGUF file does)"
    if policy.plan is not None or policy.compute_dtype != torch.float32:
        return f"the policy computes the weights in {policy.mode}"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the stored-format kernels run on the CPU, not {device}"
    return None


def _stored_weights(model: nn.Module, checkpoint: WeightSource) -> dict[str, StoredWeight]:
    """Module name -> its weight as the checkpoint stores it, for every :class:`Linear` and embedding table stored
    in a format the kernels read. (Decoder module names are the checkpoint's HF names.)"""
    names = set(checkpoint.names())
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, nn.Embedding)) or f"{name}.weight" not in names:
            continue
        entry = checkpoint.stored(f"{name}.weight")
        if entry is None or entry[0] not in FORMATS:
            continue
        try:
            weight = stored_weight(entry[0], entry[1], module.weight.shape[1])
        except ValueError:  # a width the kernels cannot sum (an F16 row of 8k + 4 values): stays float32
            continue
        if weight.shape == tuple(module.weight.shape):
            found[name] = weight
    return found


def model_summary(name: str, config: ModelConfig, model: nn.Module, checkpoint_dtype: torch.dtype) -> dict[str, Any]:
    """The architecture and size fields every engine's ``info()`` starts with."""
    stored = {id(m.stored): m.stored for m in model.modules() if isinstance(m, (StoredLinear, StoredEmbedding))}
    stored = stored.values()
    return {
        "model": name,
        "architecture": ", ".join(config.architectures) or config.model_type,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()) + sum(math.prod(w.shape) for w in stored),
        # resident weight memory: parameters, buffers, and blocks kept as stored
        "weight_memory_mib": round(
            (sum(t.nbytes for t in (*model.parameters(), *model.buffers())) + sum(w.nbytes for w in stored)) / 2**20, 1
        ),
        "hidden_size": config.get("hidden_size"),
        "num_layers": config.get("num_hidden_layers"),
        "num_heads": config.get("num_attention_heads"),
        "vocab_size": config.get("vocab_size"),
        "checkpoint_dtype": str(checkpoint_dtype).removeprefix("torch."),
    }
