"""OpenAI response objects from engine outputs: embedding encodings, usage, logprobs, server-sent event streams."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from hyprec.errors import HyprecError
from hyprec.serving.protocol import error_body
from hyprec.serving.settings import ServerSettings
from hyprec.serving.worker import EngineWorker


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
    entries = []
    for token_id, lp in zip(token_ids, logprobs or [], strict=False):
        text = token_text(tok, token_id)
        entries.append(
            {
                "token": text,
                "logprob": lp.get(token_id),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": token_text(tok, t), "logprob": v, "bytes": list(token_text(tok, t).encode())}
                    for t, v in sorted(lp.items(), key=lambda kv: -kv[1])
                ],
            }
        )
    return entries


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


async def stream_completions(base, rids, updates, params, settings, worker, tok) -> AsyncIterator[dict[str, Any]]:
    sent: dict[tuple[str, int], tuple[int, int]] = {}  # (rid, index) -> (chars, tokens) already sent
    try:
        async for rid, out in stream_updates(rids, updates, settings, worker):
            p = rids.index(rid)
            for o in out.outputs:
                chars, ntok = sent.get((rid, o.index), (0, 0))
                if len(o.text) == chars and not o.finished:
                    continue
                sent[(rid, o.index)] = (len(o.text), len(o.token_ids))
                choice = {
                    "index": p * params.n + o.index,
                    "text": o.text[chars:],
                    "logprobs": completion_logprobs(o, tok, ntok) if params.logprobs is not None else None,
                    "finish_reason": o.finish_reason,
                }
                yield completion_object(base, "text_completion", settings.model_name, [choice])
    except (HyprecError, TimeoutError) as exc:
        yield error_body(str(exc) or "request timed out", "timeout" if isinstance(exc, TimeoutError) else "error", 500)


async def stream_chat(base, rid, updates, params, settings, worker, tok, logprobs) -> AsyncIterator[dict[str, Any]]:
    def chunk(index: int, delta: dict, finish: str | None, lps: list | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": {"content": lps} if lps is not None else None,
                  "finish_reason": finish}  # fmt: skip
        return completion_object(base, "chat.completion.chunk", settings.model_name, [choice])

    for i in range(params.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    sent: dict[int, tuple[int, int]] = {}
    try:
        async for _, out in stream_updates([rid], updates, settings, worker):
            for o in out.outputs:
                chars, ntok = sent.get(o.index, (0, 0))
                if len(o.text) == chars and not o.finished:
                    continue
                sent[o.index] = (len(o.text), len(o.token_ids))
                lps = chat_logprobs((o.logprobs or [])[ntok:], o.token_ids[ntok:], tok) if logprobs else None
                yield chunk(o.index, {"content": o.text[chars:]}, o.finish_reason, lps)
    except (HyprecError, TimeoutError) as exc:
        yield error_body(str(exc) or "request timed out", "timeout" if isinstance(exc, TimeoutError) else "error", 500)
