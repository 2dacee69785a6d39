"""The dtype policy: the one place that decides which tensors live in which floating-point format.

Names the user passes (``dtype``, ``attn_dtype``, ``kv_cache_dtype``) are validated and resolved here into a
:class:`DtypePolicy`. Everything downstream reads the resolved torch dtypes from that object:

* ``compute_dtype``: weights and activations (residual stream, FFN, embeddings).
* ``attn_dtype``: q/k/v as they enter the fused attention kernel (the only place half precision is used in
  ``hybrid`` mode; the kernels keep QK^T and the softmax statistics in float32 internally).
* ``kv_cache_dtype``: storage format of cached keys/values (decoder models).

Norms, softmax statistics, positions, pooling and final outputs are always float32, whatever the policy.

A precision plan (:mod:`hyprec.precision.plan`, made by ``hyprec repair``) refines a policy per layer; the policy
then carries it, and :meth:`DtypePolicy.layer_dtypes` answers per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from hyprec.dtypes import (
    ATTN_DTYPES,
    DTYPES,
    FLOAT32_GEMMS,
    HALF_DTYPES,
    KV_CACHE_DTYPES,
    MATMUL_PRECISIONS,
    TORCH_DTYPES,
    LayerDtypes,
    canonical,
    dtype_name,
)
from hyprec.errors import ConfigError
from hyprec.hardware import BF16X3, FLOAT32_ONEDNN
from hyprec.layers import onednn
from hyprec.layers.compensated import bf16_gemm_available

if TYPE_CHECKING:
    from hyprec.hardware import KernelProfile
    from hyprec.layers.gemm_probe import GemmProfile
    from hyprec.precision.plan import PrecisionPlan

#: A less accurate attention format is chosen by ``auto`` only when its measured kernel is at least this many times
#: faster than the more accurate one (the run-time guard and timing noise eat smaller gains).
SPEED_MARGIN = 1.1
#: Under ``highest`` matmul precision, both GEMM libraries (:data:`~hyprec.dtypes.FLOAT32_GEMMS`) are float32 GEMMs
#: with float32 accumulation: the choice changes only the order of the sums, so ``auto`` takes whichever the probe
#: measured this many times faster.
GEMM_MARGIN = 1.05
_MATMUL_SUFFIX = {"highest": "", "high": "+bf16x3", "medium": "+bf16mm"}


@dataclass(frozen=True)
class DtypePolicy:
    """A resolved dtype policy. Build it with :func:`resolve_policy` (or :func:`plan_policy`)."""

    mode: str  # "float32", "float16", "bfloat16" (whole model), "hybrid", or "plan" (per layer)
    compute_dtype: torch.dtype
    attn_dtype: torch.dtype  # under a plan: the widest per-layer attention dtype (picks the backend)
    kv_cache_dtype: torch.dtype
    reason: str  # why auto choices were made; shown by `hyprec info`
    plan: PrecisionPlan | None = None
    # How float32 linear layers multiply: "highest" (float32 GEMMs), "high" (three bfloat16 products, float32-grade)
    # or "medium" (one bfloat16 product); see hyprec.layers.compensated. Half-precision layers ignore it.
    matmul: str = "highest"
    # Under "highest": the library of the float32 GEMMs (FLOAT32_GEMMS, resolved); not part of the name (exact).
    float32_gemm: str = "torch"
    # Weights kept as stored (WEIGHTS, resolved): "float32" or "stored"; not part of the name.
    weights: str = "float32"

    @property
    def name(self) -> str:
        """A label such as ``hybrid-fp16``, ``float32``, ``plan-fp16`` or ``float32+bf16x3``."""
        if self.plan is not None:
            base = self.plan.name
        else:
            base = f"hybrid-{dtype_name(self.attn_dtype)}" if self.mode == "hybrid" else self.mode
        return base + _MATMUL_SUFFIX[self.matmul]

    def layer_dtypes(self, num_layers: int) -> list[LayerDtypes]:
        """Per transformer layer: compute, attention and KV cache dtypes."""
        if self.plan is not None:
            return list(self.plan.layers)
        return [LayerDtypes(self.compute_dtype, self.attn_dtype, self.kv_cache_dtype)] * num_layers

    def as_dict(self) -> dict[str, str]:
        out = {
            "policy": self.name,
            "dtype": self.mode,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "attn_dtype": str(self.attn_dtype).removeprefix("torch."),
            "kv_cache_dtype": str(self.kv_cache_dtype).removeprefix("torch."),
            "matmul_precision": self.matmul,
            "float32_gemm": self.float32_gemm,
            "weights": self.weights,
            "reason": self.reason,
        }
        if self.plan is not None:
            out["plan"] = self.plan.summary()
        return out

    def __str__(self) -> str:
        d = self.as_dict()
        return (
            f"{d['policy']} (weights/activations {d['compute_dtype']}, attention {d['attn_dtype']}, "
            f"KV cache {d['kv_cache_dtype']}; {d['reason']})"
        )


def resolve_policy(
    dtype: str | torch.dtype = "auto",
    attn_dtype: str | torch.dtype = "auto",
    kv_cache_dtype: str | torch.dtype = "auto",
    *,
    checkpoint_dtype: torch.dtype = torch.float32,
    checkpoint_storage: str | None = None,
    fp16_attention_safe: Callable[[], tuple[bool, str]] | None = None,
    kernel_speeds: Callable[[], KernelProfile] | None = None,
) -> DtypePolicy:
    """Validate the user's dtype names and resolve every ``auto``.

    Args:
        dtype: ``auto`` | ``float32`` | ``float16`` | ``bfloat16`` | ``hybrid``. ``auto`` takes the checkpoint's
            dtype, except that a float32 checkpoint resolves to ``hybrid`` (float32 everywhere but attention), or to
            ``float32`` where no half-precision attention is faster on this device.
        attn_dtype: ``auto`` | ``float32`` | ``float16`` | ``bfloat16``. In hybrid mode ``auto`` picks the fastest
            half format on this device (``kernel_speeds``), float16 only when ``fp16_attention_safe`` certifies it;
            a less accurate format must be :data:`SPEED_MARGIN` times faster to be chosen. Without
            ``kernel_speeds``: float16 when certified, else bfloat16.
        kv_cache_dtype: ``auto`` follows ``attn_dtype``.
        checkpoint_dtype: dtype the weights were stored in (a quantized file: the dtype it dequantizes to).
        checkpoint_storage: how the weights were stored, when ``checkpoint_dtype`` alone would mislead (``GGUF
            Q4_K_M checkpoint (a quantized float32 model)``); named in the reason.
        fp16_attention_safe: lazily evaluated check returning ``(safe, evidence)``; only called when needed.
        kernel_speeds: lazily evaluated kernel timings of the device (:func:`hyprec.hardware.kernel_profile`).

    Raises:
        ConfigError: for unknown names or combinations that make no sense (listed in the message).
    """
    mode = canonical(dtype, "dtype", DTYPES)
    attn = canonical(attn_dtype, "attn_dtype", ATTN_DTYPES)
    kv = canonical(kv_cache_dtype, "kv_cache_dtype", KV_CACHE_DTYPES)
    reasons = []

    if mode == "auto":
        stored = str(checkpoint_dtype).removeprefix("torch.")
        mode = "hybrid" if checkpoint_dtype == torch.float32 else stored
        reason = f"{checkpoint_storage or f'{stored} checkpoint'} -> {{}}"
        if mode == "hybrid" and attn == "auto":
            attn, why = _fastest_attention(("float32", "float16", "bfloat16"), fp16_attention_safe, kernel_speeds)
            mode = "float32" if attn == "float32" else "hybrid"
            reasons += [reason.format(mode), f"attention {attn}: {why}"]
        else:
            reasons.append(reason.format(mode))
    elif checkpoint_storage:
        reasons.append(f"{mode} as requested, from a {checkpoint_storage}")

    if mode == "hybrid":
        compute = torch.float32
        if attn == "float32":
            raise ConfigError(
                "dtype='hybrid' with attn_dtype='float32' is plain float32; use dtype='float32', "
                "or attn_dtype in (auto, float16, bfloat16)"
            )
        if attn == "auto":
            attn, why = _fastest_attention(("float16", "bfloat16"), fp16_attention_safe, kernel_speeds)
            reasons.append(f"attention {attn}: {why}")
    else:
        compute = TORCH_DTYPES[mode]
        if attn not in ("auto", mode):
            raise ConfigError(
                f"dtype={mode!r} runs the whole model in {mode}, so attn_dtype must be 'auto' or {mode!r} "
                f"(got {attn!r}); use dtype='hybrid' for float32 weights with half-precision attention"
            )
        attn = mode

    if kv == "auto":
        kv = attn
    elif TORCH_DTYPES[kv] in HALF_DTYPES and TORCH_DTYPES[attn] in HALF_DTYPES and kv != attn:
        raise ConfigError(
            f"kv_cache_dtype={kv!r} with attn_dtype={attn!r} would round keys/values through two half formats; "
            f"use kv_cache_dtype in ('auto', {attn!r}, 'float32')"
        )

    return DtypePolicy(
        mode=mode,
        compute_dtype=compute,
        attn_dtype=TORCH_DTYPES[attn],
        kv_cache_dtype=TORCH_DTYPES[kv],
        reason="; ".join(reasons) or "as requested",
    )


def _fastest_attention(
    candidates: tuple[str, ...],
    fp16_attention_safe: Callable[[], tuple[bool, str]] | None,
    kernel_speeds: Callable[[], KernelProfile] | None,
) -> tuple[str, str]:
    """The attention format ``auto`` picks among ``candidates`` (most accurate first), and why.

    Walking from the most accurate format, a less accurate one replaces the current pick only when its measured
    attention kernel is :data:`SPEED_MARGIN` times faster; float16 only when its inputs are certified not to
    overflow. Without speeds, the most accurate certified half format."""
    certificate: list[tuple[bool, str]] = []

    def fp16_ok() -> bool:
        if not certificate:
            certificate.append(fp16_attention_safe() if fp16_attention_safe else (True, "no check available"))
        return certificate[0][0]

    if kernel_speeds is None:
        pick = next(c for c in candidates if c != "float32" and (c != "float16" or fp16_ok()))
        return pick, certificate[0][1]  # float16 is always a candidate, so the certificate was read
    profile = kernel_speeds()
    times = profile.attention_ms
    pick: str | None = None
    for name in candidates:
        if pick is not None and times[name] * SPEED_MARGIN >= times[pick]:
            continue
        if name == "float16" and not fp16_ok():
            continue
        pick = name
    assert pick is not None  # bfloat16 is always a candidate and never needs a certificate
    verdict = "fastest" if pick != "float32" else "no half format is faster"
    fp16 = ""
    if certificate:
        fp16 = f"; float16 {'certified' if certificate[0][0] else 'not certified'}: {certificate[0][1]}"
    return pick, f"{verdict} on this {profile.device} ({profile.describe('attention')}: {profile.source}){fp16}"


def resolve_matmul(
    policy: DtypePolicy,
    requested: str = "auto",
    *,
    float32_gemm: str = "auto",
    device: torch.device | str = "cpu",
    generative: bool = False,
    gemm_speeds: Callable[[], GemmProfile] | None = None,
) -> DtypePolicy:
    """``policy`` with its float32 matmul precision and GEMM library resolved (:attr:`DtypePolicy.matmul`,
    :attr:`DtypePolicy.float32_gemm`).

    ``gemm_speeds`` times the model's own float32 linear layers per kernel
    (:func:`hyprec.layers.gemm_probe.gemm_profile`).
    ``auto`` precision picks ``high`` (compensated bf16x3, float32-grade) for encoders on a CPU where that probe
    measured it :data:`SPEED_MARGIN` times faster than the fastest float32 GEMM library, else ``highest``;
    ``medium`` is never automatic (one bfloat16 product: min cosine ~0.99994 on MiniLM, below float32 grade). Under
    ``highest``, ``auto`` GEMMs run on oneDNN for encoders on a CPU where the probe measured it :data:`GEMM_MARGIN`
    times faster than ``F.linear``. Generation keeps ``highest`` on ``F.linear`` under ``auto``: decoding one token
    reads every weight once (the bfloat16 parts weigh as much as float32), and a packed copy of every weight would
    double a decoder's memory.
    """
    requested = canonical(requested, "matmul_precision", MATMUL_PRECISIONS)
    gemm = canonical(float32_gemm, "float32_gemm", FLOAT32_GEMMS)
    uses_float32 = policy.compute_dtype == torch.float32 or policy.plan is not None
    on_cpu = torch.device(device).type == "cpu"
    automatic = uses_float32 and on_cpu and not generative and gemm_speeds is not None
    for name, value, available, what in (
        ("matmul_precision", requested, bf16_gemm_available(), "a bfloat16 x bfloat16 -> float32 GEMM"),
        ("float32_gemm", gemm, onednn.available(), "oneDNN"),
    ):
        if value in ("auto", "highest", "torch"):
            continue
        if not uses_float32:
            raise ConfigError(
                f"{name}={value!r} applies to float32 weights, but dtype={policy.mode!r} holds them in "
                f"{policy.mode}; use dtype='float32' or 'hybrid', or {name}='auto'"
            )
        if not on_cpu or not available:
            raise ConfigError(
                f"{name}={value!r} needs {what}, which this PyTorch build has {'not' if on_cpu else 'only on the CPU'}"
                f"; use {name}='auto'"
            )
    reasons, measured = [policy.reason], []
    if requested == "auto" and automatic and policy.plan is None and bf16_gemm_available():
        profile = gemm_speeds()
        times = profile.ms
        # Against the fastest exact float32 GEMM the user allows (F.linear, or oneDNN unless pinned to torch).
        exact = min(t for k, t in times.items() if k == "float32" or (k == FLOAT32_ONEDNN and gemm != "torch"))
        fast = BF16X3 in times and times[BF16X3] * SPEED_MARGIN < exact
        requested = "high" if fast else "highest"
        measured.append(profile)
        reasons.append(f"{'compensated bf16x3' if fast else 'float32'} GEMMs: bf16x3 {'' if fast else 'not '}faster")
    elif requested in ("high", "medium"):
        reasons.append(f"{'compensated bf16x3' if requested == 'high' else 'bfloat16'} GEMMs: as requested")
    else:
        requested = "highest"
    if requested != "highest" or gemm == "torch":
        gemm = "torch"
    elif gemm == "onednn":
        reasons.append("float32 GEMMs on oneDNN: as requested")
    elif automatic and onednn.available():
        profile = gemm_speeds()
        times = profile.ms
        fast = FLOAT32_ONEDNN in times and times[FLOAT32_ONEDNN] * GEMM_MARGIN < times["float32"]
        gemm = "onednn" if fast else "torch"
        measured.append(profile)
        reasons.append(f"float32 GEMMs on {'oneDNN' if fast else 'F.linear'}: oneDNN {'' if fast else 'not '}faster")
    else:
        gemm = "torch"
    if measured:
        reasons[-1] += f" on this {torch.device(device).type} ({measured[0].describe()}: {measured[0].source})"
    return replace(policy, matmul=requested, float32_gemm=gemm, reason="; ".join(reasons))


def plan_policy(
    plan: PrecisionPlan, dtype: str = "auto", attn_dtype: str = "auto", kv_cache_dtype: str = "auto"
) -> DtypePolicy:
    """The policy of a precision plan; the plan sets every dtype, so the user's dtype names must stay ``auto``."""
    for field, value in (("dtype", dtype), ("attn_dtype", attn_dtype), ("kv_cache_dtype", kv_cache_dtype)):
        if value != "auto":
            raise ConfigError(
                f"{field}={value!r} with a precision plan: the plan sets every dtype per layer; "
                "leave the dtype options at 'auto' or drop the plan"
            )
    widest = plan.widest_attention
    return DtypePolicy(
        mode="plan",
        compute_dtype=TORCH_DTYPES[plan.edges],
        attn_dtype=widest,
        kv_cache_dtype=widest,
        reason=plan.summary(),
        plan=plan,
    )
