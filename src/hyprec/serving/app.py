"""The OpenAI-compatible FastAPI app: ``/v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/metrics`` and ``/version``.

Handlers validate and tokenise; all engine work goes through one :class:`~hyprec.serving.worker.EngineWorker`,
which batches concurrent requests together. Every error leaves in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``); stack traces stay in the server log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyprec import __version__
from hyprec.config import GENERATION_TOKEN_BUDGET
from hyprec.engine.embedding_engine import validate_texts
from hyprec.errors import HyprecError
from hyprec.outputs import RequestOutput
from hyprec.sampling_params import SamplingParams
from hyprec.serving.guard import RequestGuard
from hyprec.serving.metrics import ServerMetrics
from hyprec.serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, error_body
from hyprec.serving.responses import (
    INTERNAL_ERROR,
    chat_logprobs,
    completion_logprobs,
    completion_object,
    describe_error,
    encode_embedding,
    sse,
    stream_chat,
    stream_completions,
    stream_updates,
    usage,
)
from hyprec.serving.settings import ServerSettings
from hyprec.serving.worker import EmbedJob, EngineWorker, GenerateJob, ShutdownError

log = logging.getLogger("hyprec")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


# Fields whose type is a union: pydantic reports one error per member; the message names the accepted forms.
UNION_FIELDS = {
    "input": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
}


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


# ------------------------------------------------------------------ inputs


def _check_texts(texts: list[str], field: str) -> None:
    """400 for texts that are not valid Unicode (a JSON ``\\ud800`` escape decodes to a lone surrogate, which no
    tokenizer or response can encode), with the message the CLI gives."""
    try:
        validate_texts(texts)
    except HyprecError as exc:
        raise ApiError(400, f"'{field}': {exc}", param=field) from None


def _as_batch(value: Any, field: str) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's input forms -> (texts, None) or (None, token-id lists)."""
    if isinstance(value, str):
        _check_texts([value], field)
        return [value], None
    if not value:
        raise ApiError(400, f"'{field}' must not be empty", param=field)
    if all(isinstance(v, str) for v in value):
        _check_texts(value, field)
        return list(value), None
    if all(isinstance(v, int) for v in value):
        return None, [list(value)]
    if all(isinstance(v, list) for v in value):
        if any(not v for v in value):
            raise ApiError(400, f"'{field}' contains an empty token-id list", param=field)
        return None, [list(v) for v in value]
    raise ApiError(400, f"'{field}': expected a string, a list of strings, or token ids", param=field)


# ------------------------------------------------------------------ app


