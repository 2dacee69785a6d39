"""The Python API: ``from hyprec import LLM, SamplingParams``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hyprec.config import EngineConfig
from hyprec.engine.classifier_engine import ClassifierEngine
from hyprec.engine.embedding_engine import EmbeddingEngine, positive_int, validate_texts
from hyprec.engine.factory import open_engine
from hyprec.engine.llm_engine import LLMEngine
from hyprec.errors import InputTypeError, InvalidInputError
from hyprec.model_sources import resolve_model
from hyprec.outputs import ClassificationOutput, RequestOutput, RerankResult
from hyprec.pooling import truncate_and_normalize
from hyprec.precision.policy import DtypePolicy
from hyprec.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]
Messages = list[dict[str, str]]


class LLM:
    """A model loaded for inference under a hybrid-precision dtype policy.

    Args:
        model: a local model directory (sentence-transformers or Hugging Face layout), a ``.gguf`` file, or an alias
            (``minilm``, ``mpnet``, ``gemma``). ``None`` loads the embedded default, all-MiniLM-L6-v2.
        dtype: ``auto`` (float32 checkpoints run ``hybrid``, or ``float32`` where no half-precision attention is
            faster on this device), ``float32``, ``float16``, ``bfloat16`` or ``hybrid`` (float32 weights and
            activations, attention in ``attn_dtype``).
        attn_dtype: ``auto`` (the fastest half format on this device, measured once per machine; float16 only when
            the weights certify q/k/v cannot overflow it), ``float32``, ``float16`` or ``bfloat16``.
        kv_cache_dtype: ``auto`` (follows ``attn_dtype``) or a dtype name (decoders).
        device: ``cpu`` or ``cuda[:N]``.
        max_num_batched_tokens: token budget of one forward pass; default 16,384 for generation and 2,048 for
            embeddings on a CPU (:meth:`hyprec.config.EngineConfig.with_token_budget`).
        max_num_seqs: most sequences in one forward pass.
        **engine_options: further :class:`~hyprec.config.EngineConfig` fields (``max_model_len``, ``num_kv_blocks``,
            ``block_size``, ``kv_cache_memory``, ``deterministic``, ``matmul_precision``: ``auto`` (default),
            ``highest`` (float32 GEMMs), ``high`` (three bfloat16 products, float32-grade) or ``medium`` (one),
            ``float32_gemm``: ``auto`` (default: oneDNN for encoders where the kernel probe measured it faster),
            ``torch`` (``F.linear``) or ``onednn`` (prepacked weights, fused activations),
            ``weights``: ``auto`` (default: stored where it applies), ``stored`` (a GGUF file's linear weights and
            embedding tables kept in their blocks, multiplied with float32 activations) or ``float32`` (dequantised
            at load),
            ``half_arithmetic``: ``native`` (default), ``emulated`` (float16/bfloat16 rounded, computed in
            float32) or ``auto`` (emulated where the device has no half-precision hardware)).

    Example:
        >>> llm = LLM()  # all-MiniLM-L6-v2, hybrid precision
        >>> llm.embed(["hello world"]).shape
        (1, 384)
        >>> gemma = LLM("gemma")  # Gemma-3-270M from GGUF: float32 residual stream, float16 attention and KV cache
        >>> gemma.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        dtype: str = "auto",
        attn_dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        device: str = "cpu",
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 256,
        **engine_options: Any,
    ):
        try:
            config = EngineConfig(
                device=device,
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                **engine_options,
            )
        except TypeError as exc:
            raise InvalidInputError(f"unknown engine option: {exc}") from None
        self._engine = open_engine(
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
    def engine(self) -> EmbeddingEngine | ClassifierEngine | LLMEngine:
        return self._engine

    @property
    def _is_classifier(self) -> bool:
        return isinstance(self._engine, ClassifierEngine)

    @property
    def is_generative(self) -> bool:
        return isinstance(self._engine, LLMEngine)

    def info(self) -> dict[str, Any]:
        """Architecture, sizes, resolved policy, attention backend, and the pooling pipeline or KV cache layout."""
        return self._engine.info()

    # ------------------------------------------------------------------ embeddings

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

        Decoder models embed with last-token pooling (Qwen3-Embedding style), normalised unless
        ``normalize=False`` (after the ``dimensions`` cut, as for encoders). They define no named prompts: pass the
        instruction text as ``prompt``; ``prompt_name`` raises InvalidInputError.

        Raises:
            InputTypeError: a text is not a string. InvalidInputError: bad parameters.
            NonFiniteOutputError: the computation produced NaN/inf (never returned silently).
        """
        if isinstance(self._engine, LLMEngine):
            return self._embed_decoder(texts, normalize, dimensions, prompt_name, prompt)
        if self._is_classifier:
            raise InvalidInputError(
                f"{self._engine.model_dir.name} is a classifier (cross-encoder); use score(), rerank() or classify()"
            )
        return self._engine.embed(
            texts,
            normalize=normalize,
            dimensions=dimensions,
            prompt_name=prompt_name,
            prompt=prompt,
            batch_size=batch_size,
            show_progress=show_progress,
        )

    def _embed_decoder(
        self,
        texts: str | Sequence[str],
        normalize: bool | None,
        dimensions: int | None,
        prompt_name: str | None,
        prompt: str | None,
    ) -> np.ndarray:
        """:meth:`embed` for decoders: last-token pooling, then the same Matryoshka cut and normalisation."""
        engine = self._generator()
        if prompt_name is not None:
            # Named prompts live in an encoder's config_sentence_transformers.json; decoders have no such file.
            raise InvalidInputError(
                f"prompt_name={prompt_name!r}: {engine.name} is a decoder model and defines no named prompts; "
                "pass the instruction text itself as prompt=..."
            )
        if prompt is not None and not isinstance(prompt, str):
            raise InputTypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if normalize is not None and not isinstance(normalize, bool):
            raise InputTypeError(f"normalize must be True, False or None, got {normalize!r}")
        if dimensions is not None:
            dimensions = positive_int(dimensions, "dimensions", engine.model_config.get("hidden_size"))
        ids = [self._tokenizer().encode((prompt or "") + t) for t in validate_texts(texts)]
        vectors = engine.embed_ids(ids, normalize=False)
        return truncate_and_normalize(vectors, dimensions, normalize is not False).numpy()

    # ------------------------------------------------------------------ scoring, reranking, classification

    def score(
        self,
        text_1: str | Sequence[str] | Sequence[tuple[str, str]],
        text_2: str | Sequence[str] | None = None,
    ) -> np.ndarray:
        """Relevance scores of text pairs, float32 ``[n]``.

        ``score(query, documents)`` scores the query against each document, ``score(texts_a, texts_b)`` pairs the
        two lists item by item, and ``score(pairs)`` takes ``(text, text)`` pairs. A cross-encoder reads each pair
        jointly and applies its activation, exactly as sentence-transformers' ``CrossEncoder.predict`` (it must
        have one label; see :meth:`classify`). An embedding model gives the cosine similarity of the two texts'
        embeddings, as vLLM does.

        Raises:
            InputTypeError / InvalidInputError: malformed inputs, or a model that cannot score.
            NonFiniteOutputError: the computation produced NaN/inf (never returned silently).
        """
        pairs = score_pairs(text_1, text_2)
        if isinstance(self._engine, ClassifierEngine):
            if len(self._engine.labels) != 1:
                raise InvalidInputError(
                    f"score needs a cross-encoder with one label; {self._engine.model_dir.name} has "
                    f"{len(self._engine.labels)} ({', '.join(self._engine.labels)}): use classify()"
                )
            return self._engine.predict(pairs)
        if isinstance(self._engine, EmbeddingEngine):
            first = self.embed([a for a, _ in pairs], normalize=True)
            second = self.embed([b for _, b in pairs], normalize=True)
            return (first * second).sum(axis=1, dtype=np.float32)
        raise InvalidInputError(f"{self._engine.name} is a generative model; score needs a cross-encoder or embeddings")

    def rerank(
        self, query: str, documents: Sequence[str], *, top_n: int | None = None, return_documents: bool = False
    ) -> list[RerankResult]:
        """``documents`` ordered by their :meth:`score` against ``query``, best first (equal scores keep input
        order); ``top_n`` keeps the first ``top_n``. Each result has the document's input index and score, and the
        document itself with ``return_documents``."""
        if not isinstance(query, str):
            raise InputTypeError(f"query must be a string, got {type(query).__name__}")
        docs = validate_texts(documents)
        if isinstance(documents, str) or not docs:
            raise InvalidInputError("documents: expected a non-empty list of strings")
        if top_n is not None:
            top_n = positive_int(top_n, "top_n")
        scores = self.score(query, docs)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n]
        return [RerankResult(i, float(scores[i]), docs[i] if return_documents else None) for i in order]

    def classify(self, texts: str | Sequence[str] | Sequence[tuple[str, str]]) -> list[ClassificationOutput]:
        """Labels and probabilities of texts (or text pairs, for NLI-style models): one
        :class:`~hyprec.outputs.ClassificationOutput` per input, in order."""
        if not isinstance(self._engine, ClassifierEngine):
            raise InvalidInputError(
                f"{self._engine.name} is not a classifier; classify needs a sequence-classification model"
            )
        inputs = [texts] if isinstance(texts, str) else list(texts)
        if inputs and isinstance(inputs[0], str):
            inputs = validate_texts(inputs)
        return self._engine.classify(inputs)

    # ------------------------------------------------------------------ generation

    def _generator(self) -> LLMEngine:
        if not isinstance(self._engine, LLMEngine):
            what = "a classifier; use score(), rerank() or classify()" if self._is_classifier else "an embedding model"
            raise InvalidInputError(f"{self._engine.model_dir.name} is {what}; generation needs a decoder model")
        return self._engine

    def _tokenizer(self):
        tok = self._generator().tokenizer
        if tok is None:
            raise InvalidInputError("this model has no tokenizer; pass prompts as token-id lists")
        return tok

    def _prompt_ids(self, prompt: PromptType, i: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self._tokenizer().encode(prompt["prompt"])
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise InputTypeError(
            f"prompts[{i}] is {type(prompt).__name__}; expected a string, a list of token ids, or "
            '{"prompt": str} / {"prompt_token_ids": [int, ...]}'
        )

    def _add(
        self, prompts: PromptType | Sequence[PromptType], params: SamplingParams | Sequence[SamplingParams] | None
    ):
        engine = self._generator()
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise InputTypeError(f"prompts: expected a prompt or a list of prompts, got {type(prompts).__name__}")
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidInputError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
        for i, ((_, ids), sp) in enumerate(zip(encoded, plist, strict=True)):  # validate all before queueing any
            engine.validate_request(ids, sp, where=f"prompts[{i}]")
        return [engine.add_request(ids, sp, prompt=text) for (text, ids), sp in zip(encoded, plist, strict=True)]

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate completions for one prompt or a list (strings, token-id lists, or dicts), run together with
        continuous batching. Returns one :class:`RequestOutput` per prompt, in order."""
        return self._generator().run_to_completion(self._add(prompts, sampling_params), progress=use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (``[{"role", "content"}, ...]``) or a list of them, rendered with
        the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self._tokenizer()
        prompts = [{"prompt": tok.apply_chat_template(c), "prompt_token_ids": tok.encode_chat(c)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's state after every engine step until it finishes (text and tokens grow)."""
        engine = self._generator()
        (rid,) = self._add(prompt, sampling_params)
        try:
            while True:
                for out in engine.step():
                    if out.request_id == rid:
                        if out.error is not None:
                            raise out.error
                        yield out
                        if out.finished:
                            return
        finally:
            if rid in engine.requests:
                engine.abort(rid)


def score_pairs(
    text_1: str | Sequence[str] | Sequence[tuple[str, str]], text_2: str | Sequence[str] | None
) -> list[tuple[str, str]]:
    """The text pairs :meth:`LLM.score` means (see there), validated."""
    if text_2 is None:
        if isinstance(text_1, str) or not isinstance(text_1, Sequence) or not text_1:
            raise InvalidInputError("score(pairs): expected a non-empty list of (text, text) pairs")
        bad = next((i for i, p in enumerate(text_1) if not (isinstance(p, (tuple, list)) and len(p) == 2)), None)
        if bad is not None:
            raise InputTypeError(f"pairs[{bad}] is {type(text_1[bad]).__name__}: expected a (text, text) pair")
        firsts, seconds = validate_texts([p[0] for p in text_1]), validate_texts([p[1] for p in text_1])
    elif isinstance(text_1, str):
        seconds = validate_texts(text_2)
        firsts = [text_1] * len(seconds)
    else:
        firsts, seconds = validate_texts(text_1), validate_texts(text_2)
        if len(firsts) != len(seconds):
            raise InvalidInputError(f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}; expected as many")
    if not firsts:
        raise InvalidInputError("score: expected at least one pair of texts")
    return list(zip(firsts, seconds, strict=True))
