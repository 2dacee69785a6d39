"""The server's routes, as thin handlers: each takes its state from ``request.app.state`` (set by
:func:`~hyprec.serving.app.build_app`) and leaves the work to a serving class, so one router serves every app.

FastAPI publishes each handler's docstring as its description in ``/openapi.json``: they are written for clients.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hyprec.serving.api_error import error_response
from hyprec.serving.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
)
from hyprec.version import __version__

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine loop runs, else 503."""
    if not request.app.state.worker.alive:
        # The cause is in the server log; exception text (paths, internals) is not for clients.
        return error_response(503, "engine is not running (see the server log)", "service_unavailable")
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> dict[str, str]:
    """hyprec's version."""
    return {"version": __version__}


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    """The server's Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model, with its current dtype policy (it changes when the precision guard falls back)."""
    state = request.app.state
    card = {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "hyprec"}
    card["policy"] = state.llm.engine.policy.name
    return {"object": "list", "data": [card]}


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """OpenAI's embeddings API: one vector per text or token-id list."""
    return await request.app.state.serving_embedding.create(req)


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> Any:
    """OpenAI's completions API: continuations of one or more prompts, whole or streamed."""
    return await request.app.state.serving_completion.create(req)


@router.post("/v1/chat/completions", response_model=None)
async def chat(req: ChatCompletionRequest, request: Request) -> Any:
    """OpenAI's chat completions API: the assistant's reply to a conversation, whole or streamed."""
    return await request.app.state.serving_chat.create(req)


@router.post("/v1/rerank")
@router.post("/rerank")
async def rerank(req: RerankRequest, request: Request) -> dict[str, Any]:
    """Cohere's and Jina's rerank API (as vLLM and TEI serve it): the documents ordered by their relevance to the
    query, best first, the first ``top_n`` of them; each with its index in the request, its score and (unless
    ``return_documents`` is false) the document. Needs a cross-encoder with one label, or an embedding model
    (cosine similarity)."""
    return await request.app.state.serving_scores.rerank(req)


@router.post("/v1/score")
@router.post("/score")
async def score(req: ScoreRequest, request: Request) -> dict[str, Any]:
    """vLLM's score API: the relevance scores of text pairs, ``text_1`` (a string) against each text of
    ``text_2``, or two lists of equal length item by item. Needs a cross-encoder with one label, or an embedding
    model (cosine similarity)."""
    return await request.app.state.serving_scores.score(req)


@router.post("/v1/classify")
@router.post("/classify")
async def classify(req: ClassifyRequest, request: Request) -> dict[str, Any]:
    """vLLM's classify API: each text's most probable label and the probability of every label. Needs a
    sequence-classification model."""
    return await request.app.state.serving_scores.classify(req)
