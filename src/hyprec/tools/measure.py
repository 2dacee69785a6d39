"""What the tools share: opening a model to measure, the named policies they compare, and the metrics they read.

Tools sit on the top floor and measure a model through the engine's public API (:mod:`hyprec.engine.base`):
``tokenize``, ``embed``/``embed_ids``/``hidden_states``, ``score``/``logits``/``generate``, ``with_policy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hyprec.config import EngineConfig
from hyprec.engine.base import ModelEngine
from hyprec.engine.factory import open_engine
from hyprec.errors import InvalidInputError
from hyprec.model_sources import resolve_model

#: The policies ``compare`` runs by name, as the dtype options that make them.
POLICY_ARGS: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32"},
    "hybrid-fp16": {"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "float16"},
    "hybrid-bf16": {"dtype": "hybrid", "attn_dtype": "bfloat16", "kv_cache_dtype": "bfloat16"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
}


def open_model(
    model: Any,
    *,
    dtype: str = "auto",
    attn_dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    **engine_options: Any,
) -> ModelEngine:
    """The engine to measure: ``model`` itself when it is an engine (or an object holding one as ``.engine``, such
    as a :class:`hyprec.LLM`), else the name or path opened as :class:`hyprec.LLM` opens it, with ``engine_options``
    (:class:`~hyprec.config.EngineConfig` fields)."""
    if isinstance(model, ModelEngine):
        return model
    if isinstance(getattr(model, "engine", None), ModelEngine):
        return model.engine
    return open_engine(
        resolve_model(model),
        dtype=dtype,
        attn_dtype=attn_dtype,
        kv_cache_dtype=kv_cache_dtype,
        engine_config=EngineConfig(**engine_options),
    )


def open_policy(model: Any, policy: str, *, plan: Any = None, **engine_options: Any) -> ModelEngine:
    """``model`` under a named policy (:data:`POLICY_ARGS`), or under ``plan`` (a precision plan file or object)
    when ``policy`` is ``plan``; with the precision guard off, since the point is what each format does alone."""
    if policy == "plan":
        return open_model(model, precision_plan=plan, precision_guard=False, **engine_options)
    if policy not in POLICY_ARGS:
        raise InvalidInputError(f"policy {policy!r}: expected one of {', '.join(POLICY_ARGS)}")
    return open_model(model, precision_guard=False, **engine_options, **POLICY_ARGS[policy])


def row_cosines(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``ours`` with the same row of ``ref``, computed in float64."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def token_ids(
    engine: ModelEngine, inputs: list[str] | list[list[int]], max_tokens: int | None = None
) -> list[list[int]]:
    """Token-id lists of ``inputs`` (texts are tokenised, token-id lists taken as they are), cut to ``max_tokens``."""
    ids = engine.tokenize(inputs) if inputs and isinstance(inputs[0], str) else [list(x) for x in inputs]
    return [x[:max_tokens] for x in ids] if max_tokens is not None else ids
