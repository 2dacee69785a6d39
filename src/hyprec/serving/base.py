"""What every OpenAI endpoint shares: the served model and its engine loop, the request checks, engine errors as
API errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hyprec.engine.classifier_engine import ClassifierEngine
from hyprec.engine.embedding_engine import validate_texts
from hyprec.errors import HyprecError
from hyprec.serving.api_error import ApiError
from hyprec.serving.metrics import ServerMetrics
from hyprec.serving.responses import describe_error
from hyprec.serving.settings import ServerSettings
from hyprec.serving.worker import ClassifyJob, EmbedJob, EngineWorker

if TYPE_CHECKING:
    from hyprec.entrypoints.llm import LLM


class OpenAIServing:
    """The base of the serving classes: ``llm`` served under ``settings``, its engine reached only through
    ``worker`` (the one engine thread), and the checks that every endpoint makes."""

    def __init__(self, llm: LLM, settings: ServerSettings, worker: EngineWorker, metrics: ServerMetrics) -> None:
        self.llm, self.engine, self.settings, self.worker, self.metrics = llm, llm.engine, settings, worker, metrics

    def check_model(self, name: str | None) -> None:
        """404 unless the request names the served model (or none)."""
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                           "not_found_error", "model")  # fmt: skip

    def model_kind(self) -> str:
        """What the served model is, and the routes it serves, for the 400 of a route it cannot serve."""
        if self.llm.is_generative:
            return "a generative model (use /v1/completions or /v1/chat/completions)"
        if isinstance(self.engine, ClassifierEngine):
            return "a classifier (use /rerank, /score or /classify)"
        return "an embedding model (use /v1/embeddings, /rerank or /score)"

    def check_count(self, n: int, field: str) -> None:
        """413 for more than ``max_inputs_per_request`` items in ``field``."""
        limit = self.settings.max_inputs_per_request
        if n > limit:
            raise ApiError(413, f"'{field}' has {n} items; the limit is {limit} per request", param=field)

    def engine_error(self, exc: HyprecError | TimeoutError) -> ApiError:
        """The API error for an error the engine loop gave a request (or its timeout)."""
        status, kind, message = describe_error(exc, self.settings)
        return ApiError(status, message, kind)

    async def run_job(self, job: Callable[..., EmbedJob | ClassifyJob]) -> Any:
        """The result of the job ``job(future=..., loop=...)`` builds, run by the engine loop within the request
        timeout; its error (or the timeout) as an :class:`ApiError`."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.worker.submit(job(future=future, loop=loop))
            return await asyncio.wait_for(future, self.settings.request_timeout)
        except (HyprecError, TimeoutError) as exc:
            raise self.engine_error(exc) from None

    def token_limit(self, model_limit: int) -> int:
        """Tokens per input: the model's limit, or the server's ``max_input_tokens`` where that is lower."""
        return min(self.settings.max_input_tokens or model_limit, model_limit)

    def fit_texts(
        self, texts: list[str], prompt: str, keep: int, truncate: bool, field: str, hint: str
    ) -> list[list[int]]:
        """Token ids of texts for an embedding model (``prompt`` prepended), each at most ``keep`` tokens. A text
        longer than :meth:`token_limit` is refused (400 naming the limit and ``hint``, how to ask for truncation)
        unless ``truncate``; a text cut to ``keep`` keeps its final special token, as the tokenizer does when it
        truncates."""
        limit = self.token_limit(self.engine.max_seq_length)
        ids, truncated = self.engine.tokenize_with_flags(texts, prompt)
        too_long = [i for i, (x, t) in enumerate(zip(ids, truncated, strict=True)) if t or len(x) > keep]
        if too_long and not truncate:
            raise ApiError(400, f"{field}[{too_long[0]}] is longer than {limit} tokens (the limit per input); {hint}",
                           param=field)  # fmt: skip
        return [x if len(x) <= keep else x[: keep - 1] + x[-1:] for x in ids]


def check_texts(texts: list[str], field: str) -> None:
    """400 for texts that are not valid Unicode (a JSON ``\\ud800`` escape decodes to a lone surrogate, which no
    tokenizer or response can encode), with the message the CLI gives."""
    try:
        validate_texts(texts)
    except HyprecError as exc:
        raise ApiError(400, f"'{field}': {exc}", param=field) from None


def as_batch(value: Any, field: str) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's input forms -> (texts, None) or (None, token-id lists)."""
    if isinstance(value, str):
        check_texts([value], field)
        return [value], None
    if not value:
        raise ApiError(400, f"'{field}' must not be empty", param=field)
    if all(isinstance(v, str) for v in value):
        check_texts(value, field)
        return list(value), None
    if all(isinstance(v, int) for v in value):
        return None, [list(value)]
    if all(isinstance(v, list) for v in value):
        if any(not v for v in value):
            raise ApiError(400, f"'{field}' contains an empty token-id list", param=field)
        return None, [list(v) for v in value]
    raise ApiError(400, f"'{field}': expected a string, a list of strings, or token ids", param=field)
