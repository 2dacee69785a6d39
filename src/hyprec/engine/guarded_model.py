"""One model under one dtype policy, watched by the precision guard: what both engines run on.

The engine owns the rebuild. When the guard reports trouble it names a safer :class:`DtypePolicy`
(:func:`hyprec.precision.guard.safer_policy`), and :meth:`GuardedModel.switch` moves the model there: in place when
only the attention dtypes change (hybrid-fp16 -> hybrid-bf16 -> float32 keep every float32 weight as it is), and
by reloading from the checkpoint only when the weights themselves must change (whole-model half precision or a
precision plan -> hybrid). The engine is told through ``on_switch`` so it can rebuild what depends on the model
(KV cache, attention backend).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from hyprec.config import EngineConfig, ModelConfig
from hyprec.engine.model_loading import PolicyRequest, load_model
from hyprec.loading.weights import WeightSource
from hyprec.models.registry import model_class
from hyprec.precision.casting import set_attention_dtypes
from hyprec.precision.emulation import arithmetic
from hyprec.precision.guard import GuardEvent, PrecisionGuard, PrecisionOverflowError
from hyprec.precision.plan import load_plan
from hyprec.precision.policy import DtypePolicy

log = logging.getLogger("hyprec")


class GuardedModel:
    """The model, its resolved policy, and the precision guard watching it (see the module docstring).

    Args:
        config / checkpoint: the model's config and weights.
        engine_config: run-time options (device, guard, plan, arithmetic, matmul precision, weights).
        request: the user's dtype names (the engine config's precision plan, if any, is added here).
        generative: a decoder (generation reads every weight per token, which ``auto`` matmul precision weighs).
        on_switch: called after the model or policy changed, to rebuild what depends on them.
    """

    def __init__(
        self,
        config: ModelConfig,
        checkpoint: WeightSource,
        engine_config: EngineConfig,
        request: PolicyRequest,
        *,
        generative: bool,
        on_switch: Callable[[], None],
    ):
        self.config = config
        self.checkpoint = checkpoint
        self.checkpoint_dtype = checkpoint.floating_dtype()
        self.engine_config = engine_config
        self.device = torch.device(engine_config.device)
        self.generative = generative
        self.on_switch = on_switch
        self.guard: PrecisionGuard | None = None
        self.events: list[GuardEvent] = []
        self.model, self.policy = self._load(replace(request, plan=load_plan(engine_config.precision_plan)))
        self._watch()

    def _load(self, request: PolicyRequest | DtypePolicy) -> tuple[nn.Module, DtypePolicy]:
        ec = self.engine_config
        return load_model(
            model_class(self.config),
            self.config,
            self.checkpoint,
            request,
            device=self.device,
            checkpoint_dtype=self.checkpoint_dtype,
            half_arithmetic=ec.half_arithmetic,
            matmul_precision=ec.matmul_precision,
            float32_gemm=ec.float32_gemm,
            weights=ec.weights,
            generative=self.generative,
        )

    def _watch(self) -> None:
        if self.guard is not None:
            self.guard.remove()
        on = self.engine_config.precision_guard
        self.guard = PrecisionGuard(self.model, self.policy, self.engine_config.on_nonfinite) if on else None

    def switch(self, policy: DtypePolicy, model: nn.Module | None = None) -> None:
        """Run under ``policy`` from now on, on ``model`` when given (built for that policy, e.g. a precision plan
        applied to a float32 copy), else on this model moved there: in place when only attention dtypes change,
        reloaded from the checkpoint otherwise."""
        if model is None and self._attention_only(policy):
            model = self.model
            policy = replace(
                policy,
                matmul=self.policy.matmul,
                float32_gemm=self.policy.float32_gemm,
                weights=self.policy.weights,
            )
            set_attention_dtypes(model, policy.layer_dtypes(len(model.blocks())))
        elif model is None:
            if self.guard is not None:
                self.guard.remove()
            self.model = None  # free the old weights before loading new ones
            model, policy = self._load(policy)
        self.model, self.policy = model, policy
        self._watch()
        self.on_switch()

    def _attention_only(self, policy: DtypePolicy) -> bool:
        """Whether ``policy`` differs from the current one only in attention/KV cache dtypes (every weight stays)."""
        old = self.policy
        same_weights = old.compute_dtype == policy.compute_dtype and old.plan is None and policy.plan is None
        return same_weights and arithmetic(self.model) == "native"

    def begin(self) -> None:
        """Before a guarded forward pass."""
        if self.guard is not None:
            self.guard.begin()

    def check(self, outputs: torch.Tensor) -> bool:
        """Inspect the pass that produced ``outputs``; True when the model switched to a safer policy and the work
        must be recomputed. Raises :class:`PrecisionOverflowError` under ``on_nonfinite='raise'`` or when no
        safer policy exists."""
        if self.guard is None:
            return False
        event = self.guard.inspect(outputs)
        if event is None:
            return False
        self.events.append(event)
        log.warning("hyprec: %s", event.describe())
        if event.action == "raise" or (event.action == "fallback" and event.fallback is None):
            raise PrecisionOverflowError(event)
        if event.action == "ignore":
            return False
        self.switch(event.fallback)  # a plan that overflowed is dropped for this model instance, like any policy
        return True

    def run(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``forward()`` under the guard, recomputed after each fallback to a safer policy until it passes."""
        while True:
            self.begin()
            out = forward()
            if not self.check(out):
                return out
