"""What an engine does when the precision guard reports trouble (shared by the embedding and generation engines)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.engine.model_loading import load_model
from hyprec.loading.weights import WeightSource
from hyprec.models.registry import model_class
from hyprec.precision.guard import GuardEvent, PrecisionGuard, PrecisionOverflowError
from hyprec.precision.plan import PrecisionPlan
from hyprec.precision.policy import DtypePolicy

log = logging.getLogger("hyprec")


class GuardedEngine:
    """Mixin: loads the model under a policy (or precision plan) and handles the guard's reports.

    Engines provide ``model_config``, ``checkpoint``, ``checkpoint_dtype``, ``device``, ``plan`` and
    :meth:`install` (what to rebuild around a newly loaded model).
    """

    model_config: ModelConfig
    checkpoint: WeightSource
    checkpoint_dtype: torch.dtype
    device: torch.device
    plan: PrecisionPlan | None
    guard: PrecisionGuard | None
    guard_events: list[GuardEvent]
    policy: DtypePolicy
    #: decoders: generation reads every weight per token, which ``auto`` matmul precision takes into account
    generative: bool = False

    def install(self, model: nn.Module, policy: DtypePolicy) -> None:
        """Run the engine on ``model`` under ``policy`` from now on (rebuilding whatever depends on them)."""
        raise NotImplementedError

    def _set_policy(self, dtype: str, attn_dtype: str, kv_cache_dtype: str) -> None:
        """(Re)load the model under a policy, or under ``self.plan`` when one is set (at start, and when the
        precision guard falls back)."""
        if self.guard is not None:
            self.guard.remove()
            self.guard = None
        self.model = None  # free the old weights before loading new ones
        model, policy = load_model(
            model_class(self.model_config),
            self.model_config,
            self.checkpoint,
            dtype=dtype,
            attn_dtype=attn_dtype,
            kv_cache_dtype=kv_cache_dtype,
            device=self.device,
            checkpoint_dtype=self.checkpoint_dtype,
            plan=self.plan,
            half_arithmetic=self.engine_config.half_arithmetic,
            matmul_precision=self.engine_config.matmul_precision,
            float32_gemm=self.engine_config.float32_gemm,
            weights=self.engine_config.weights,
            generative=self.generative,
        )
        self.install(model, policy)

    def _make_guard(self) -> PrecisionGuard | None:
        ec = self.engine_config
        if self.guard is not None:
            self.guard.remove()
        return PrecisionGuard(self.model, self.policy, ec.on_nonfinite) if ec.precision_guard else None

    def _guard_begin(self) -> None:
        if self.guard is not None:
            self.guard.begin()

    def _guard_check(self, outputs: torch.Tensor) -> bool:
        """Inspect the pass that produced ``outputs``; True when the engine switched to a safer policy and the work
        must be recomputed. Raises :class:`PrecisionOverflowError` under ``on_nonfinite='raise'`` or when no
        safer policy exists."""
        if self.guard is None:
            return False
        event = self.guard.inspect(outputs)
        if event is None:
            return False
        self.guard_events.append(event)
        log.warning("hyprec: %s", event.describe())
        if event.action == "raise" or (event.action == "fallback" and event.fallback is None):
            raise PrecisionOverflowError(event)
        if event.action == "ignore":
            return False
        self.plan = None  # a plan that overflowed is dropped for this model instance, like any other policy
        self._set_policy(*event.fallback)
        return True
