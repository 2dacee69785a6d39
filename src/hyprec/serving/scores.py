"""``/rerank``, ``/score`` and ``/classify`` (each also under ``/v1``): :class:`ServingScores`."""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

import numpy as np
from fastapi.concurrency import run_in_threadpool

from hyprec.engine.classifier_engine import ClassifierEngine
from hyprec.entrypoints.llm import score_pairs
from hyprec.errors import HyprecError
from hyprec.serving.api_error import ApiError
from hyprec.serving.base import OpenAIServing, check_texts
from hyprec.serving.protocol import ClassifyRequest, RerankRequest, ScoreRequest
from hyprec.serving.worker import ClassifyJob, EmbedJob

TRUNCATE_HINT = 'set "truncate": true to truncate'


class ServingScores(OpenAIServing):
    """Scores text pairs (rerank, score) and classifies texts, with the results ``LLM.rerank``, ``LLM.score`` and
    ``LLM.classify`` give: a cross-encoder reads each pair jointly, an embedding model scores by the cosine of the
    two texts' embeddings. Texts are tokenised within the token limits in a worker thread, then run through the
    engine loop, batched with concurrent requests."""

    async def rerank(self, req: RerankRequest) -> dict[str, Any]:
        """Cohere's and Jina's rerank response (as vLLM and TEI give it) to ``req``: the documents by their score
        against the query, best first (equal scores keep input order), the first ``top_n`` of them."""
        self._check_scorer(req.model, "/rerank")
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        check_texts([req.query], "query")
        docs = self._texts(docs, "documents")
        scores, tokens = await self._scores([req.query] * len(docs), docs, ("query", "documents"), req.truncate)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[: req.top_n or None]
        results = [{"index": i, "relevance_score": float(scores[i])} for i in order]
        if req.return_documents:
            for result in results:
                result["document"] = {"text": docs[result["index"]]}
        return {"id": _request_id("rerank"), "model": self.settings.model_name, "results": results,
                "usage": self._usage(tokens)}  # fmt: skip

    async def score(self, req: ScoreRequest) -> dict[str, Any]:
        """vLLM's score response to ``req``: a string against each text of a list, or two lists item by item."""
        self._check_scorer(req.model, "/score")
        first, second = self._texts(req.text_1, "text_1"), self._texts(req.text_2, "text_2")
        try:
            pairs = score_pairs(req.text_1 if isinstance(req.text_1, str) else first, second)
        except HyprecError as exc:
            raise ApiError(400, str(exc), param="text_2") from None
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        scores, tokens = await self._scores(firsts, seconds, ("text_1", "text_2"), req.truncate)
        data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
        return self._list("score", data, tokens)

    async def classify(self, req: ClassifyRequest) -> dict[str, Any]:
        """vLLM's classify response to ``req``: each text's most probable label and every label's probability."""
        self.check_model(req.model)
        if not isinstance(self.engine, ClassifierEngine):
            raise ApiError(400, f"{self.settings.model_name} is {self.model_kind()}; /classify needs a "
                           "sequence-classification model")  # fmt: skip
        texts = self._texts(req.input, "input")
        ids, types = await run_in_threadpool(self._encode, texts, "input", req.truncate)
        outputs = await self.run_job(partial(ClassifyJob, ids, types, True))
        data = [
            {"index": i, "label": o.label, "probs": o.probs, "num_classes": len(o.probs)} for i, o in enumerate(outputs)
        ]
        return self._list("classify", data, sum(len(x) for x in ids))

    # ------------------------------------------------------------------ shared steps

    def _check_scorer(self, name: str | None, route: str) -> None:
        """400 unless the served model scores pairs: a cross-encoder with one label, or an embedding model."""
        self.check_model(name)
        if self.llm.is_generative:
            raise ApiError(400, f"{self.settings.model_name} is {self.model_kind()}; {route} needs a "
                           "cross-encoder or an embedding model")  # fmt: skip
        if isinstance(self.engine, ClassifierEngine) and len(self.engine.labels) != 1:
            labels = self.engine.labels
            raise ApiError(400, f"{route} needs a cross-encoder with one label; {self.settings.model_name} has "
                           f"{len(labels)} ({', '.join(labels)}): use /classify")  # fmt: skip

    def _texts(self, value: str | list[str], field: str) -> list[str]:
        """``value`` as a non-empty list of valid texts within the request limit, or the 400 (413) naming ``field``."""
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ApiError(400, f"'{field}' must not be empty", param=field)
        self.check_count(len(texts), field)
        check_texts(texts, field)
        return texts

    async def _scores(
        self, first: list[str], second: list[str], fields: tuple[str, str], truncate: bool
    ) -> tuple[np.ndarray, int]:
        """The scores of the pairs ``(first[i], second[i])`` and the tokens they took."""
        if isinstance(self.engine, ClassifierEngine):
            ids, types = await run_in_threadpool(self._encode, list(zip(first, second, strict=True)), fields[1],
                                                 truncate)  # fmt: skip
            return await self.run_job(partial(ClassifyJob, ids, types, False)), sum(len(x) for x in ids)
        ids, prompt_len = await run_in_threadpool(self._embedding_ids, first, second, fields, truncate)
        vectors = await self.run_job(partial(EmbedJob, ids, prompt_len, True, None))
        n = len(first)
        # What LLM.score computes: the dot product of the normalised embeddings.
        return (vectors[:n] * vectors[n:]).sum(axis=1, dtype=np.float32), sum(len(x) for x in ids)

    def _encode(
        self, inputs: list[str] | list[tuple[str, str]], field: str, truncate: bool
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        """A classifier's token and segment ids of texts or pairs within the token limit (runs in a worker thread:
        tokenising is CPU work). Over the limit: 400 unless ``truncate``, else the longer text of a pair loses
        tokens first, as ``CrossEncoder`` truncates."""
        limit = self.token_limit(self.engine.max_length)
        ids, types, truncated = self.engine.encode(inputs, limit)
        if True in truncated and not truncate:
            i = truncated.index(True)
            what = {"documents": f"documents[{i}] with the query", "text_2": f"text_1/text_2 pair {i}"}
            raise ApiError(400, f"{what.get(field, f'{field}[{i}]')} is longer than {limit} tokens (the limit per "
                           f"input); {TRUNCATE_HINT}", param=field)  # fmt: skip
        return ids, types

    def _embedding_ids(
        self, first: list[str], second: list[str], fields: tuple[str, str], truncate: bool
    ) -> tuple[list[list[int]], int]:
        """An embedding model's token ids of ``first`` then ``second`` within the token limit, with the model's
        default prompt as ``LLM.score`` embeds them, and the prompt's length (runs in a worker thread)."""
        limit = self.token_limit(self.engine.max_seq_length)
        prompt = self.engine.prompt_text(None, None)
        ids = [
            x
            for texts, field in zip((first, second), fields, strict=True)
            for x in self.fit_texts(texts, prompt, limit, truncate, field, TRUNCATE_HINT)
        ]
        return ids, self.engine.prompt_length(prompt)

    def _usage(self, tokens: int) -> dict[str, int]:
        """The usage object, after counting ``tokens`` in the metrics."""
        self.metrics.prompt_tokens.inc(tokens)
        return {"prompt_tokens": tokens, "total_tokens": tokens}

    def _list(self, kind: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        """vLLM's list response (score, classify) around ``data``."""
        return {"id": _request_id(kind), "object": "list", "created": int(time.time()),
                "model": self.settings.model_name, "data": data, "usage": self._usage(tokens)}  # fmt: skip


def _request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"
