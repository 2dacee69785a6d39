"""``/rerank``, ``/score`` and ``/classify`` (issue 13) in-process (FastAPI's TestClient, httpx's ASGI transport):
a tiny random cross-encoder (one label), a tiny three-label classifier, all-MiniLM-L6-v2 (a bi-encoder: cosine
scores) and a tiny Llama (refused). Results must equal ``LLM.rerank``/``score``/``classify`` called directly."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

import httpx
from fastapi.testclient import TestClient

from hyprec import LLM
from hyprec.errors import NonFiniteOutputError
from hyprec.serving.app import build_app
from hyprec.serving.settings import ServerSettings
from tests.helpers import RERANK_DOCUMENTS as DOCUMENTS
from tests.helpers import RERANK_QUERY as QUERY
from tests.helpers import clean_llama, tiny_cross_encoder

pytestmark = pytest.mark.usefixtures("single_thread")
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_INPUTS = 8
LONG = " ".join(["half precision overflows above sixty five thousand"] * 30)  # ~240 tokens, beyond 128


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    clean_llama(root / "llama")
    # 128 positions: an over-long input is easy to write
    ce = tiny_cross_encoder(root / "ce", positions=128)
    return {"ce": ce, "cls": tiny_cross_encoder(root / "cls", labels=3, positions=128), "llama": root / "llama"}


@pytest.fixture(scope="module")
def ce(models) -> LLM:
    return LLM(models["ce"])


@pytest.fixture(scope="module")
def cls(models) -> LLM:
    return LLM(models["cls"])


def _client(llm: LLM, name: str, **limits) -> TestClient:
    settings = ServerSettings(name, api_key=KEY, max_inputs_per_request=MAX_INPUTS, **limits)
    return TestClient(build_app(llm, settings), headers=AUTH, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def clients(models, ce, cls, minilm_fp32) -> Iterator[dict[str, TestClient]]:
    """A running app per model, by the name it serves it under."""
    llama = LLM(models["llama"], max_model_len=128, num_kv_blocks=16)
    with contextlib.ExitStack() as stack:
        llms = {"ce": ce, "cls": cls, "minilm": minilm_fp32, "llama": llama}
        yield {name: stack.enter_context(_client(llm, name)) for name, llm in llms.items()}


@pytest.fixture(scope="module")
def ce_client(clients) -> TestClient:
    return clients["ce"]


def _tokens(llm: LLM, inputs: list) -> int:
    return sum(len(x) for x in llm.engine.encode(inputs)[0])


# ------------------------------------------------------------------ results equal the Python API's


def test_cohere_shaped_rerank_equals_llm_rerank(ce_client, ce):
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1], "id": "ignored"}, *DOCUMENTS[2:]]
    response = ce_client.post("/v1/rerank", json={"model": "ce", "query": QUERY, "documents": documents})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "ce" and body["id"].startswith("rerank-")
    expected = ce.rerank(QUERY, DOCUMENTS, return_documents=True)
    # Exact: the same engine runs the same token ids in the same batches (one request alone in its turn).
    assert body["results"] == [
        {"index": r.index, "relevance_score": r.relevance_score, "document": {"text": r.document}} for r in expected
    ]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    tokens = _tokens(ce, [(QUERY, d) for d in DOCUMENTS])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize(("top_n", "kept"), [(2, 2), (0, 4), (None, 4), (10, 4)])
def test_top_n_and_return_documents(ce_client, ce, top_n, kept):
    body = {"query": QUERY, "documents": DOCUMENTS, "return_documents": False, "top_n": top_n}
    results = ce_client.post("/rerank", json=body).json()["results"]
    expected = ce.rerank(QUERY, DOCUMENTS, top_n=top_n or None)
    assert len(results) == kept
    assert results == [{"index": r.index, "relevance_score": r.relevance_score} for r in expected]


@pytest.mark.parametrize(
    ("text_1", "text_2"),
    [(QUERY, DOCUMENTS), (DOCUMENTS, DOCUMENTS[::-1]), (QUERY, DOCUMENTS[0]), ([QUERY], [DOCUMENTS[1]])],
)
@pytest.mark.parametrize("route", ["/score", "/v1/score"])
def test_score_equals_llm_score(ce_client, ce, route, text_1, text_2):
    response = ce_client.post(route, json={"text_1": text_1, "text_2": text_2})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = ce.score(text_1, text_2)
    assert body["object"] == "list" and body["model"] == "ce" and body["id"].startswith("score-")
    assert isinstance(body["created"], int)
    assert body["data"] == [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(expected)]
    n = len(expected)
    pairs = list(zip(*([t] * n if isinstance(t, str) else t for t in (text_1, text_2)), strict=True))
    assert body["usage"]["total_tokens"] == _tokens(ce, pairs)


@pytest.mark.parametrize("route", ["/classify", "/v1/classify"])
def test_classify_equals_llm_classify(clients, cls, ce, route):
    body = clients["cls"].post(route, json={"input": DOCUMENTS}).json()
    assert body["object"] == "list" and body["id"].startswith("classify-")
    expected = cls.classify(DOCUMENTS)
    assert body["data"] == [
        {"index": i, "label": o.label, "probs": o.probs, "num_classes": 3} for i, o in enumerate(expected)
    ]
    assert body["usage"]["prompt_tokens"] == _tokens(cls, DOCUMENTS)
    one = clients["ce"].post(route, json={"input": DOCUMENTS[0]}).json()["data"]  # a one-label model: sigmoid
    assert one == [{"index": 0, "label": "LABEL_0", "probs": ce.classify(DOCUMENTS[0])[0].probs, "num_classes": 1}]


def test_a_bi_encoder_scores_by_cosine(clients, minilm_fp32):
    # The server embeds both sides in one engine call, LLM.score in two: other batches can change float32 sums in
    # their last bits, so 1e-6 (a few float32 units of a cosine) rather than equality.
    scored = clients["minilm"].post("/score", json={"text_1": QUERY, "text_2": DOCUMENTS}).json()
    got = [d["score"] for d in scored["data"]]
    np.testing.assert_allclose(got, minilm_fp32.score(QUERY, DOCUMENTS), rtol=0, atol=1e-6)
    assert scored["usage"]["total_tokens"] == sum(len(x) for x in minilm_fp32.engine.tokenize([QUERY] * 4 + DOCUMENTS))
    results = clients["minilm"].post("/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()["results"]
    expected = minilm_fp32.rerank(QUERY, DOCUMENTS)
    assert [r["index"] for r in results] == [r.index for r in expected]
    np.testing.assert_allclose([r["relevance_score"] for r in results], [r.relevance_score for r in expected],
                               rtol=0, atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------ over-long inputs


def test_over_long_pairs_are_refused_unless_truncation_is_asked(ce_client, ce):
    documents = [DOCUMENTS[0], LONG]
    refused = ce_client.post("/rerank", json={"query": QUERY, "documents": documents})
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "message": 'documents[1] with the query is longer than 128 tokens (the limit per input); set "truncate": '
        "true to truncate",
        "type": "invalid_request_error",
        "param": "documents",
        "code": 400,
    }
    ok = ce_client.post("/rerank", json={"query": QUERY, "documents": documents, "truncate": True}).json()
    expected = ce.rerank(QUERY, documents)  # truncated to max_length, as CrossEncoder does
    assert [(r["index"], r["relevance_score"]) for r in ok["results"]] == [
        (r.index, r.relevance_score) for r in expected
    ]
    assert ok["usage"]["total_tokens"] == _tokens(ce, [(QUERY, DOCUMENTS[0])]) + 128
    scored = ce_client.post("/score", json={"text_1": QUERY, "text_2": documents})
    assert "text_1/text_2 pair 1 is longer than 128 tokens" in scored.json()["error"]["message"]
    classified = ce_client.post("/classify", json={"input": ["short", LONG]})
    assert "input[1] is longer than 128 tokens" in classified.json()["error"]["message"]


def test_the_server_token_limit_applies_to_pairs(ce):
    with _client(ce, "ce", max_input_tokens=16) as client:
        refused = client.post("/score", json={"text_1": QUERY, "text_2": DOCUMENTS[:2]})
        assert "longer than 16 tokens" in refused.json()["error"]["message"]
        ok = client.post("/score", json={"text_1": QUERY, "text_2": DOCUMENTS[:2], "truncate": True}).json()
    ids, types, _ = ce.engine.encode([(QUERY, d) for d in DOCUMENTS[:2]], 16)
    assert ok["usage"]["total_tokens"] == 32 and all(len(x) == 16 for x in ids)
    expected = ce.engine.scores(ce.engine.logits_ids(ids, types))
    assert [d["score"] for d in ok["data"]] == expected.tolist()


# ------------------------------------------------------------------ bad requests


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "words"),
    [
        ("/rerank", {"query": QUERY, "documents": []}, 400, "documents", "'documents' must not be empty"),
        ("/rerank", {"query": QUERY, "documents": ["d"] * (MAX_INPUTS + 1)}, 413, "documents",
         f"'documents' has 9 items; the limit is {MAX_INPUTS} per request"),
        ("/rerank", {"documents": ["d"]}, 400, "query", "Field required"),
        ("/rerank", {"query": 5, "documents": ["d"]}, 400, "query", "valid string"),
        ("/rerank", {"query": QUERY, "documents": "d"}, 400, "documents", 'of {"text": string} objects'),
        ("/rerank", {"query": QUERY, "documents": [5]}, 400, "documents", 'of {"text": string} objects'),
        ("/rerank", {"query": QUERY, "documents": [{"txt": "d"}]}, 400, "documents", 'of {"text": string} objects'),
        ("/rerank", {"query": QUERY, "documents": ["d"], "top_n": -1}, 400, "top_n", "greater than or equal to 0"),
        ("/rerank", {"query": QUERY, "documents": ["d"], "return_documents": "no"}, 400, "return_documents",
         "valid boolean"),
        ("/rerank", {"query": QUERY, "documents": ["d"], "model": "gpt-4"}, 404, "model", "does not exist"),
        ("/score", {"text_1": DOCUMENTS[:3], "text_2": DOCUMENTS[:2]}, 400, "text_2",
         "text_1 has 3 texts and text_2 2; expected as many"),
        ("/score", {"text_1": DOCUMENTS[:2], "text_2": QUERY}, 400, "text_2", "text_1 has 2 texts and text_2 1"),
        ("/score", {"text_1": QUERY, "text_2": []}, 400, "text_2", "'text_2' must not be empty"),
        ("/score", {"text_1": 5, "text_2": "d"}, 400, "text_1", "expected a string or a list of strings"),
        ("/score", {"text_1": "q"}, 400, "text_2", "Field required"),
        ("/score", {"text_1": ["q"] * (MAX_INPUTS + 1), "text_2": ["d"] * (MAX_INPUTS + 1)}, 413, "text_1",
         f"the limit is {MAX_INPUTS}"),
        ("/classify", {"input": []}, 400, "input", "'input' must not be empty"),
        ("/classify", {"input": [1, 2]}, 400, "input", "expected a string or a list of strings"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_shaped_errors(ce_client, route, body, status, param, words):
    response = ce_client.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param and error["type"]
    assert words in error["message"], error["message"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/rerank", '{"query": "\\ud800", "documents": ["d"]}', "query"),
        ("/rerank", '{"query": "q", "documents": ["d", {"text": "\\udfff"}]}', "documents"),
        ("/score", '{"text_1": "q", "text_2": ["\\ud800"]}', "text_2"),
        ("/classify", '{"input": "\\ud800"}', "input"),
    ],
)
def test_lone_surrogates_get_400(ce_client, route, body, param):
    response = ce_client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert "is not valid Unicode" in response.json()["error"]["message"]


MULTI_LABEL = "needs a cross-encoder with one label; cls has 3 (LABEL_0, LABEL_1, LABEL_2): use /classify"
GENERATIVE = "llama is a generative model (use /v1/completions or /v1/chat/completions); "
SCORERS = "needs a cross-encoder or an embedding model"
CLASSIFIER = "cls is a classifier (use /rerank, /score or /classify)"


@pytest.mark.parametrize(
    ("client", "route", "body", "message"),
    [
        ("cls", "/rerank", {"query": QUERY, "documents": DOCUMENTS}, f"/rerank {MULTI_LABEL}"),
        ("cls", "/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS}, f"/score {MULTI_LABEL}"),
        ("cls", "/v1/embeddings", {"input": QUERY}, f"{CLASSIFIER}; /v1/embeddings needs an embedding model"),
        ("cls", "/v1/completions", {"prompt": QUERY}, CLASSIFIER),
        ("minilm", "/classify", {"input": QUERY},
         "minilm is an embedding model (use /v1/embeddings, /rerank or /score); /classify needs a "
         "sequence-classification model"),
        ("llama", "/classify", {"input": QUERY}, f"{GENERATIVE}/classify needs a sequence-classification model"),
        ("llama", "/rerank", {"query": QUERY, "documents": DOCUMENTS}, f"{GENERATIVE}/rerank {SCORERS}"),
        ("llama", "/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS}, f"{GENERATIVE}/score {SCORERS}"),
    ],
)  # fmt: skip
def test_models_that_cannot_serve_a_route_get_400(clients, client, route, body, message):
    response = clients[client].post(route, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == message


# ------------------------------------------------------------------ the gate, metrics, the engine loop


def test_unversioned_routes_are_gated_and_counted(ce_client):
    for route in ("/rerank", "/score", "/classify", "/v1/rerank"):
        assert ce_client.post(route, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401, route
    assert ce_client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS[:1]}).status_code == 200
    assert ce_client.post("/v1/score", json={"text_1": QUERY, "text_2": "d"}).status_code == 200
    metrics = ce_client.get("/metrics").text
    assert 'hyprec_requests_total{endpoint="/rerank",status="200"}' in metrics
    assert 'hyprec_requests_total{endpoint="unauthenticated",status="401"}' in metrics
    assert 'hyprec_request_latency_seconds_count{endpoint="/v1/score"}' in metrics
    assert "hyprec_prompt_tokens_total" in metrics


def test_queued_jobs_share_one_engine_call_and_a_failing_one_fails_alone(models):
    """Rerank, score and classify requests that queue while the engine is busy run as one engine call; when that
    call fails, each job is retried alone and only the one that caused it fails (here a simulated non-finite
    result). The engine is held on a gate, so this does not depend on the machine's speed."""
    llm = LLM(models["ce"], dtype="float32")
    app = build_app(llm, ServerSettings("ce"))
    real, gate, calls = llm.engine.logits_ids, threading.Event(), []
    poison = llm.engine.encode(["poison"])[0][0]

    def gated(ids, types, **kwargs):
        calls.append(len(ids))
        assert gate.wait(timeout=60), "the test never opened the gate"
        if poison in ids:
            raise NonFiniteOutputError("non-finite logits for inputs [0] (simulated)")
        return real(ids, types, **kwargs)

    llm.engine.logits_ids = gated
    bodies = [
        ("/rerank", {"query": QUERY, "documents": DOCUMENTS}),
        ("/score", {"text_1": QUERY, "text_2": DOCUMENTS[:2]}),
        ("/classify", {"input": ["poison"]}),
        ("/classify", {"input": DOCUMENTS[:3]}),
    ]

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = asyncio.create_task(http.post("/classify", json={"input": "first"}))
            while calls != [1]:
                await asyncio.sleep(0.01)  # until the first request holds the engine
            rest = [asyncio.create_task(http.post(route, json=body)) for route, body in bodies]
            while app.state.worker.jobs.qsize() < len(bodies):
                await asyncio.sleep(0.01)
            gate.set()
            return await first, await asyncio.gather(*rest)

    first, (reranked, scored, poisoned, classified) = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert first.status_code == 200
    # One call for all four, then each alone (in the order they reached the queue: tokenising runs in threads).
    assert calls[:2] == [1, 10] and sorted(calls[2:]) == [1, 2, 3, 4]
    assert poisoned.status_code == 500 and poisoned.json()["error"]["type"] == "numerical_error"
    # Exact: after the failed call each job ran alone, as the Python API runs the same inputs.
    llm.engine.logits_ids = real
    np.testing.assert_array_equal([r["relevance_score"] for r in reranked.json()["results"]],
                                  [r.relevance_score for r in llm.rerank(QUERY, DOCUMENTS)])  # fmt: skip
    np.testing.assert_array_equal([d["score"] for d in scored.json()["data"]], llm.score(QUERY, DOCUMENTS[:2]))
    assert [d["probs"] for d in classified.json()["data"]] == [o.probs for o in llm.classify(DOCUMENTS[:3])]
