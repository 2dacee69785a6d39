"""What an engine does when the precision guard reports trouble (shared by the embedding and generation engines)."""

from __future__ import annotations

import logging

import torch

from hyprec.dtype_policy import DtypePolicy
from hyprec.precision.guard import GuardEvent, PrecisionGuard, PrecisionOverflowError

log = logging.getLogger("hyprec")


class GuardedEngine:
    """Mixin: ``self.guard``, ``self.guard_events``, ``self.policy`` and ``_set_policy(dtype, attn, kv)``."""

    guard: PrecisionGuard | None
    guard_events: list[GuardEvent]
    policy: DtypePolicy

    def _set_policy(self, dtype: str, attn_dtype: str, kv_cache_dtype: str) -> None:
        raise NotImplementedError

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
        self._set_policy(*event.fallback)
        return True
