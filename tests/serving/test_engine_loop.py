"""The server's engine loop in-process (FastAPI's TestClient / httpx ASGI transport) on tiny zoo models:
back-pressure, a dead engine loop, and the guard metric."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

import httpx
import numpy as np
from fastapi.testclient import TestClient

from hyprec import LLM, SamplingParams
from hyprec.serving.app import build_app
from hyprec.serving.settings import ServerSettings
from tests.helpers import clean_bert, clean_llama

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = [5, 6, 7, 8]


@pytest.fixture
def llama(tmp_path):
    clean_llama(tmp_path)
    return LLM(tmp_path, max_model_len=128, num_kv_blocks=16)


def test_dead_engine_loop_fails_requests_and_health(llama):
    expected = llama.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids
    # raise_server_exceptions=False: answer like the real server does instead of re-raising in the test
    with TestClient(build_app(llama, ServerSettings("zoo")), raise_server_exceptions=False) as client:
        ok = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 0})
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["choices"][0]["logprobs"]["tokens"]) == len(expected)

        def broken_step():
            raise RuntimeError("simulated engine failure")

        llama.engine.step = broken_step
        failed = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        assert failed.status_code == 500 and "Traceback" not in failed.text
        assert failed.json()["error"]["type"] == "internal_error"
        health = client.get("/health")
        assert health.status_code == 503 and "engine is not running" in health.json()["error"]["message"]
        after = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        assert after.status_code == 503 and after.json()["error"]["type"] == "service_unavailable"


def test_concurrency_limit_answers_429(tmp_path):
    clean_bert(tmp_path)
    app = build_app(LLM(tmp_path), ServerSettings("zoo", max_concurrent_requests=1))

    async def fire():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(http.post("/v1/embeddings", json={"input": [[2, 10, 11, 3]] * 64}) for _ in range(6))
            )

    statuses = sorted(r.status_code for r in asyncio.run(fire()))
    assert statuses[0] == 200 and 429 in statuses, statuses
    rejected = next(r for r in asyncio.run(fire()) if r.status_code == 429)
    assert rejected.json()["error"]["type"] == "rate_limit_error" and "limit 1" in rejected.json()["error"]["message"]


async def _until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` on the event loop until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # yields to the requests in flight; the deadline bounds the wait


def test_queued_embedding_requests_share_one_engine_call(tmp_path):
    """Requests that arrive while the engine is busy are served together by one engine call. The engine is held
    on a gate, so this does not depend on how fast the machine is."""
    clean_bert(tmp_path)
    llm = LLM(tmp_path)
    app = build_app(llm, ServerSettings("zoo"))
    real, gate, calls = llm.engine.embed_ids, threading.Event(), []

    def gated(ids, **kwargs):
        calls.append(len(ids))
        assert gate.wait(timeout=60), "the test never opened the gate"
        return real(ids, **kwargs)

    llm.engine.embed_ids = gated
    worker = app.state.worker

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = asyncio.create_task(http.post("/v1/embeddings", json={"input": [[2, 10, 3]]}))
            await _until(lambda: calls == [1], "the first request to reach the engine")
            rest = [
                asyncio.create_task(http.post("/v1/embeddings", json={"input": [[2, 10 + i, 11, 3]] * 2}))
                for i in range(5)
            ]
            await _until(lambda: worker.jobs.qsize() == 5, "five jobs queued behind the busy engine")
            gate.set()
            return await first, await asyncio.gather(*rest), (await http.get("/metrics")).text

    first, rest, metrics = asyncio.run(scenario())
    assert first.status_code == 200 and all(r.status_code == 200 for r in rest)
    assert calls == [1, 10]  # the five queued requests (two inputs each) in one engine call
    # Each request got its own rows back: nearest to its own inputs' embeddings among all five requests' (no
    # numeric tolerance needed: the five inputs differ in one token, far more than batching can move a result).
    own = np.stack([real([[2, 10 + i, 11, 3]], prompt_len=0, normalize=None, dimensions=None)[0] for i in range(5)])
    for i, r in enumerate(rest):
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert got.shape == (2, own.shape[1])
        assert (np.abs(got[:, None, :] - own[None, :, :]).max(axis=2).argmin(axis=1) == i).all()
    assert "hyprec_batch_requests_count 2.0" in metrics and "hyprec_batch_requests_sum 6.0" in metrics


def test_guard_fallback_is_counted_in_metrics(tmp_path):
    from tests.helpers import massive_residual

    massive_residual(tmp_path)
    llm = LLM(tmp_path, dtype="float16", max_model_len=128, num_kv_blocks=16)
    with TestClient(build_app(llm, ServerSettings("zoo"))) as client:
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        metrics = client.get("/metrics").text
    assert 'hyprec_precision_guard_events_total{policy="float16",quantity="residual stream"} 1.0' in metrics
    assert 'policy="hybrid-fp16"' in metrics  # the model gauge follows the fallback


def test_streamed_requests_count_as_in_flight_until_their_last_event(tmp_path):
    from fastapi.responses import StreamingResponse

    clean_bert(tmp_path)
    app = build_app(LLM(tmp_path), ServerSettings("zoo", max_concurrent_requests=1))
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_stream():
        async def body():
            yield b"data: first\n\n"
            started.set()  # the first event went out; the request is in flight until the last one
            await release.wait()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    app.add_api_route("/v1/slow", slow_stream, methods=["GET"])

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            streaming = asyncio.create_task(http.get("/v1/slow"))
            await asyncio.wait_for(started.wait(), timeout=60)  # the stream has started, waits for its last event
            during = await http.post("/v1/embeddings", json={"input": [[2, 10, 3]]})
            release.set()
            finished = await streaming
            after = await http.post("/v1/embeddings", json={"input": [[2, 10, 3]]})
            return during, finished, after

    during, finished, after = asyncio.run(scenario())
    assert during.status_code == 429
    assert finished.status_code == 200 and finished.text.endswith("data: [DONE]\n\n")
    assert after.status_code == 200
