"""Building a model under a dtype policy: the one place that ties policy resolution to weight loading."""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.errors import ConfigError
from hyprec.hardware import kernel_profile
from hyprec.layers.gemm_probe import gemm_profile, linear_shapes
from hyprec.layers.linear import Linear, set_matmul_precision
from hyprec.layers.quantized import FORMATS, StoredEmbedding, StoredLinear, stored_weight
from hyprec.loading.weights import WeightSource, load_weights
from hyprec.precision.attention_bounds import fp16_attention_check
from hyprec.precision.casting import apply_plan, set_attention_dtypes
from hyprec.precision.emulation import emulate, emulated_formats
from hyprec.precision.plan import PrecisionPlan
from hyprec.precision.policy import DtypePolicy, plan_policy, resolve_matmul, resolve_policy


# Weights are ordinary tensors even when a guard fallback reloads them inside an inference-mode forward pass: layers
# that keep a prepared copy of a weight (packed, split) key it by the weight's version counter, which inference
# tensors do not have.
@dataclass(frozen=True)
class PolicyRequest:
    """The dtype names a user asked for (resolved at load), and a precision plan that sets them per layer."""

    dtype: str = "auto"
    attn_dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    plan: PrecisionPlan | None = None


@torch.inference_mode(False)
@torch.no_grad()
def load_model(
    cls: type[nn.Module],
    config: ModelConfig,
    checkpoint: WeightSource,
    request: PolicyRequest | DtypePolicy,
    *,
    device: torch.device,
    checkpoint_dtype: torch.dtype,
    half_arithmetic: str = "native",
    matmul_precision: str = "auto",
    float32_gemm: str = "auto",
    weights: str = "auto",
    generative: bool = False,
) -> tuple[nn.Module, DtypePolicy]:
    """Resolve the dtype policy ``request`` asks for (or take an already resolved one) and load the model in it.

    ``attn_dtype='auto'`` in hybrid mode needs the weights (a weight-only bound decides whether float16 is safe) and
    the device's measured kernel speeds (which format is fast), so the float32 model is built lazily for that check
    and reused when hybrid is the answer. A precision ``plan`` is
    applied to the float32 build (it checks that it was made for these weights). Half formats that
    ``half_arithmetic`` (:data:`hyprec.config.HALF_ARITHMETIC`) emulates stay float32 and are rounded to instead
    (:mod:`hyprec.precision.emulation`). Float32 linear layers then multiply at
    ``matmul_precision``, their float32 GEMMs on ``float32_gemm`` (:func:`hyprec.precision.policy.resolve_matmul`;
    emulation keeps ``F.linear``). Weights the checkpoint stores in a block format stay packed where ``weights``
    (:data:`hyprec.dtypes.WEIGHTS`) allows and the policy computes them in float32 (:func:`_with_stored_weights`).
    """
    matmul = (matmul_precision, float32_gemm)

    @functools.cache
    def build(compute_dtype: torch.dtype, stored: bool = False) -> nn.Module:
        """The model in ``compute_dtype``; ``stored``: its block-format weights as the checkpoint stores them (never
        dequantised to float32: faster to load, a quarter of the memory)."""
        with torch.device("meta"):
            model = cls(config)
        kept = _keep_stored(model, checkpoint) if stored else []
        load_weights(
            model,
            checkpoint,
            compute_dtype=compute_dtype,
            device=device,
            prefixes=model.checkpoint_prefixes,
            ignored=(*model.ignored_weights, *kept),
        )
        return model.eval().requires_grad_(False)  # inference only; also keeps .item() and float() quiet

    policy: DtypePolicy | None = None
    if isinstance(request, DtypePolicy):
        policy = request
    elif request.plan is not None:
        policy = plan_policy(request.plan, request.dtype, request.attn_dtype, request.kv_cache_dtype)
    plan = policy.plan if policy is not None else None
    if plan is not None:
        _check_stored_request(weights, _why_not_stored(policy, checkpoint, device))
        emulated = emulated_formats(half_arithmetic, policy, device)
        if emulated:
            model = apply_plan(plan, build(torch.float32, False), emulated=emulated)
        else:
            model = apply_plan(plan, build(torch.float32, False))
            model, policy = _with_matmul(model, policy, matmul, device, generative)
        return _with_stored_weights(model, policy, weights)
    # Whether float32 compute would keep blocks stored: the weight-only bound of the policy decision reads q/k/v
    # through the stored layers (dequantised on demand) rather than from a float32 build of its own.
    maybe_stored = weights != "float32" and _why_not_stored(None, checkpoint, device) is None
    if policy is None:
        policy = resolve_policy(
            request.dtype,
            request.attn_dtype,
            request.kv_cache_dtype,
            checkpoint_dtype=checkpoint_dtype,
            checkpoint_storage=checkpoint.storage(),
            fp16_attention_safe=lambda: fp16_attention_check(build(torch.float32, maybe_stored)),
            kernel_speeds=lambda: kernel_profile(device.type),
        )
    why_not = "weights='float32'" if weights == "float32" else _why_not_stored(policy, checkpoint, device)
    _check_stored_request(weights, why_not)
    stored = why_not is None
    emulated = emulated_formats(half_arithmetic, policy, device)  # a policy without a plan has one half format
    if emulated:
        model = emulate(build(torch.float32, stored), policy)
    else:
        model, policy = _with_matmul(build(policy.compute_dtype, stored), policy, matmul, device, generative)
    set_attention_dtypes(model, policy.layer_dtypes(len(model.blocks())), emulated)
    return _with_stored_weights(model, policy, weights)


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


