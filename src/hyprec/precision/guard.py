"""The run-time precision guard: catch overflow where it happens, never hand NaN/inf to the user.

While a forward pass runs, hooks record the largest |x| of every tensor the policy stores in half precision and could
overflow, as on-device scalars (one read of the tensor each, no host sync per layer): the residual stream after each
layer under whole-model float16/bfloat16, and q/k/v at the attention cast under float16 attention, in the layers
whose weights do not already prove them safe. Watching the rest would cost time and catch nothing: the weights-only
bound (:mod:`hyprec.precision.attention_bounds`) holds for any input, and bfloat16 overflows only within 0.4% of
float32's own maximum, where the attention logits are non-finite in float32 too and the outputs show it. After the
pass, one host sync reads the scalars together with a finiteness flag of the outputs. Trouble (a value at or beyond
the half format's maximum, or a non-finite output) is reported with the layer and value, then handled by
``on_nonfinite``:

* ``fallback`` (default): switch the engine to a safer policy, remember it for this model instance, and recompute
  the affected work (whole-model half -> hybrid; hybrid-fp16 -> hybrid-bf16; hybrid-bf16 -> float32);
* ``raise``: raise :class:`PrecisionOverflowError`;
* ``ignore``: log and go on (non-finite results are still refused downstream).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from hyprec.dtypes import FP16_MAX, LayerDtypes
from hyprec.errors import NonFiniteOutputError
from hyprec.layers.attention import Attention
from hyprec.precision.attention_bounds import SAFETY_MARGIN, attention_input_bounds
from hyprec.precision.policy import DtypePolicy, resolve_policy

log = logging.getLogger("hyprec")


class PrecisionOverflowError(NonFiniteOutputError):
    """A half-precision tensor overflowed (or an output went non-finite) and the guard was told to raise."""

    def __init__(self, event: GuardEvent):
        super().__init__(event.describe())
        self.event = event


@dataclass
class GuardEvent:
    policy: str
    layer: str
    quantity: str
    value: float
    limit: float
    action: str = ""
    fallback: DtypePolicy | None = None  # the policy a fallback switches to

    @property
    def new_policy(self) -> str | None:
        """The label of the policy a fallback switches to."""
        return self.fallback.name if self.fallback is not None else None

    def describe(self) -> str:
        text = (
            f"precision guard: {self.quantity} reached {self.value:.4g} at {self.layer} under policy {self.policy} "
            f"(limit {self.limit:.6g})"
        )
        if self.new_policy:
            text += f"; recomputing under {self.new_policy} from now on"
        return text


def safer_policy(policy: DtypePolicy, quantity: str) -> DtypePolicy | None:
    """The policy one step safer than ``policy`` after ``quantity`` overflowed, or None from float32."""
    if policy.mode in ("float16", "bfloat16", "plan"):
        # The residual stream / FFN overflowed (or a precision plan no longer fits this input): keep them float32;
        # attention stays in the half format unless q/k/v themselves overflowed float16.
        half = policy.plan.target if policy.plan is not None else policy.mode
        attn = "bfloat16" if quantity == "q/k/v" and half == "float16" else half
        step = ("hybrid", attn, attn)
    elif policy.mode == "hybrid" and policy.attn_dtype == torch.float16:
        step = ("hybrid", "bfloat16", "bfloat16")
    elif policy.mode == "hybrid":
        step = ("float32", "float32", "float32")
    else:
        return None
    safer = resolve_policy(*step)
    return replace(safer, reason=f"precision guard fallback from {policy.name}: {quantity} overflowed")


def _limit(dtype: torch.dtype) -> float:
    return float("inf") if dtype == torch.float32 else float(torch.finfo(dtype).max)


def qkv_cannot_overflow(model: nn.Module, layer_dtypes: list[LayerDtypes]) -> set[int]:
    """Indices of the layers whose q/k/v need no watching: bfloat16 attention (its range is float32's, see the module
    docstring), and float16 where the weights-only bound, with its safety margin, stays below the float16 maximum."""
    proven = {i for i, d in enumerate(layer_dtypes) if d.attn == torch.bfloat16}
    if any(d.attn == torch.float16 for d in layer_dtypes):
        bounds = attention_input_bounds(model)
        proven |= {i for i, b in enumerate(bounds) if b.bound * SAFETY_MARGIN <= FP16_MAX}
    return proven


class PrecisionGuard:
    """Per-layer max-|x| tracking for one model under one policy (see the module docstring)."""

    def __init__(self, model: nn.Module, policy: DtypePolicy, on_nonfinite: str = "fallback"):
        self.policy = policy
        self.on_nonfinite = on_nonfinite  # one of ON_NONFINITE (EngineConfig validates it)
        self.blocks = model.blocks()
        self.limit = float(torch.finfo(policy.attn_dtype).max)
        # Per layer: the limits of the residual stream and of q/k/v (a precision plan mixes dtypes); tensors a layer
        # keeps in float32 are not watched.
        self.limits: list[tuple[float, float]] = []
        # On-device (min, max) scalars of each watched tensor of the pass, tagged (layer, column), read in one sync.
        self._seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self.events: list[GuardEvent] = []
        self._handles = []
        layer_dtypes = policy.layer_dtypes(len(self.blocks))
        proven = qkv_cannot_overflow(model, layer_dtypes)
        for i, (block, dts) in enumerate(zip(self.blocks, layer_dtypes, strict=True)):
            self.limits.append((_limit(dts.compute), _limit(dts.attn)))
            if dts.compute != torch.float32:
                self._handles.append(block.register_forward_hook(self._residual_hook(i)))
            if dts.attn != torch.float32 and i not in proven:
                attn = next(m for m in block.modules() if isinstance(m, Attention))
                # First: under emulated half precision (hyprec.precision.emulation) it sees q/k/v before rounding.
                self._handles.append(attn.register_forward_pre_hook(self._qkv_hook(i), prepend=True))

    def _fold(self, i: int, col: int, x: torch.Tensor) -> None:
        # Min and max in one read of x (max |x| is the larger magnitude; NaN propagates into both). Measured on a
        # [2048, 12, 32] q: 0.09 ms, where abs().amax() took 0.15 ms and the infinity norm 1.07 ms.
        if x.numel():
            # A pass records <= 4 per layer; passes run outside begin()/inspect() (hidden-state reads) must not
            # pile up.
            if len(self._seen) >= 16 * len(self.blocks):
                del self._seen[: 4 * len(self.blocks)]
            self._seen.append((i, col, *torch.aminmax(x.detach())))

    def _residual_hook(self, i: int):
        return lambda _m, _args, out: self._fold(i, 0, out)

    def _qkv_hook(self, i: int):
        def hook(_m, args):
            q, k, v, _meta = args
            for x in (q, k, v):
                self._fold(i, 1, x)

        return hook

    @property
    def hook_count(self) -> int:
        """How many tensors each pass watches (hooks on layers that could overflow; 0: nothing can)."""
        return len(self._handles)

    @property
    def record_count(self) -> int:
        """Records of the pass so far, waiting for :meth:`inspect` (bounded for passes nobody inspects)."""
        return len(self._seen)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin(self) -> None:
        self._seen.clear()

    def inspect(self, outputs: torch.Tensor) -> GuardEvent | None:
        """After a forward pass: one host sync; the first overflowing layer (or non-finite output), if any."""
        # Finite iff its min and max are: one read of the outputs, no boolean temporary (a decode step's
        # [8, 262144] logits: 0.29 ms, where isfinite().all() took 2.8 ms).
        ends = [end for *_, lo, hi in self._seen for end in (lo, hi)]
        if outputs.numel():
            ends += torch.aminmax(outputs)
        values = torch.stack([end.float() for end in ends]).tolist() if ends else []
        ok = all(math.isfinite(v) for v in values[2 * len(self._seen) :])
        trouble: dict[tuple[int, int], list[float]] = {}
        for k, (i, col, *_) in enumerate(self._seen):
            lo, hi = values[2 * k], values[2 * k + 1]
            value = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
            if not value < self.limits[i][col]:  # also true for NaN
                trouble.setdefault((i, col), []).append(value)
        self._seen.clear()
        if trouble:
            (i, col), found = min(trouble.items())
            value = math.nan if any(math.isnan(v) for v in found) else max(found)
            return self._event(f"layer {i}", ("residual", "q/k/v")[col], value, self.limits[i][col])
        if not ok:
            return self._event("output", "non-finite values", float("nan"), self.limit)
        return None

    def _event(self, layer: str, quantity: str, value: float, limit: float) -> GuardEvent:
        half = "residual stream" if quantity == "residual" else quantity
        event = GuardEvent(self.policy.name, layer, half, value, limit, action=self.on_nonfinite)
        if self.on_nonfinite == "fallback":
            event.fallback = safer_policy(self.policy, quantity)
        self.events.append(event)
        return event
