"""Half-precision arithmetic emulated in float32, for the tools on hardware that has no half-precision path.

A float16 GEMM on a CPU without AVX512-FP16 converts element by element and runs at ~0.2x float32
(:mod:`hyprec.hardware`), so a ``hyprec repair`` validating whole-model float16 candidates there took minutes per
candidate. ``compare`` and ``repair`` need the numbers a half-precision model computes, not its speed, so where
:func:`hyprec.hardware.native_half` says a format has no hardware path (``half_arithmetic="auto"``), every tensor
the native model would hold in that format is held in float32 instead and rounded to the format (a precision plan's
other half format, if it has a hardware path, still runs natively):

* weights of the layers (and embeddings/head) that the policy or precision plan puts in a half format, once
  (norms keep float32 parameters under every policy, here too);
* the inputs and outputs of their linear layers and norms, which also rounds the residual adds and activation
  functions that feed them (a norm rounds its input in place: it reads the residual stream, and the next residual
  add must see the rounded stream too); the hidden state entering each such layer and the one it returns; the
  logits;
* q/k/v as they enter attention, in the attention dtype; the fused kernel then runs in float32 (in half precision it
  accumulates in float32 too) and its output is rounded. The KV cache keeps its real half-precision storage.

A half GEMM that accumulates in float32 computes the rounded float32 product of rounded operands, up to the order
of its sums, so emulated and native results agree to within a few units of the format's roundoff (measured in
``tests/precision/test_emulation.py``). A value beyond the format's range becomes inf when rounded, exactly as
natively, so the run-time guard, ``compare`` and ``repair`` see the same overflows.

Not bit for bit: native kernels sum in another order (the CPU flash-attention kernel also rounds its softmax
weights to the half format before multiplying them with v); a gated product (activation times up projection) is
rounded once where natively each factor is rounded too; an additive attention bias (MPNet) stays float32; logits
after a final soft-cap are rounded after it rather than before.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hyprec.dtypes import HALF_ARITHMETIC, HALF_DTYPES, full_name
from hyprec.hardware import native_half
from hyprec.layers.attention import Attention
from hyprec.layers.norm import Float32Params, LayerNorm, RMSNorm
from hyprec.precision.policy import DtypePolicy

#: Modules whose inputs and outputs the native model holds in the dtype of the layer they belong to.
_NORMS = (LayerNorm, RMSNorm)
_ROUNDED_MODULES = (nn.Linear, *_NORMS)
_MARK = "hyprec_emulated_formats"  # on a model: the names of the half formats it emulates


def _edges_dtype(policy: DtypePolicy) -> torch.dtype:
    """The dtype of the embeddings and output head under ``policy``."""
    return policy.plan.edges_dtype if policy.plan is not None else policy.compute_dtype


def half_dtypes(policy: DtypePolicy) -> set[torch.dtype]:
    """The half formats ``policy`` computes in (weights, activations or attention; KV cache storage aside)."""
    layers = policy.layer_dtypes(len(policy.plan.layers) if policy.plan is not None else 1)
    used = {_edges_dtype(policy), *(d for layer in layers for d in (layer.compute, layer.attn))}
    return used & set(HALF_DTYPES)


def emulated_formats(choice: str, policy: DtypePolicy, device: torch.device | str) -> frozenset[torch.dtype]:
    """The half formats of ``policy`` to emulate on ``device`` under ``choice`` (one of
    :data:`hyprec.dtypes.HALF_ARITHMETIC`): none (``native``), all (``emulated``), or those without a hardware
    path (``auto``, :func:`hyprec.hardware.native_half`)."""
    if choice not in HALF_ARITHMETIC:
        raise ValueError(f"half_arithmetic={choice!r}")  # EngineConfig validates user input
    halves = half_dtypes(policy)
    if choice == "auto":
        return frozenset(d for d in halves if not native_half(d, torch.device(device).type))
    return frozenset(halves if choice == "emulated" else ())


def describe_arithmetic(policy: DtypePolicy, emulated: frozenset[torch.dtype]) -> list[str]:
    """Per half format of ``policy``: ``float16 emulated`` or ``bfloat16 native``, sorted."""
    return sorted(f"{full_name(d)} {'emulated' if d in emulated else 'native'}" for d in half_dtypes(policy))


def arithmetic(model: nn.Module) -> str:
    """How ``model`` computes half precision, for reports: ``native``, or the formats it emulates in float32
    (``float16 emulated``)."""
    names = getattr(model, _MARK, ())
    return f"{', '.join(names)} emulated" if names else "native"


def kernel_dtype(model: nn.Module, policy: DtypePolicy) -> torch.dtype:
    """The dtype attention backends must accept (picks the backend): float32 where anything is emulated."""
    return torch.float32 if getattr(model, _MARK, ()) else policy.attn_dtype


def _round(x: torch.Tensor, dtype: torch.dtype, storage: torch.dtype | None = None) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (beyond its range: inf), held in ``storage`` (default: ``x``'s dtype)."""
    return x.to(dtype).to(storage or x.dtype)