def _check_stored_request(requested: str, why_not: str | None) -> None:
    if requested == "stored" and why_not is not None:
        raise ConfigError(f"weights='stored' does not apply here: {why_not}; use weights='auto' or 'float32'")


def _why_not_stored(policy: DtypePolicy | None, checkpoint: WeightSource, device: torch.device) -> str | None:
    """Why the model cannot compute from stored blocks (None: it can): they exist in GGUF files only, the kernels run
    on the CPU, and the policy must compute the weights in float32 without a precision plan (which rescales or casts
    them). ``policy`` None: the checkpoint and device alone."""
    if not hasattr(checkpoint, "stored"):
        return "the checkpoint stores no weights in blocks (a GGUF file does)"
    if device.type != "cpu":
        return f"the stored-format kernels run on the CPU, not {device}"
    if policy is not None and (policy.plan is not None or policy.compute_dtype != torch.float32):
        return f"the policy computes the weights in {policy.mode}"
    return None


def _keep_stored(model: nn.Module, checkpoint: WeightSource) -> list[str]:
    """Replace every :class:`Linear` and embedding table of a meta-device ``model`` that the checkpoint stores in a
    format the kernels read (:data:`~hyprec.layers.quantized.FORMATS`) by a :class:`StoredLinear` /
    :class:`StoredEmbedding` over its blocks, and return the checkpoint names of those weights (loaded here, not by
    :func:`load_weights`). Decoder module names are the checkpoint's HF names."""
    names = set(checkpoint.names())
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (Linear, nn.Embedding)) and f"{name}.weight" in names:
            found.append((name, module))
    kept = []
    for name, module in found:
        entry = checkpoint.stored(f"{name}.weight")
        if entry is None or entry[0] not in FORMATS:
            continue
        try:
            weight = stored_weight(entry[0], entry[1], module.weight.shape[1])
        except ValueError:  # a width the kernels cannot sum (an F16 row of 8k + 4 values): stays float32
            continue
        if weight.shape != tuple(module.weight.shape):
            continue  # load_weights reports the mismatch
        parent, _, attr = name.rpartition(".")
        if isinstance(module, nn.Embedding):
            replacement = StoredEmbedding(weight)
        else:
            replacement = StoredLinear(weight, module.bias, module.activation)
        setattr(model.get_submodule(parent), attr, replacement)
        kept.append(f"{name}.weight")
    return kept


def _with_stored_weights(model: nn.Module, policy: DtypePolicy, requested: str) -> tuple[nn.Module, DtypePolicy]:
    """``policy`` saying which weights ``model`` keeps as stored; ``weights='stored'`` on a checkpoint with no
    block-format layer weights is an error."""
    stored = {name: m.stored for name, m in model.named_modules() if isinstance(m, (StoredLinear, StoredEmbedding))}
    if not stored:
        _check_stored_request(requested, "the checkpoint stores no layer weights in a block format the kernels read")
        return model, replace(policy, weights="float32")
    formats = Counter(w.format for w in stored.values())
    listed = ", ".join(f"{count} {name}" for name, count in formats.most_common())
    stored_mib = sum(w.nbytes for w in stored.values()) / 2**20
    dense_mib = sum(math.prod(w.shape) * 4 for w in stored.values()) / 2**20
    return model, replace(
        policy,
        weights="stored",
        reason=f"{policy.reason}; weights kept as the checkpoint stores them ({listed}: {stored_mib:.0f} MiB "
        f"where float32 takes {dense_mib:.0f} MiB)",
    )


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
