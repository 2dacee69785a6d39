"""What the two encoder engines share (embeddings and classifiers): one packed forward pass over token-id lists,
the attention backend it runs on, and the public ``hidden_states`` the tools read."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hyprec.config import EngineConfig, ModelConfig, read_json
from hyprec.engine.base import ModelEngine
from hyprec.engine.model_loading import PolicyRequest
from hyprec.errors import InputTypeError, InvalidInputError, ModelLoadError
from hyprec.layers.attention import AttentionMetadata
from hyprec.layers.attention_backends import select_backend
from hyprec.layers.linear import set_batch_invariant
from hyprec.loading.weights import Checkpoint
from hyprec.precision.emulation import kernel_dtype

log = logging.getLogger("hyprec")


class EncoderEngine(ModelEngine):
    """Base of :class:`~hyprec.engine.embedding_engine.EmbeddingEngine` and
    :class:`~hyprec.engine.classifier_engine.ClassifierEngine`."""

    def __init__(
        self,
        model_dir: Path,
        weights_dir: Path,
        *,
        dtype: str = "auto",
        attn_dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        engine_config: EngineConfig | None = None,
    ):
        self.model_dir = model_dir
        self.name = str(model_dir)
        self.engine_config = (engine_config or EngineConfig()).with_token_budget(generative=False)
        request = PolicyRequest(dtype, attn_dtype, kv_cache_dtype)
        self._open(ModelConfig.from_dir(weights_dir), Checkpoint.open(weights_dir), request)

    def _max_seq_length(self, declared: object, tokenizer_dir: Path) -> int:
        """Tokens per input: the ``max_seq_length`` the model directory declares (``sentence_bert_config.json``),
        else the tokenizer's ``model_max_length``, at most the model's positions."""
        limit = self.model.max_positions
        length = declared
        if length is None:
            tok_cfg_file = tokenizer_dir / "tokenizer_config.json"
            tok_cfg = read_json(tok_cfg_file, "tokenizer config") if tok_cfg_file.exists() else {}
            length = min(int(tok_cfg.get("model_max_length", limit)), limit)
        if not isinstance(length, int) or isinstance(length, bool) or length < 2:
            raise ModelLoadError(f"{self.model_dir}: max_seq_length={length!r}: expected an integer >= 2")
        if length > limit:
            log.warning("max_seq_length %d exceeds the model's %d positions; using %d", length, limit, limit)
            length = limit
        return length

    def _rebuild(self) -> None:
        """The attention backend for the current model and policy."""
        model = self.model
        set_batch_invariant(model, self.engine_config.deterministic)
        self.backend = select_backend(
            self.device,
            kernel_dtype(model, self.policy),
            needs_bias=type(model).uses_attention_bias,
            batch_invariant=self.engine_config.deterministic,
        )
        log.info("hyprec: %s: policy %s, attention backend %s", self.model_dir.name, self.policy, self.backend.name)

    def _forward(
        self, ids: list[list[int]], token_type_ids: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Packed last hidden states ``[sum(len), hidden]`` of one batch of token-id lists (and, for text pairs,
        their segment ids), with the batch's metadata."""
        lens = [len(x) for x in ids]
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long, device=self.device)
        segments = None
        if token_type_ids is not None:
            segments = torch.tensor([t for seq in token_type_ids for t in seq], dtype=torch.long, device=self.device)
        meta = AttentionMetadata.for_sequences(
            lens,
            backend=self.backend,
            device=self.device,
            batch_invariant=self.engine_config.deterministic,
        )
        hidden = self.model(flat, meta) if segments is None else self.model(flat, meta, segments)
        return hidden, meta

    @torch.inference_mode()
    def hidden_states(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Float32 last hidden states ``[len_i, hidden]`` of each token-id list, all run as one batch."""
        if not token_ids:
            raise InvalidInputError("token_ids: expected a non-empty list of non-empty token-id lists")
        ids = self._check_ids(token_ids)
        hidden = self._forward(ids)[0].float()
        return list(torch.split(hidden, [len(x) for x in ids]))

    def _check_ids(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Token-id lists as plain ints, or an error naming the first bad list."""
        ids = [list(seq) for seq in token_ids]
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for seq in ids for t in seq):
            raise InputTypeError("token_ids: expected lists of integers")
        ids = [[int(t) for t in seq] for seq in ids]
        vocab = self.model_config.get("vocab_size")
        for i, seq in enumerate(ids):
            if not seq or min(seq) < 0 or max(seq) >= vocab or len(seq) > self.model.max_positions:
                raise InvalidInputError(f"token_ids[{i}]: expected 1..{self.model.max_positions} ids in [0, {vocab})")
        return ids
