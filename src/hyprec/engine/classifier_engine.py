"""The classifier engine (cross-encoders, classifiers): texts or text pairs -> tokens with segment ids ->
token-budget batches -> encoder -> float32 classification head -> logits -> the model's activation.

``predict`` gives what sentence-transformers' ``CrossEncoder.predict`` gives (the activation its config names:
sigmoid for one label by default); ``classify`` gives labels and probabilities (softmax, or sigmoid for one label).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hyprec.config import EngineConfig, ModelConfig, read_json
from hyprec.engine.batching import BatchStats, length_batches
from hyprec.engine.encoder_engine import EncoderEngine
from hyprec.errors import InputTypeError, InvalidInputError, ModelLoadError
from hyprec.finite import refuse_nonfinite
from hyprec.loading.tokenizer import TextTokenizer
from hyprec.models.classification import labels
from hyprec.outputs import ClassificationOutput

log = logging.getLogger("hyprec")

#: The activations a cross-encoder's config may name (sentence-transformers writes the torch class path).
ACTIVATIONS = {
    "Sigmoid": torch.sigmoid,
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "Softmax": lambda x: torch.softmax(x, dim=-1),
}


def read_activation(model_dir: Path, config: ModelConfig) -> str:
    """The activation sentence-transformers' ``CrossEncoder`` applies to this model's logits: the one its files name
    (``config_sentence_transformers.json``, or ``config.json``'s ``sentence_transformers`` or the older
    ``sbert_ce_default_activation_function``), else sigmoid for one label and identity for more."""
    st_file = model_dir / "config_sentence_transformers.json"
    named = read_json(st_file, "sentence-transformers config").get("activation_fn") if st_file.exists() else None
    named = named or (config.get("sentence_transformers", {}) or {}).get("activation_fn")
    named = named or config.get("sbert_ce_default_activation_function", None)
    if named is None:
        return "Sigmoid" if len(labels(config)) == 1 else "Identity"
    name = str(named).rpartition(".")[2]
    if name not in ACTIVATIONS:
        raise ModelLoadError(
            f"{model_dir}: activation_fn={named!r} is not supported; expected torch.nn.{'/'.join(ACTIVATIONS)}"
        )
    return name


class ClassifierEngine(EncoderEngine):
    """Owns one sequence-classification model, its tokenizer and the resolved dtype policy."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        attn_dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        engine_config: EngineConfig | None = None,
    ):
        options = {"dtype": dtype, "attn_dtype": attn_dtype, "kv_cache_dtype": kv_cache_dtype}
        super().__init__(model_dir, model_dir, engine_config=engine_config, **options)
        self.labels = labels(self.model_config)
        self.activation = read_activation(model_dir, self.model_config)
        st_file = model_dir / "sentence_bert_config.json"
        declared = (
            read_json(st_file, "sentence-transformers config").get("max_seq_length") if st_file.exists() else None
        )
        self.max_length = self._max_seq_length(declared, model_dir)
        self.tokenizer = TextTokenizer(model_dir, self.max_length)
        self._short_tokenizers: dict[int, TextTokenizer] = {}
        self.last_stats = BatchStats()

    # ------------------------------------------------------------------ inputs

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of single texts, truncated to ``max_length``."""
        return self.tokenizer.encode(list(texts))

    def encode(
        self, inputs: list[str] | list[tuple[str, str]], max_length: int | None = None
    ) -> tuple[list[list[int]], list[list[int]] | None, list[bool]]:
        """Token ids of texts or text pairs truncated to ``max_length`` (at most, and by default, the model's), their
        segment ids (None where the model has a single segment type, as RoBERTa's tokenizer gives it), and whether
        each input was truncated (the server refuses over-long inputs unless asked to truncate)."""
        inputs = _check_inputs(inputs)
        tokenizer = self._tokenizer(min(max_length or self.max_length, self.max_length))
        if isinstance(inputs[0], str):
            ids, truncated = tokenizer.encode_with_flags(list(inputs))
            types = [[0] * len(x) for x in ids]  # what the model assumes for a single text
        else:
            ids, types, truncated = tokenizer.encode_pairs([tuple(p) for p in inputs])
        return ids, types if self.model_config.get("type_vocab_size", 2) > 1 else None, truncated

    def _tokenizer(self, max_length: int) -> TextTokenizer:
        """The tokenizer truncating to ``max_length``: a shorter limit (a server's) gets its own, built once."""
        if max_length == self.max_length:
            return self.tokenizer
        # Server threads may race here; the loser's tokenizer is merely built twice and dropped.
        if max_length not in self._short_tokenizers:
            self._short_tokenizers[max_length] = TextTokenizer(self.model_dir, max_length)
        return self._short_tokenizers[max_length]

    # ------------------------------------------------------------------ passes

    @torch.inference_mode()
    def logits(self, inputs: list[str] | list[tuple[str, str]], *, allow_nonfinite: bool = False) -> np.ndarray:
        """Float32 logits ``[n, labels]`` of texts or text pairs, in input order. Non-finite logits raise, naming
        the inputs, unless ``allow_nonfinite`` (the tools measure them)."""
        ids, types, _ = self.encode(inputs)
        return self.logits_ids(ids, types, allow_nonfinite=allow_nonfinite)

    @torch.inference_mode()
    def logits_ids(
        self, ids: list[list[int]], types: list[list[int]] | None, *, allow_nonfinite: bool = False
    ) -> np.ndarray:
        """:meth:`logits` of inputs already encoded (:meth:`encode`), run in token-budget batches."""
        out = np.empty((len(ids), len(self.labels)), dtype=np.float32)
        stats = BatchStats()
        ec = self.engine_config
        for batch in length_batches([len(x) for x in ids], ec.max_num_batched_tokens, ec.max_num_seqs):
            batch_ids = [ids[i] for i in batch]
            stats.add([len(x) for x in batch_ids])
            batch_types = None if types is None else [types[i] for i in batch]
            logits = self.state.run(lambda b=batch_ids, t=batch_types: self._classify(b, t))
            if not allow_nonfinite:
                refuse_nonfinite(logits, batch, "logits", self.policy.name)
            out[batch] = logits.cpu().numpy()
        self.last_stats = stats
        return out

    def _classify(self, ids: list[list[int]], types: list[list[int]] | None) -> torch.Tensor:
        """Float32 logits of one batch: the head reads each input's first token."""
        hidden, meta = self._forward(ids, types)
        return self.model.classify(hidden[meta.queries.cu[:-1].long()])

    def predict(self, inputs: list[str] | list[tuple[str, str]], *, allow_nonfinite: bool = False) -> np.ndarray:
        """Scores as ``CrossEncoder.predict`` gives them: the model's activation on the logits, ``[n]`` for one
        label, ``[n, labels]`` for more."""
        return self.scores(self.logits(inputs, allow_nonfinite=allow_nonfinite))

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """:meth:`predict`'s scores from logits ``[n, labels]``."""
        scores = ACTIVATIONS[self.activation](torch.from_numpy(logits)).numpy()
        return scores[:, 0] if len(self.labels) == 1 else scores

    def classify(self, inputs: list[str] | list[tuple[str, str]]) -> list[ClassificationOutput]:
        """The most probable label and every label's probability (softmax; sigmoid for one label)."""
        return self.classes(self.logits(inputs))

    def classes(self, logits: np.ndarray) -> list[ClassificationOutput]:
        """:meth:`classify`'s outputs from logits ``[n, labels]``."""
        logits = torch.from_numpy(logits)
        probs = torch.sigmoid(logits) if len(self.labels) == 1 else torch.softmax(logits, dim=1)
        best = probs.argmax(dim=1) if len(self.labels) > 1 else torch.zeros(len(probs), dtype=torch.long)
        return [ClassificationOutput(self.labels[int(k)], p.tolist()) for k, p in zip(best, probs, strict=True)]

    def info(self) -> dict[str, Any]:
        return self._info({"max_seq_length": self.max_length, "labels": self.labels, "activation": self.activation})


def _check_inputs(inputs: object) -> list[str] | list[tuple[str, str]]:
    """Texts, or pairs of texts; anything else is an error naming the first bad item."""
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise InvalidInputError("expected a non-empty list of texts or of (text, text) pairs")
    for i, item in enumerate(inputs):
        ok = isinstance(item, str) or (
            isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)
        )
        if not ok:
            raise InputTypeError(f"inputs[{i}] is {type(item).__name__}: expected a string or a (text, text) pair")
    if len({isinstance(item, str) for item in inputs}) > 1:
        raise InvalidInputError("inputs mix texts and (text, text) pairs; give one kind")
    return list(inputs)