def build_app(llm: Any, settings: ServerSettings) -> FastAPI:
    """The app serving ``llm`` (a :class:`hyprec.LLM`) under ``settings``."""
    engine = llm.engine
    metrics = ServerMetrics()
    metrics.set_model(settings.model_name, engine.policy)
    # One engine call may take more embedding tokens than one forward pass (the engine splits them into passes);
    # a turn of generation is one scheduler step.
    turn_tokens = max(engine.engine_config.max_num_batched_tokens, GENERATION_TOKEN_BUDGET)
    worker = EngineWorker(engine, metrics, max_batch_tokens=turn_tokens)
    created = int(time.time())
    shutdown: list[asyncio.TimerHandle] = []  # the grace period's timer, once a shutdown began

    def begin_shutdown() -> None:
        """Open requests get ``shutdown_timeout`` seconds to finish; then they fail (streams with an error event),
        so a long stream cannot hold the server's exit forever."""
        if shutdown:
            return
        log.info("hyprec: shutting down; open requests get %g s to finish", settings.shutdown_timeout)
        error = ShutdownError(f"the server is shutting down (open requests got {settings.shutdown_timeout:g} s)")
        loop = asyncio.get_running_loop()
        shutdown.append(loop.call_later(settings.shutdown_timeout, worker.fail_all, error))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        restore = _on_termination(begin_shutdown)
        yield
        restore()
        for timer in shutdown:
            timer.cancel()
        worker.stop()

    app = FastAPI(title="hyprec", version=__version__, lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.settings = worker, metrics, settings
    app.state.begin_shutdown = begin_shutdown
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)

    # -------------------------------------------------------------- errors

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('msg')}", "invalid_request_error")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if not loc:
            return _error(400, f"request body: {first.get('msg')}", "invalid_request_error")
        field = loc[0]
        if field in UNION_FIELDS and first.get("type") != "missing":  # one error per union member: say it once
            message = f"'{field}': got {first.get('input')!r:.60}; expected {UNION_FIELDS[field]}"
        else:
            message = f"'{'.'.join(loc)}': {first.get('msg')}"
        return _error(400, message, "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def on_crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("hyprec: unhandled error", exc_info=exc)
        return _error(500, INTERNAL_ERROR, "internal_error")

    def engine_error(exc: HyprecError | TimeoutError) -> ApiError:
        status, kind, message = describe_error(exc, settings)
        return ApiError(status, message, kind)

    # -------------------------------------------------------------- limits, auth, metrics: see serving/guard.py

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                           "not_found_error", "model")  # fmt: skip

    def check_count(n: int, field: str) -> None:
        if n > settings.max_inputs_per_request:
            raise ApiError(413, f"'{field}' has {n} items; the limit is {settings.max_inputs_per_request} per request",
                           param=field)  # fmt: skip

    # -------------------------------------------------------------- plain routes

    @app.get("/health")
    async def health() -> Response:
        if not worker.alive:
            # The cause is in the server log; exception text (paths, internals) is not for clients.
            return _error(503, "engine is not running (see the server log)", "service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "hyprec"}
        card["policy"] = engine.policy.name
        return {"object": "list", "data": [card]}

    # -------------------------------------------------------------- embeddings

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        check_model(req.model)
        if llm.is_generative:
            raise ApiError(400, f"{settings.model_name} is a generative model; /v1/embeddings needs an embedding model")
        texts, ids = _as_batch(req.input, "input")
        check_count(len(texts or ids), "input")
        if req.dimensions is not None and req.dimensions > engine.dimension:
            raise ApiError(400, f"dimensions={req.dimensions}: this model's embeddings have {engine.dimension}",
                           param="dimensions")  # fmt: skip
        ids, prompt_len = await run_in_threadpool(_embedding_ids, engine, settings, req, texts, ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            worker.submit(EmbedJob(ids, prompt_len, req.normalize, req.dimensions, future, loop))
            vectors = await asyncio.wait_for(future, settings.request_timeout)
        except (HyprecError, TimeoutError) as exc:
            raise engine_error(exc) from None
        tokens = sum(len(x) for x in ids)
        metrics.prompt_tokens.inc(tokens)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_embedding(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # -------------------------------------------------------------- generation

    def generative() -> None:
        if not llm.is_generative:
            raise ApiError(400, f"{settings.model_name} is an embedding model; use /v1/embeddings")

    def sampling(req: CompletionRequest | ChatCompletionRequest, logprobs: int | None, max_tokens: int | None):
        try:
            return SamplingParams(max_tokens=max_tokens or 16, logprobs=logprobs, **req.sampling_kwargs())
        except HyprecError as exc:  # the message starts with the field: "temperature=1e-300: expected ..."
            field = re.match(r"\w*", str(exc)).group()
            raise ApiError(400, str(exc), param=field if field in type(req).model_fields else None) from None

    async def run(prompts: list[tuple[str | None, list[int]]], params: SamplingParams, kind: str):
        """Validate and submit every prompt; returns (response id, request ids, queue of (request id, update))."""
        for i, (_, ids) in enumerate(prompts):
            try:
                engine.validate_request(ids, params, where=f"prompt {i}" if len(prompts) > 1 else "prompt")
            except HyprecError as exc:
                raise engine_error(exc) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        base = f"{kind}-{uuid.uuid4().hex}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        for rid, (text, ids) in zip(rids, prompts, strict=True):
            try:
                worker.submit(GenerateJob(rid, text, ids, params, _Tagged(rid, updates), loop))
            except HyprecError as exc:
                raise engine_error(exc) from None
            metrics.prompt_tokens.inc(len(ids))
        return base, rids, updates

    async def finals(rids: list[str], updates: asyncio.Queue) -> dict[str, RequestOutput]:
        done: dict[str, RequestOutput] = {}
        try:
            async for rid, item in stream_updates(rids, updates, settings, worker):
                if item.finished:
                    done[rid] = item
        except (HyprecError, TimeoutError) as exc:
            raise engine_error(exc) from None
        return done

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Any:
        check_model(req.model)
        generative()
        texts, ids = _as_batch(req.prompt, "prompt")
        check_count(len(texts or ids), "prompt")
        tok = engine.tokenizer
        if texts is not None and tok is None:
            raise ApiError(400, "this model has no tokenizer; send prompts as token ids", param="prompt")
        params = sampling(req, req.logprobs, req.max_tokens)
        if texts is not None:  # tokenising is CPU work: off the event loop, which keeps serving meanwhile
            prompts = await run_in_threadpool(lambda: [(t, tok.encode(t)) for t in texts])
        else:
            prompts = [(None, x) for x in ids]
        base, rids, updates = await run(prompts, params, "cmpl")
        if req.stream:
            return sse(stream_completions(base, rids, updates, params, settings, worker, tok))
        done = await finals(rids, updates)
        choices, completion_tokens = [], 0
        for p, rid in enumerate(rids):
            for out in done[rid].outputs:
                completion_tokens += len(out.token_ids)
                choices.append(
                    {
                        "index": p * params.n + out.index,
                        "text": (prompts[p][0] or "") + out.text if req.echo else out.text,
                        "logprobs": completion_logprobs(out, tok) if req.logprobs is not None else None,
                        "finish_reason": out.finish_reason,
                    }
                )
        metrics.generation_tokens.inc(completion_tokens)
        prompt_tokens = sum(len(x) for _, x in prompts)
        return completion_object(
            base, "text_completion", settings.model_name, choices, usage(prompt_tokens, completion_tokens)
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest) -> Any:
        check_model(req.model)
        generative()
        tok = engine.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer (needed for chat)")
        messages = [m.model_dump() for m in req.messages]
        _check_texts([m["content"] for m in messages], "messages")
        try:
            # Rendering (the model's template: foreign code, budgeted) and tokenising run off the event loop.
            prompt = await run_in_threadpool(lambda: tok.chat_prompt(messages, timeout=settings.chat_template_timeout))
        except HyprecError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        top = req.top_logprobs or 0
        # Like OpenAI and vLLM, a chat reply may run to the end of the context window unless limited.
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, engine.max_model_len - len(prompt[1]) - 1)
        params = sampling(req, top if req.logprobs else None, max_tokens)
        base, rids, updates = await run([prompt], params, "chatcmpl")
        if req.stream:
            return sse(stream_chat(base, rids[0], updates, params, settings, worker, tok, req.logprobs))
        out = (await finals(rids, updates))[rids[0]]
        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
        metrics.generation_tokens.inc(completion_tokens)
        choices = [
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": {"content": chat_logprobs(o.logprobs, o.token_ids, tok)} if req.logprobs else None,
                "finish_reason": o.finish_reason,
            }
            for o in out.outputs
        ]
        return completion_object(
            base, "chat.completion", settings.model_name, choices, usage(len(prompt[1]), completion_tokens)
        )

    return app


# ------------------------------------------------------------------ helpers (module level: no app state)


def _on_termination(callback: Callable[[], None]) -> Callable[[], None]:
    """Also run ``callback`` (on this event loop) when SIGTERM or SIGINT arrives, before the handler the server
    installed (uvicorn's: stop accepting, then wait for open requests, however long they take). Returns the
    function that restores that handler.

    Nothing is chained where there is no such handler (default or ignored signals: no graceful wait to bound) or
    outside the main thread (only it may set handlers: hosts such as Ray Serve run the app elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    chained: dict[int, tuple[Any, Any]] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous) or previous is signal.default_int_handler:
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(callback)  # a signal handler may interrupt the loop anywhere: schedule
            previous(signum, frame)

        signal.signal(sig, handler)
        chained[sig] = (handler, previous)

    def restore() -> None:
        for sig, (handler, previous) in chained.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return restore


class _Tagged:
    """An ``asyncio.Queue`` facade that tags each update with its request id (several prompts share a queue)."""

    def __init__(self, rid: str, queue: asyncio.Queue):
        self.rid, self.queue = rid, queue

    def put_nowait(self, item: Any) -> None:
        self.queue.put_nowait((self.rid, item))


def _embedding_ids(
    engine: Any, settings: ServerSettings, req: EmbeddingRequest, texts: list[str] | None, ids: list[list[int]] | None
) -> tuple[list[list[int]], int]:
    """Token ids of an embedding request within the token limits (runs in a worker thread: tokenising is CPU work)."""
    limit = min(settings.max_input_tokens or engine.max_seq_length, engine.max_seq_length)
    keep = min(req.truncate_prompt_tokens or limit, limit)
    try:
        prompt = engine.prompt_text(req.prompt_name, None)
    except HyprecError as exc:
        raise ApiError(400, str(exc), param="prompt_name") from None
    if texts is not None:
        ids, truncated = engine.tokenize_with_flags(texts, prompt)
        too_long = [i for i, (x, t) in enumerate(zip(ids, truncated, strict=True)) if t or len(x) > keep]
        if too_long and req.truncate_prompt_tokens is None:
            raise ApiError(400, f"input[{too_long[0]}] is longer than {limit} tokens (the limit per input); "
                           "set truncate_prompt_tokens to truncate", param="input")  # fmt: skip
        # Keep the final special token when truncating further, as the tokenizer itself does.
        ids = [x if len(x) <= keep else x[: keep - 1] + x[-1:] for x in ids]
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
