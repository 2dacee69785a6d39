"""OpenAI response objects from engine outputs: embedding encodings, usage, logprobs, server-sent event streams."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from hyprec.errors import HyprecError, NonFiniteOutputError
from hyprec.serving.protocol import error_body
from hyprec.serving.settings import ServerSettings
from hyprec.serving.worker import EngineWorker, UnavailableError

log = logging.getLogger("hyprec")
INTERNAL_ERROR = "internal server error (see the server log)"


def describe_error(exc: BaseException, settings: ServerSettings) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) for the error a request ended with. Errors that are not hyprec's
    own are bugs: the client gets a generic message, the details stay in the server log."""
    if isinstance(exc, TimeoutError):
        return 504, "timeout", f"request timed out after {settings.request_timeout:g} s"
    if isinstance(exc, UnavailableError):
        return 503, "service_unavailable", str(exc)
    if isinstance(exc, NonFiniteOutputError):
        return 500, "numerical_error", str(exc)
    if isinstance(exc, HyprecError):
        return 400, "invalid_request_error", str(exc)
    return 500, "internal_error", INTERNAL_ERROR


def encode_embedding(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai client decodes: little-endian float32
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return vector.tolist()


def completion_object(
    request_id: str, kind: str, model: str, choices: list[dict[str, Any]], tokens: dict[str, int] | None = None
) -> dict[str, Any]:
    """A completion, chat completion, or one streamed chunk of either."""
    out = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if tokens is not None:
        out["usage"] = tokens
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_text(tok: Any, token_id: int) -> str:
    return tok.decode([token_id]) if tok is not None else str(token_id)


def completion_logprobs(out: Any, tok: Any, start: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for tokens ``start..`` of a completion."""
    tokens, chosen, tops = [], [], []
    for token_id, lp in zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=False):
        tokens.append(token_text(tok, token_id))
        chosen.append(lp.get(token_id))
        tops.append({token_text(tok, t): v for t, v in lp.items()})
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": []}


def chat_logprobs(logprobs: list[dict[int, float]] | None, token_ids: list[int], tok: Any) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` entries: each chosen token with its top alternatives, best first."""

    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def best_first(lp: dict[int, float]) -> list[dict[str, Any]]:
        return [entry(t, v) for t, v in sorted(lp.items(), key=lambda kv: -kv[1])]

    return [
        {**entry(token_id, lp.get(token_id)), "top_logprobs": best_first(lp)}
        for token_id, lp in zip(token_ids, logprobs or [], strict=False)
    ]


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def stream_updates(rids: list[str], updates: asyncio.Queue, settings: ServerSettings, worker: EngineWorker):
    """Yield (rid, RequestOutput) until every request finished; errors end the stream with an error event."""
    finished: set[str] = set()
    try:
        async with asyncio.timeout(settings.request_timeout):
            while len(finished) < len(rids):
                rid, item = await updates.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finished.add(rid)
                yield rid, item
    finally:  # finished, failed, timed out, or the client went away
        for rid in rids:
            if rid not in finished:
                worker.abort(rid)


async def _deltas(rids: list[str], updates: asyncio.Queue, settings: ServerSettings, worker: EngineWorker):
    """Per completion, what is new since the last event: yields (rid, completion, new text, first new token)."""
    sent: dict[tuple[str, int], tuple[int, int]] = {}  # (rid, index) -> (chars, tokens) already sent
    async for rid, out in stream_updates(rids, updates, settings, worker):
        for o in out.outputs:
            chars, ntok = sent.get((rid, o.index), (0, 0))
            if len(o.text) == chars and not o.finished:
                continue
            sent[(rid, o.index)] = (len(o.text), len(o.token_ids))
            yield rid, o, o.text[chars:], ntok


def _stream_error(exc: Exception, settings: ServerSettings) -> dict[str, Any]:
    """The last event of a stream that failed, timed out or was cut by a shutdown (the status line has already
    been sent, so the error travels as an event)."""
    if not isinstance(exc, (HyprecError, TimeoutError)):
        log.error("hyprec: stream failed", exc_info=exc)
    status, kind, message = describe_error(exc, settings)
    return error_body(message, kind, status)


async def stream_completions(base, rids, updates, params, settings, worker, tok) -> AsyncIterator[dict[str, Any]]:
    try:
        async for rid, o, text, ntok in _deltas(rids, updates, settings, worker):
            choice = {
                "index": rids.index(rid) * params.n + o.index,
                "text": text,
                "logprobs": completion_logprobs(o, tok, ntok) if params.logprobs is not None else None,
                "finish_reason": o.finish_reason,
            }
            yield completion_object(base, "text_completion", settings.model_name, [choice])
    except Exception as exc:  # whatever ends it, a stream ends with an error event
        yield _stream_error(exc, settings)


async def stream_chat(base, rid, updates, params, settings, worker, tok, logprobs) -> AsyncIterator[dict[str, Any]]:
    def chunk(index: int, delta: dict, finish: str | None, lps: list | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": {"content": lps} if lps is not None else None,
                  "finish_reason": finish}  # fmt: skip
        return completion_object(base, "chat.completion.chunk", settings.model_name, [choice])

    for i in range(params.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    try:
        async for _, o, text, ntok in _deltas([rid], updates, settings, worker):
            lps = chat_logprobs((o.logprobs or [])[ntok:], o.token_ids[ntok:], tok) if logprobs else None
            yield chunk(o.index, {"content": text}, o.finish_reason, lps)
    except Exception as exc:  # whatever ends it, a stream ends with an error event
        yield _stream_error(exc, settings)
