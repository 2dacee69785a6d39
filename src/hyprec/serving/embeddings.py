"""``/v1/embeddings``: :class:`ServingEmbedding`."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi.concurrency import run_in_threadpool

from hyprec.engine.embedding_engine import EmbeddingEngine
from hyprec.errors import HyprecError
from hyprec.serving.api_error import ApiError
from hyprec.serving.base import OpenAIServing, as_batch
from hyprec.serving.protocol import EmbeddingRequest
from hyprec.serving.responses import encode_embedding
from hyprec.serving.worker import EmbedJob


class ServingEmbedding(OpenAIServing):
    """Validates an embedding request, tokenises it within the token limits, embeds it through the engine loop
    (batched with concurrent requests) and builds OpenAI's response."""

    async def create(self, req: EmbeddingRequest) -> dict[str, Any]:
        """The response to ``req``; :class:`ApiError` for a request that cannot be served."""
        self.check_model(req.model)
        if not isinstance(self.engine, EmbeddingEngine):
            raise ApiError(400, f"{self.settings.model_name} is {self.model_kind()}; /v1/embeddings needs an "
                           "embedding model")  # fmt: skip
        texts, ids = as_batch(req.input, "input")
        self.check_count(len(texts or ids), "input")
        if req.dimensions is not None and req.dimensions > self.engine.dimension:
            raise ApiError(400, f"dimensions={req.dimensions}: this model's embeddings have {self.engine.dimension}",
                           param="dimensions")  # fmt: skip
        ids, prompt_len = await run_in_threadpool(self._token_ids, req, texts, ids)
        vectors = await self.run_job(partial(EmbedJob, ids, prompt_len, req.normalize, req.dimensions))
        tokens = sum(len(x) for x in ids)
        self.metrics.prompt_tokens.inc(tokens)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_embedding(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": self.settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _token_ids(
        self, req: EmbeddingRequest, texts: list[str] | None, ids: list[list[int]] | None
    ) -> tuple[list[list[int]], int]:
        """Token ids of an embedding request within the token limits, and the length of its prompt prefix (runs in
        a worker thread: tokenising is CPU work)."""
        engine = self.engine
        limit = self.token_limit(engine.max_seq_length)
        keep = min(req.truncate_prompt_tokens or limit, limit)
        try:
            prompt = engine.prompt_text(req.prompt_name, None)
        except HyprecError as exc:
            raise ApiError(400, str(exc), param="prompt_name") from None
        if texts is not None:
            truncate = req.truncate_prompt_tokens is not None
            ids = self.fit_texts(texts, prompt, keep, truncate, "input", "set truncate_prompt_tokens to truncate")
        else:
            vocab = engine.model_config.get("vocab_size")
            for i, x in enumerate(ids):
                if any(not 0 <= t < vocab for t in x):
                    raise ApiError(400, f"input[{i}]: token ids must lie in [0, {vocab})", param="input")
                if len(x) > limit and req.truncate_prompt_tokens is None:
                    raise ApiError(400, f"input[{i}] has {len(x)} tokens; the limit per input is {limit}; "
                                   "set truncate_prompt_tokens to truncate", param="input")  # fmt: skip
            ids = [x[:keep] for x in ids]
        return ids, engine.prompt_length(prompt)
