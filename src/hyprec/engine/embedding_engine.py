"""The embedding engine: texts -> tokens -> token-budget batches -> encoder -> pooling head -> float32 vectors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hyprec.config import EngineConfig
from hyprec.engine.batching import BatchStats, length_batches
from hyprec.engine.encoder_engine import EncoderEngine
from hyprec.errors import InputTypeError, InvalidInputError
from hyprec.finite import refuse_nonfinite
from hyprec.layers.linear import set_batch_invariant, set_matmul_precision
from hyprec.loading.st_pipeline import read_pipeline
from hyprec.loading.tokenizer import TextTokenizer
from hyprec.pooling import EmbeddingHead

log = logging.getLogger("hyprec")


def validate_texts(texts: object) -> list[str]:
    """A list of strings from ``texts`` (one string or a sequence of them), or an error naming the bad item."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
        raise InputTypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputTypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.40}); expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"texts[{i}] is not valid Unicode: {exc.reason} at position {exc.start}") from None
    return list(texts)


def positive_int(value: object, name: str, upper: int | None = None) -> int:
    """``value`` as an int in ``1 .. upper``, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name}={value!r}: expected a positive integer, got {type(value).__name__}")
    if value < 1:
        raise InvalidInputError(f"{name}={value!r}: expected a positive integer")
    if upper is not None and value > upper:
        raise InvalidInputError(f"{name}={value!r}: expected at most {upper}")
    return int(value)


class EmbeddingEngine(EncoderEngine):
    """Owns one encoder model, its tokenizer and pooling head, and the resolved dtype policy."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        attn_dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        engine_config: EngineConfig | None = None,
    ):
        self.pipeline = read_pipeline(model_dir)
        options = {"dtype": dtype, "attn_dtype": attn_dtype, "kv_cache_dtype": kv_cache_dtype}
        super().__init__(model_dir, self.pipeline.transformer_dir, engine_config=engine_config, **options)
        self.head = EmbeddingHead(self.pipeline).to(self.device).eval()
        set_batch_invariant(self.head, self.engine_config.deterministic)
        set_matmul_precision(self.head, self.policy.matmul, self.policy.float32_gemm)
        self.max_seq_length = self._max_seq_length(self.pipeline.max_seq_length, self.pipeline.transformer_dir)
        self.dimension = self._output_dimension()
        self.last_stats = BatchStats()

    @functools.cached_property
    def tokenizer(self) -> TextTokenizer:
        """Loaded on first use, so token-id-only use works for directories without tokenizer files."""
        return TextTokenizer(self.pipeline.transformer_dir, self.max_seq_length)

    def _output_dimension(self) -> int:
        if self.pipeline.dense:
            return self.pipeline.dense[-1].out_features
        return self.model.hidden_size * len(self.pipeline.pooling.modes)

    def prompt_text(self, prompt_name: str | None, prompt: str | None) -> str:
        if prompt is not None and prompt_name is not None:
            raise InvalidInputError("give either prompt or prompt_name, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputTypeError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        name = prompt_name if prompt_name is not None else self.pipeline.default_prompt_name
        if name is None:
            return ""
        if name not in self.pipeline.prompts:
            known = ", ".join(sorted(self.pipeline.prompts)) or "none"
            raise InvalidInputError(f"prompt_name={name!r} is not defined by this model; its prompts: {known}")
        return self.pipeline.prompts[name]

    def tokenize(self, texts: list[str], prompt: str = "") -> list[list[int]]:
        """Token ids as sentence-transformers produces them: prompt prepended, whitespace stripped, truncated."""
        return self.tokenize_with_flags(texts, prompt)[0]

    def tokenize_with_flags(self, texts: list[str], prompt: str = "") -> tuple[list[list[int]], list[bool]]:
        """:meth:`tokenize`, plus whether each text was truncated to ``max_seq_length`` (the server refuses
        over-long inputs unless the request asks for truncation)."""
        inputs = [(prompt + t).strip() for t in texts]
        if self.pipeline.do_lower_case:
            inputs = [t.lower() for t in inputs]
        return self.tokenizer.encode_with_flags(inputs)

    def prompt_length(self, prompt_text: str) -> int:
        """Tokens of a prompt that pooling may skip (ST counts the prompt minus its trailing special token)."""
        return self.tokenizer.count(prompt_text) - 1 if prompt_text else 0

    @torch.inference_mode()
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
        allow_nonfinite: bool = False,
    ) -> np.ndarray:
        """Embeddings ``float32 [len(texts), dim]`` in input order. See :meth:`hyprec.LLM.embed`;
        ``allow_nonfinite`` as :meth:`embed_ids` (for the tools)."""
        items = validate_texts(texts)
        if dimensions is not None:
            dimensions = positive_int(dimensions, "dimensions", self.dimension)  # before tokenising
        if normalize is not None and not isinstance(normalize, bool):
            raise InputTypeError(f"normalize must be True, False or None, got {normalize!r}")
        max_seqs = self.engine_config.max_num_seqs if batch_size is None else positive_int(batch_size, "batch_size")
        prompt_text = self.prompt_text(prompt_name, prompt)
        prompt_len = self.prompt_length(prompt_text)

        ids = self.tokenize(items, prompt_text)
        return self.embed_ids(
            ids,
            prompt_len=prompt_len,
            normalize=normalize,
            dimensions=dimensions,
            max_seqs=max_seqs,
            show_progress=show_progress,
            allow_nonfinite=allow_nonfinite,
        )

    @torch.inference_mode()
    def embed_ids(
        self,
        ids: list[list[int]],
        *,
        prompt_len: int = 0,
        normalize: bool | None = None,
        dimensions: int | None = None,
        max_seqs: int | None = None,
        show_progress: bool = False,
        allow_nonfinite: bool = False,
    ) -> np.ndarray:
        """Embeddings of already tokenised inputs (special tokens included), in input order. ``prompt_len``
        leading tokens of every input belong to a prompt (excluded from pooling when the pipeline says so).
        Non-finite embeddings raise, naming the inputs, unless ``allow_nonfinite`` (the tools measure them)."""
        if dimensions is not None:
            dimensions = positive_int(dimensions, "dimensions", self.dimension)
        ids = self._check_ids(ids)
        out = np.empty((len(ids), dimensions or self.dimension), dtype=np.float32)
        stats = BatchStats()
        max_seqs = max_seqs or self.engine_config.max_num_seqs
        batches = length_batches([len(x) for x in ids], self.engine_config.max_num_batched_tokens, max_seqs)
        for batch in tqdm(batches, desc="embed", unit="batch", disable=not show_progress):
            lens = [len(ids[i]) for i in batch]
            stats.add(lens)
            batch_ids = [ids[i] for i in batch]
            vectors = self.state.run(
                lambda batch_ids=batch_ids: self._pool(batch_ids, prompt_len, normalize, dimensions)
            )
            if not allow_nonfinite:
                refuse_nonfinite(vectors, batch, "embeddings", self.policy.name)
            out[batch] = vectors.cpu().numpy()
        self.last_stats = stats
        return out

    def _pool(
        self, ids: list[list[int]], prompt_len: int, normalize: bool | None, dimensions: int | None
    ) -> torch.Tensor:
        """The pooled (and normalised, cut) embeddings of one batch."""
        lens = [len(x) for x in ids]
        hidden = self._forward(ids)[0]
        return self.head(hidden, lens, [prompt_len] * len(ids), normalize=normalize, dimensions=dimensions)

    def info(self) -> dict[str, Any]:
        return self._info(
            {
                "max_seq_length": self.max_seq_length,
                "embedding_dimension": self.dimension,
                "pipeline": self.pipeline.describe(),
                "prompts": sorted(self.pipeline.prompts),
            }
        )
