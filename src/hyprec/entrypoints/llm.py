"""The Python API: ``from hyprec import LLM``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from hyprec.config import EngineConfig
from hyprec.dtype_policy import DtypePolicy
from hyprec.engine.embedding_engine import EmbeddingEngine
from hyprec.model_sources import resolve_model


class LLM:
    """A model loaded for inference under a hybrid-precision dtype policy.

    Args:
        model: a local model directory (sentence-transformers or Hugging Face layout) or an alias
            (``minilm``, ``mpnet``). ``None`` loads the embedded default, all-MiniLM-L6-v2.
        dtype: ``auto`` (float32 checkpoints run ``hybrid``), ``float32``, ``float16``, ``bfloat16`` or
            ``hybrid`` (float32 weights and activations, attention in ``attn_dtype``).
        attn_dtype: ``auto`` (float16 when the weights certify q/k/v cannot overflow it, else bfloat16),
            ``float32``, ``float16`` or ``bfloat16``.
        kv_cache_dtype: ``auto`` (follows ``attn_dtype``) or a dtype name.
        device: ``cpu`` or ``cuda[:N]``.
        max_num_batched_tokens: token budget of one forward pass (padded tokens of the attention batch).
        max_num_seqs: most sequences in one forward pass.

    Example:
        >>> llm = LLM()  # all-MiniLM-L6-v2, hybrid precision
        >>> llm.embed(["hello world"]).shape
        (1, 384)
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        dtype: str = "auto",
        attn_dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        device: str = "cpu",
        max_num_batched_tokens: int = 16384,
        max_num_seqs: int = 256,
    ):
        config = EngineConfig(device=device, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
        self._engine = EmbeddingEngine(
            resolve_model(model),
            dtype=dtype,
            attn_dtype=attn_dtype,
            kv_cache_dtype=kv_cache_dtype,
            engine_config=config,
        )

    @property
    def policy(self) -> DtypePolicy:
        """The resolved dtype policy (what ``auto`` became, and why)."""
        return self._engine.policy

    @property
    def engine(self) -> EmbeddingEngine:
        return self._engine

    def info(self) -> dict[str, Any]:
        """Architecture, sizes, resolved policy, attention backend and pooling pipeline."""
        return self._engine.info()

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed texts; returns a float32 array ``(len(texts), dim)`` in input order.

        Args:
            texts: one string or a list of strings. Whitespace is stripped and long texts are truncated to the
                model's ``max_seq_length``, exactly as sentence-transformers does.
            normalize: L2-normalise (``True``), don't (``False``), or follow the model's pipeline (``None``).
            dimensions: keep only the first N dimensions (Matryoshka); re-normalised when normalising.
            prompt_name: a prompt defined in the model's ``config_sentence_transformers.json``.
            prompt: a literal prompt prepended to every text (exclusive with ``prompt_name``).
            batch_size: most texts per forward pass (the token budget still applies).
            show_progress: a progress bar on stderr.

        Raises:
            InputTypeError: a text is not a string. InvalidInputError: bad parameters.
            NonFiniteOutputError: the computation produced NaN/inf (never returned silently).
        """
        return self._engine.embed(
            texts,
            normalize=normalize,
            dimensions=dimensions,
            prompt_name=prompt_name,
            prompt=prompt,
            batch_size=batch_size,
            show_progress=show_progress,
        )
