"""``hyprec serve`` with an embedding model: the real server in a subprocess, real clients (``openai``, httpx)."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers import assert_same_rows, running_server  # noqa: E402

KEY = "test-key"
MAX_INPUTS = 32
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def url():
    with running_server("minilm", "--api-key", KEY, "--max-inputs-per-request", str(MAX_INPUTS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(minilm_hybrid):
    return minilm_hybrid  # the same default policy the server resolves


@pytest.fixture(scope="module")
def texts(eval_texts, offline) -> list[str]:
    """20 texts of mixed length, all within the model's 256 tokens (longer ones are refused unless truncation is
    asked for; see test_truncate_prompt_tokens)."""
    fits = [t for t, ids in zip(eval_texts, offline.engine.tokenize(eval_texts), strict=True) if len(ids) < 256]
    return fits[::5][:20]


def _post(url: str, body: object, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    return httpx.post(f"{url}/v1/embeddings", content=data, headers=headers, timeout=60)


def test_openai_client_float_embeddings_equal_llm_embed(client, offline, texts):
    response = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert [d.index for d in response.data] == list(range(len(texts)))
    assert_same_rows(got, offline.embed(texts))
    tokens = sum(len(x) for x in offline.engine.tokenize(texts))
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_base64_embeddings_equal_llm_embed(client, url, offline, texts):
    # The openai client asks for base64 by default and decodes it itself.
    decoded = client.embeddings.create(model="minilm", input=texts[:5])
    got = np.array([d.embedding for d in decoded.data], dtype=np.float32)
    raw = _post(url, {"model": "minilm", "input": texts[:5], "encoding_format": "base64"}).json()
    from_raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    expected = offline.embed(texts[:5])
    assert_same_rows(got, expected)
    assert_same_rows(from_raw, expected)


def test_token_id_inputs_and_pooling_options(client, offline, texts):
    ids = offline.engine.tokenize(texts[:3])
    many = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    assert_same_rows(np.array([d.embedding for d in many.data], dtype=np.float32), offline.embed(texts[:3]))
    one = client.embeddings.create(model="minilm", input=ids[0], encoding_format="float")
    assert_same_rows(np.array([one.data[0].embedding], dtype=np.float32), offline.embed(texts[:1]))
    short = client.embeddings.create(model="minilm", input=texts[:2], dimensions=64, encoding_format="float")
    vectors = np.array([d.embedding for d in short.data])
    assert vectors.shape == (2, 64)
    assert_same_rows(vectors.astype(np.float32), offline.embed(texts[:2], dimensions=64))
    raw = client.embeddings.create(
        model="minilm", input=texts[:2], encoding_format="float", extra_body={"normalize": False}
    )
    assert_same_rows(np.array([d.embedding for d in raw.data], dtype=np.float32), offline.embed(texts[:2]))


def test_truncate_prompt_tokens(url, offline, eval_texts):
    long_text = max(eval_texts, key=len)
    refused = _post(url, {"input": [long_text]})
    assert refused.status_code == 400
    assert "longer than 256 tokens" in refused.json()["error"]["message"]
    ok = _post(url, {"input": [long_text], "truncate_prompt_tokens": 16, "encoding_format": "float"})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 16
    ids = offline.engine.tokenize([long_text])[0]
    expected = offline.engine.embed_ids([ids[:15] + ids[-1:]])
    assert_same_rows(np.array([ok.json()["data"][0]["embedding"]], dtype=np.float32), expected)


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ("{not json", 400, None, "malformed JSON"),
        ({"model": "minilm"}, 400, "input", "Field required"),
        ({"input": 5}, 400, "input", "expected a string"),
        ({"input": [1, "a"]}, 400, "input", "expected a string"),
        ({"input": []}, 400, "input", "must not be empty"),
        ({"input": [[]]}, 400, "input", "empty token-id list"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, 413, "input", f"limit is {MAX_INPUTS}"),
        ({"input": [[5] * 300]}, 400, "input", "limit per input is 256"),
        ({"input": [[10**9]]}, 400, "input", "token ids must lie in"),
        ({"input": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions", "greater than or equal to 1"),
        ({"input": "x", "dimensions": 4096}, 400, "dimensions", "have 384"),
        ({"input": "x", "dimensions": "64"}, 400, "dimensions", "valid integer"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "'float' or 'base64'"),
        ({"input": "x", "prompt_name": "query"}, 400, "prompt_name", "not defined by this model"),
        ({"input": "x", "normalize": "yes"}, 400, "normalize", "valid boolean"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(url, body, status, param, words):
    response = _post(url, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param
    assert words in error["message"]
    assert "Traceback" not in response.text


def test_auth_health_models_version_metrics(url, client):
    assert _post(url, {"input": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}).json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # no key needed outside /v1
    assert httpx.get(f"{url}/version").json()["version"]
    assert [m.id for m in client.models.list().data] == ["minilm"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'hyprec_model_info{attn_dtype="float16",compute_dtype="float32"' in metrics
    assert 'policy="hybrid-fp16"' in metrics
    assert 'hyprec_requests_total{endpoint="/v1/embeddings",status="200"}' in metrics


def test_concurrent_requests_are_served_and_bad_ones_fail_alone(url, offline, texts):
    # Whether these share engine calls depends on timing; that they do when they queue up is tested
    # deterministically in test_engine_loop.py (the engine held on a gate).
    async def fire():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as http:
            bodies = [{"input": texts[i % 20 : i % 20 + 3], "encoding_format": "float"} for i in range(24)]
            good = [http.post(f"{url}/v1/embeddings", json=body) for body in bodies]
            bad = [http.post(f"{url}/v1/embeddings", json={"input": [[10**9]]}) for _ in range(4)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(fire())
    for i, r in enumerate(responses[:24]):
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert_same_rows(got, offline.embed(texts[i % 20 : i % 20 + 3]))
    assert all(r.status_code == 400 for r in responses[24:])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
FIELDS = ["input", "model", "encoding_format", "dimensions", "normalize", "truncate_prompt_tokens", "prompt_name"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5) | JSON_VALUES)
def test_fuzzed_bodies_never_cause_a_server_error(url, body):
    response = _post(url, body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
