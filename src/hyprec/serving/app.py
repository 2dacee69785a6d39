"""The OpenAI-compatible FastAPI app: ``/v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/rerank``, ``/v1/score``, ``/v1/classify`` (each also without ``/v1``, as vLLM serves them), ``/v1/models``,
``/health``, ``/metrics`` and ``/version``.

:func:`build_app` assembles it: the state on ``app.state``, the request gate (:mod:`~hyprec.serving.guard`), the
exception handlers below and the routes (:mod:`~hyprec.serving.routes`), which delegate to the serving classes.
All engine work goes through one :class:`~hyprec.serving.worker.EngineWorker`, which batches concurrent requests
together. Every error leaves in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``); stack traces
stay in the server log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyprec.config import GENERATION_TOKEN_BUDGET
from hyprec.serving.api_error import ApiError, error_response
from hyprec.serving.completions import ServingChat, ServingCompletion
from hyprec.serving.embeddings import ServingEmbedding
from hyprec.serving.guard import RequestGuard
from hyprec.serving.metrics import ServerMetrics
from hyprec.serving.responses import INTERNAL_ERROR
from hyprec.serving.routes import router
from hyprec.serving.scores import ServingScores
from hyprec.serving.settings import ServerSettings
from hyprec.serving.shutdown import GracefulShutdown, on_termination
from hyprec.serving.worker import EngineWorker
from hyprec.version import __version__

if TYPE_CHECKING:
    from hyprec.entrypoints.llm import LLM

log = logging.getLogger("hyprec")

# Fields whose type is a union: pydantic reports one error per member; the message names the accepted forms.
UNION_FIELDS = {
    "input": "a string or a list of strings (for embeddings also a list of token ids, or of token-id lists)",
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "documents": 'a list of strings or of {"text": string} objects',
    "text_1": "a string or a list of strings",
    "text_2": "a string or a list of strings",
}


def build_app(llm: LLM, settings: ServerSettings) -> FastAPI:
    """The app serving ``llm`` under ``settings``."""
    engine = llm.engine
    metrics = ServerMetrics()
    metrics.set_model(settings.model_name, engine.policy)
    # One engine call may take more embedding tokens than one forward pass (the engine splits them into passes);
    # a turn of generation is one scheduler step.
    turn_tokens = max(engine.engine_config.max_num_batched_tokens, GENERATION_TOKEN_BUDGET)
    worker = EngineWorker(engine, metrics, max_batch_tokens=turn_tokens)

    app = FastAPI(title="hyprec", version=__version__, lifespan=lifespan)
    app.state.llm, app.state.worker, app.state.metrics, app.state.settings = llm, worker, metrics, settings
    app.state.created = int(time.time())
    app.state.shutdown = GracefulShutdown(worker, settings.shutdown_timeout)
    app.state.serving_embedding = ServingEmbedding(llm, settings, worker, metrics)
    app.state.serving_completion = ServingCompletion(llm, settings, worker, metrics)
    app.state.serving_chat = ServingChat(llm, settings, worker, metrics)
    app.state.serving_scores = ServingScores(llm, settings, worker, metrics)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
    app.include_router(router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the engine loop while the app runs; a termination signal starts the bounded shutdown."""
    state = app.state
    state.worker.start()
    restore = on_termination(state.shutdown.begin)
    yield
    restore()
    state.shutdown.cancel()
    state.worker.stop()


# ------------------------------------------------------------------ exception handlers


async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
    """An :class:`ApiError` as its response."""
    return error_response(exc.status, exc.message, exc.kind, exc.param)


async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the first field that failed validation (or the malformed JSON)."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('msg')}", "invalid_request_error")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc:
        return error_response(400, f"request body: {first.get('msg')}", "invalid_request_error")
    field = loc[0]
    if field in UNION_FIELDS and first.get("type") != "missing":  # one error per union member: say it once
        message = f"'{field}': got {first.get('input')!r:.60}; expected {UNION_FIELDS[field]}"
    else:
        message = f"'{'.'.join(loc)}': {first.get('msg')}"
    return error_response(400, message, "invalid_request_error", field)


async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404 for an unknown path, 405 for a wrong method) in OpenAI's shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), kind)


async def on_crash(_request: Request, exc: Exception) -> JSONResponse:
    """500 with a generic message for a bug; the traceback goes to the server log."""
    log.exception("hyprec: unhandled error", exc_info=exc)
    return error_response(500, INTERNAL_ERROR, "internal_error")
