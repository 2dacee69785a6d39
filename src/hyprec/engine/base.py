"""What the embedding and generation engines share: one model under one dtype policy, watched by the precision
guard (:class:`~hyprec.engine.guarded_model.GuardedModel`), the part of the public API that does not depend on the
kind of model, and the fields of ``info()``.

The public engine API is what the entry points and the tools (``check``, ``compare``, ``repair``) use:
``tokenize``, ``embed_ids``, ``hidden_states`` (encoders), ``score`` and ``logits`` (decoders), ``model`` and
``policy`` (read), and :meth:`ModelEngine.with_policy`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hyprec.allocator import tune_malloc
from hyprec.config import EngineConfig, ModelConfig
from hyprec.engine.guarded_model import GuardedModel
from hyprec.engine.model_loading import PolicyRequest, model_summary
from hyprec.hardware import hardware_summary
from hyprec.layers.attention import AttentionBackend
from hyprec.loading.weights import WeightSource
from hyprec.precision.emulation import arithmetic
from hyprec.precision.guard import GuardEvent, PrecisionGuard
from hyprec.precision.policy import DtypePolicy


class ModelEngine:
    """Base of the two engines: :class:`~hyprec.engine.embedding_engine.EmbeddingEngine` and ``LLMEngine``.

    Subclasses call :meth:`_open` from their constructor and implement :meth:`_rebuild`, which (re)creates whatever
    depends on the model and its policy (attention backend, KV cache) after load and after every switch.
    """

    name: str
    engine_config: EngineConfig
    model_config: ModelConfig
    device: torch.device
    backend: AttentionBackend
    state: GuardedModel
    #: decoders: generation reads every weight per token, which ``auto`` matmul precision takes into account
    generative: bool = False

    def _open(self, config: ModelConfig, checkpoint: WeightSource, request: PolicyRequest) -> None:
        tune_malloc()
        self.model_config = config
        self.device = torch.device(self.engine_config.device)
        self.state = GuardedModel(
            config, checkpoint, self.engine_config, request, generative=self.generative, on_switch=self._rebuild
        )
        self._rebuild()

    def _rebuild(self) -> None:
        raise NotImplementedError

    @property
    def model(self) -> nn.Module:
        """The model as it runs now (read it, hook it; :meth:`with_policy` replaces it)."""
        return self.state.model

    @property
    def policy(self) -> DtypePolicy:
        """The resolved dtype policy the model runs under now."""
        return self.state.policy

    @property
    def checkpoint(self) -> WeightSource:
        """The weights the model is loaded from (and reloaded from when a guard fallback must change them)."""
        return self.state.checkpoint

    @property
    def guard(self) -> PrecisionGuard | None:
        return self.state.guard

    @property
    def guard_events(self) -> list[GuardEvent]:
        """Every report of the precision guard so far (fallbacks included)."""
        return self.state.events

    def with_policy(self, policy: DtypePolicy, model: nn.Module | None = None) -> None:
        """Run under ``policy`` from now on: on ``model`` when given (already built for that policy, such as a
        precision plan applied to a float32 copy), else on this engine's model moved there (in place where only the
        attention dtypes change, reloaded from the checkpoint otherwise). Requests in flight restart from their
        tokens."""
        self.state.switch(policy, model)

    def _info(self, specific: dict[str, Any]) -> dict[str, Any]:
        """``info()``: the model's summary, the engine's ``specific`` fields, then the device and the policy."""
        return {
            **model_summary(self.name, self.model_config, self.model, self.state.checkpoint_dtype),
            **specific,
            "device": str(self.device),
            **hardware_summary(self.device),
            "malloc": tune_malloc(),
            "attention_backend": self.backend.name,
            "deterministic": self.engine_config.deterministic,
            "half_arithmetic": arithmetic(self.model),
            "policy": self.policy.as_dict(),
        }