def _round_inputs(dtype: torch.dtype, count: int = 1, storage: torch.dtype | None = None):
    """A forward pre-hook rounding the first ``count`` positional arguments to ``dtype``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (*(_round(x, dtype, storage) for x in args[:count]), *args[count:])

    return hook


def _round_in_place(dtype: torch.dtype):
    """A norm's forward pre-hook: round its input in place. A norm reads the residual stream, which the native model
    stores rounded, so every later reader (the residual add after it, too) must see the rounded value."""

    def hook(_module: nn.Module, args: tuple) -> None:
        args[0].copy_(args[0].to(dtype))

    return hook


def _round_output(dtype: torch.dtype, storage: torch.dtype | None = None):
    return lambda _module, _args, out: _round(out, dtype, storage)


def _emulate_region(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Round the weights of ``modules`` (not norms) to ``dtype``, and the inputs and outputs of their linear layers
    and norms (:data:`_ROUNDED_MODULES`)."""
    for module in modules:
        if not isinstance(module, Float32Params):
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.copy_(_round(param, dtype))
        # A float32 head (Float32Params linear: classifiers) computes in float32 natively too: nothing to round.
        if isinstance(module, _ROUNDED_MODULES) and not (
            isinstance(module, Float32Params) and not isinstance(module, _NORMS)
        ):
            norm = isinstance(module, _NORMS)
            module.register_forward_pre_hook(_round_in_place(dtype) if norm else _round_inputs(dtype))
            module.register_forward_hook(_round_output(dtype))


def _emulated_logits(model: nn.Module, dtype: torch.dtype, hidden: torch.Tensor) -> torch.Tensor:
    # The head casts the final hidden state to its own dtype and returns logits in it (then float32).
    return _round(type(model).compute_logits(model, _round(hidden, dtype, torch.float32)), dtype)


@torch.no_grad()
def emulate(model: nn.Module, policy: DtypePolicy, formats: frozenset[torch.dtype] | None = None) -> nn.Module:
    """Make ``model`` compute the numbers of ``policy``'s half ``formats`` (default: all of them) in float32 (see the
    module docstring). ``model`` holds every tensor of those formats in float32 (a float32 build; under a plan,
    :meth:`~hyprec.precision.plan.PrecisionPlan.apply` casts the other formats natively). In place; returns it."""
    formats = frozenset(half_dtypes(policy) if formats is None else formats)
    blocks = model.blocks()
    layers = policy.layer_dtypes(len(blocks))
    edges = _edges_dtype(policy)
    seen: set[int] = set()

    def region(roots: list[nn.Module], dtype: torch.dtype) -> None:
        modules = [m for root in roots for m in root.modules() if id(m) not in seen]
        seen.update(map(id, modules))
        if dtype in formats:
            _emulate_region(modules, dtype)

    region(model.edge_modules(), edges)
    producer = edges  # the format of the hidden state entering the next layer
    for block, dts in zip(blocks, layers, strict=True):
        region([block], dts.compute)
        storage = torch.float32 if dts.compute in formats else dts.compute  # what this layer's tensors are held in
        if producer in formats:  # first: before a plan's native cast of the input to this layer's dtype
            block.register_forward_pre_hook(_round_inputs(producer), prepend=True)
        if dts.compute in formats:
            if dts.compute != producer:
                block.register_forward_pre_hook(_round_inputs(dts.compute))
            block.register_forward_hook(_round_output(dts.compute))
        for attn in block.modules():
            if isinstance(attn, Attention) and dts.attn in formats:
                attn.attn_dtype = torch.float32  # the kernel runs in float32 on rounded q/k/v
                attn.register_forward_pre_hook(_round_inputs(dts.attn, 3, torch.float32))
                attn.register_forward_hook(_round_output(dts.attn, storage))
        producer = dts.compute
    region([model], producer)  # what follows the last layer (a final norm) holds its format
    stream = model.residual_stream()
    scale = getattr(stream.embedding, "embed_scale", 1.0) if stream is not None else 1.0
    if edges in formats and scale != 1.0:
        stream.embedding.embed_scale = torch.tensor(scale, dtype=edges).item()  # as the native multiply casts it
    if edges in formats and hasattr(model, "compute_logits"):
        # An instance attribute over the method; a partial (not a closure) so that deepcopy rebinds the model.
        model.compute_logits = functools.partial(_emulated_logits, model, edges)
    setattr(model, _MARK, tuple(sorted(map(full_name, formats))))
    return model
