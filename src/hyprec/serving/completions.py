"""``/v1/completions`` and ``/v1/chat/completions``: :class:`ServingCompletion` and :class:`ServingChat`, on what
they share (:class:`ServingGeneration`)."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

from fastapi.concurrency import run_in_threadpool

from hyprec.errors import HyprecError
from hyprec.outputs import RequestOutput
from hyprec.sampling_params import SamplingParams
from hyprec.serving.api_error import ApiError
from hyprec.serving.base import OpenAIServing, as_batch, check_texts
from hyprec.serving.protocol import ChatCompletionRequest, CompletionRequest
from hyprec.serving.responses import (
    chat_logprobs,
    completion_logprobs,
    completion_object,
    sse,
    stream_chat,
    stream_completions,
    stream_updates,
    usage,
)
from hyprec.serving.worker import GenerateJob


class _Tagged:
    """An ``asyncio.Queue`` facade that tags each update with its request id (several prompts share a queue)."""

    def __init__(self, rid: str, queue: asyncio.Queue):
        self.rid, self.queue = rid, queue

    def put_nowait(self, item: Any) -> None:
        self.queue.put_nowait((self.rid, item))


class ServingGeneration(OpenAIServing):
    """What completions and chat share: the generative-model check, the sampling parameters, submitting prompts
    to the engine loop, and collecting their final outputs."""

    def check_generative(self) -> None:
        """400 when the served model embeds or classifies rather than generates."""
        if not self.llm.is_generative:
            raise ApiError(400, f"{self.settings.model_name} is {self.model_kind()}")

    def sampling_params(
        self, req: CompletionRequest | ChatCompletionRequest, logprobs: int | None, max_tokens: int | None
    ) -> SamplingParams:
        """``req``'s sampling parameters; 400 naming the field for a value the sampler does not accept."""
        try:
            return SamplingParams(max_tokens=max_tokens or 16, logprobs=logprobs, **req.sampling_kwargs())
        except HyprecError as exc:  # the message starts with the field: "temperature=1e-300: expected ..."
            field = re.match(r"\w*", str(exc)).group()
            raise ApiError(400, str(exc), param=field if field in type(req).model_fields else None) from None

    def submit_prompts(
        self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, kind: str
    ) -> tuple[str, list[str], asyncio.Queue]:
        """Validate and submit every prompt; returns (response id, request ids, queue of (request id, update))."""
        for i, (_, ids) in enumerate(prompts):
            try:
                self.engine.validate_request(ids, params, where=f"prompt {i}" if len(prompts) > 1 else "prompt")
            except HyprecError as exc:
                raise self.engine_error(exc) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        base = f"{kind}-{uuid.uuid4().hex}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        for rid, (text, ids) in zip(rids, prompts, strict=True):
            try:
                self.worker.submit(GenerateJob(rid, text, ids, params, _Tagged(rid, updates), loop))
            except HyprecError as exc:
                raise self.engine_error(exc) from None
            self.metrics.prompt_tokens.inc(len(ids))
        return base, rids, updates

    async def finals(self, rids: list[str], updates: asyncio.Queue) -> dict[str, RequestOutput]:
        """The final output of each request in ``rids``, once all of them finished."""
        done: dict[str, RequestOutput] = {}
        try:
            async for rid, item in stream_updates(rids, updates, self.settings, self.worker):
                if item.finished:
                    done[rid] = item
        except (HyprecError, TimeoutError) as exc:
            raise self.engine_error(exc) from None
        return done


class ServingCompletion(ServingGeneration):
    """``/v1/completions``: one or more prompts (texts or token ids), answered whole or as a stream."""

    async def create(self, req: CompletionRequest) -> Any:
        """The response to ``req`` (a dict, or a streaming response); :class:`ApiError` for a request that cannot
        be served."""
        self.check_model(req.model)
        self.check_generative()
        texts, ids = as_batch(req.prompt, "prompt")
        self.check_count(len(texts or ids), "prompt")
        tok = self.engine.tokenizer
        if texts is not None and tok is None:
            raise ApiError(400, "this model has no tokenizer; send prompts as token ids", param="prompt")
        params = self.sampling_params(req, req.logprobs, req.max_tokens)
        if texts is not None:  # tokenising is CPU work: off the event loop, which keeps serving meanwhile
            prompts = await run_in_threadpool(lambda: [(t, tok.encode(t)) for t in texts])
        else:
            prompts = [(None, x) for x in ids]
        base, rids, updates = self.submit_prompts(prompts, params, "cmpl")
        if req.stream:
            return sse(stream_completions(base, rids, updates, params, self.settings, self.worker, tok))
        done = await self.finals(rids, updates)
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
        self.metrics.generation_tokens.inc(completion_tokens)
        prompt_tokens = sum(len(x) for _, x in prompts)
        return completion_object(
            base, "text_completion", self.settings.model_name, choices, usage(prompt_tokens, completion_tokens)
        )


class ServingChat(ServingGeneration):
    """``/v1/chat/completions``: messages rendered by the model's chat template, answered whole or as a stream."""

    async def create(self, req: ChatCompletionRequest) -> Any:
        """The response to ``req`` (a dict, or a streaming response); :class:`ApiError` for a request that cannot
        be served."""
        self.check_model(req.model)
        self.check_generative()
        tok = self.engine.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer (needed for chat)")
        messages = [m.model_dump() for m in req.messages]
        check_texts([m["content"] for m in messages], "messages")
        timeout = self.settings.chat_template_timeout
        try:
            # Rendering (the model's template: foreign code, budgeted) and tokenising run off the event loop.
            prompt = await run_in_threadpool(lambda: tok.chat_prompt(messages, timeout=timeout))
        except HyprecError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        top = req.top_logprobs or 0
        # Like OpenAI and vLLM, a chat reply may run to the end of the context window unless limited.
        max_tokens = (
            req.max_completion_tokens or req.max_tokens or max(1, self.engine.max_model_len - len(prompt[1]) - 1)
        )
        params = self.sampling_params(req, top if req.logprobs else None, max_tokens)
        base, rids, updates = self.submit_prompts([prompt], params, "chatcmpl")
        if req.stream:
            return sse(stream_chat(base, rids[0], updates, params, self.settings, self.worker, tok, req.logprobs))
        out = (await self.finals(rids, updates))[rids[0]]
        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
        self.metrics.generation_tokens.inc(completion_tokens)
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
            base, "chat.completion", self.settings.model_name, choices, usage(len(prompt[1]), completion_tokens)
        )
