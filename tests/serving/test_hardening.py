"""Server hardening (issue 9): requests that used to kill the engine loop, fail their batch, crash on bad Unicode,
hold concurrency slots with slow bodies, block the event loop, or hold a shutdown open; option validation; API-key
handling. Tiny random models in-process (httpx's ASGI transport, or uvicorn on a loopback port in a thread where a
blocked event loop must show up as a client timeout rather than a hung test); one subprocess for SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")

import httpx
import uvicorn
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from hyprec import LLM, SamplingParams
from hyprec.entrypoints.cli import build_parser, main
from hyprec.errors import InvalidInputError, NonFiniteOutputError
from hyprec.sampling.sampler import Sampler, SequenceSamplingState
from hyprec.serving.app import build_app
from hyprec.serving.settings import ServerSettings
from hyprec.serving.worker import GenerateJob
from tests.helpers import clean_bert, clean_llama, free_port

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = list(range(5, 25))  # 20 distinct token ids: a repetition penalty touches many logits
SIMPLE_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
# 10^10 loop iterations: hours of rendering without a budget.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def tiny_llama(path: Path, chat_template: str | None = SIMPLE_TEMPLATE, max_positions: int | None = None) -> Path:
    """The zoo's clean Llama (vocabulary of 96) with a word-level tokenizer ("w0" .. "w95", so text prompts and
    streamed text work) and a chat template; ``max_positions`` widens its context window (RoPE has no learned
    positions, so only the config changes)."""
    clean_llama(path)
    if max_positions is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": max_positions}))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    if chat_template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "my-embedder"
    clean_bert(path)
    return path


def llama(path: Path) -> LLM:
    """A fresh engine per test (loading takes milliseconds): a test that breaks one leaves the others alone."""
    return LLM(path, max_model_len=128, num_kv_blocks=32)


async def _asgi(app, *calls):
    """Run ``calls`` (functions of an httpx client) against ``app`` in-process, in order."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        return [await call(http) for call in calls]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on uvicorn on a loopback port, in a thread with its own event loop; yields the base URL. Work that
    blocks that loop shows up here as a client timeout instead of hanging the test."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        thread.join(timeout=0.02)  # the poll interval, cut short if the server thread ends
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ------------------------------------------------------------------ 1, 2: sampling parameters and per-request failures


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("temperature", 1e-300, "0 (greedy) or a number in [1.1754944e-38, 3.4028235e+38]"),
        ("temperature", 1e39, "0 (greedy) or a number in [1.1754944e-38, 3.4028235e+38]"),
        ("top_p", 1e-300, "a number in [1.1754944e-38, 1]"),
        ("repetition_penalty", 1e-300, "a number in [0.01, 100]"),
        ("repetition_penalty", 1e3, "a number in [0.01, 100]"),
    ],
)
def test_float_sampling_params_beyond_float32_are_refused(field, value, expected):
    with pytest.raises(InvalidInputError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(f"{field}={value!r}: expected {expected}")


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", 1e-300), ("repetition_penalty", 1e-300), ("top_p", 1e-300)]
)
def test_unrepresentable_sampling_values_get_400_and_the_server_keeps_serving(llama_dir, field, value):
    app = build_app(llama(llama_dir), ServerSettings("zoo"))
    bad, health, after = asyncio.run(
        _asgi(
            app,
            lambda http: http.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2, field: value}),
            lambda http: http.get("/health"),
            lambda http: http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}),
        )
    )
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == field and "expected" in bad.json()["error"]["message"]
    assert health.status_code == 200 and after.status_code == 200, (health.text, after.text)


def test_cli_generate_refuses_an_underflowing_temperature(llama_dir, capsys):
    assert main(["-q", "generate", "w5", "--model", str(llama_dir), "--temperature", "1e-300"]) == 2
    err = capsys.readouterr().err
    assert "temperature=1e-300: expected 0 (greedy) or a number in" in err and "Traceback" not in err


def _bypassing_validation(field: str, value: float, **kwargs) -> SamplingParams:
    """Params holding a value validation refuses: what a missed check or an engine bug would hand the sampler."""
    params = SamplingParams(**kwargs)
    setattr(params, field, value)  # plain assignment is not validated (see SamplingParams' docstring)
    return params


def test_sample_each_fails_only_the_bad_row_and_seeded_rows_draw_as_without_it():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    bad = _bypassing_validation("temperature", 1e-300, seed=3)  # float32 0: 0/0 = NaN, then an index out of range

    def states(*params):
        return [SequenceSamplingState.for_request(p, [1, 2]) for p in params]

    seeded = [SamplingParams(seed=1, top_p=0.9), SamplingParams(seed=2, min_p=0.05)]
    out = Sampler().sample_each(logits, states(seeded[0], bad, seeded[1]))
    reference = Sampler()(logits[[0, 2]], states(*seeded))
    assert list(out.failures) == [1]
    assert [out.token_ids[0], out.token_ids[2]] == reference.token_ids
    assert [out.logprobs[0], out.logprobs[2]] == reference.logprobs
    assert out.token_ids[1] == -1


def test_non_finite_logits_of_one_request_fail_only_that_request(llama_dir):
    llm = llama(llama_dir)
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm.generate([PROMPT], good)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request(PROMPT, _bypassing_validation("repetition_penalty", 1e-300, temperature=0), request_id="bad")
    engine.add_request(PROMPT, good, request_id="good")
    last = {}
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = out
    assert isinstance(last["bad"].error, NonFiniteOutputError)
    assert "after the penalties" in str(last["bad"].error)
    assert last["bad"].outputs[0].finish_reason == "abort"
    assert last["good"].error is None and last["good"].outputs[0].token_ids == expected
    assert not engine.requests  # the failed request left nothing behind
    with pytest.raises(NonFiniteOutputError, match="after the penalties"):  # offline, the caller gets the error
        llm.generate([PROMPT], _bypassing_validation("repetition_penalty", 1e-300, temperature=0))


@pytest.mark.parametrize(
    ("field", "kwargs"), [("temperature", {"temperature": 0.5}), ("repetition_penalty", {"temperature": 0})]
)
def test_a_request_that_breaks_sampling_fails_alone_and_the_loop_keeps_serving(llama_dir, field, kwargs):
    """Two requests in the same engine batch, one past validation with a value the sampler cannot use: the
    temperature case raises a plain RuntimeError (index out of range), the penalty case NonFiniteOutputError."""
    llm = llama(llama_dir)
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([PROMPT], good)[0].outputs[0].token_ids
    bad = _bypassing_validation(field, 1e-300, max_tokens=8, **kwargs)
    app = build_app(llm, ServerSettings("zoo"))
    worker = app.state.worker

    async def scenario():
        loop = asyncio.get_running_loop()
        queues = {"bad": asyncio.Queue(), "good": asyncio.Queue()}
        # Both are queued before the loop starts, so it takes them in one turn: they share every step.
        for rid, params in (("bad", bad), ("good", good)):
            worker.jobs.put(GenerateJob(rid, None, PROMPT, params, queues[rid], loop))
        worker.start()
        ends = {}
        for rid, updates in queues.items():
            item = await asyncio.wait_for(updates.get(), 60)
            while not isinstance(item, BaseException) and not item.finished:
                item = await asyncio.wait_for(updates.get(), 60)
            ends[rid] = item
        health, after = await _asgi(
            app,
            lambda http: http.get("/health"),
            lambda http: http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}),
        )
        return ends, health, after

    ends, health, after = asyncio.run(scenario())
    assert isinstance(ends["bad"], Exception)
    assert not isinstance(ends["good"], BaseException), ends["good"]
    assert ends["good"].outputs[0].token_ids == expected
    assert worker.alive and health.status_code == 200 and after.status_code == 200


# ------------------------------------------------------------------ 3: lone surrogates


@pytest.mark.parametrize(
    ("route", "body", "param", "where"),
    [
        ("/v1/embeddings", '{"input": "\\ud800"}', "input", "texts[0]"),
        ("/v1/embeddings", '{"input": ["ok", "a\\udfff"]}', "input", "texts[1]"),
        ("/v1/completions", '{"prompt": "w5 \\ud800", "max_tokens": 2}', "prompt", "texts[0]"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", "texts[0]"),
    ],
)
def test_lone_surrogates_get_400_with_the_cli_message(bert_dir, llama_dir, route, body, param, where):
    llm = LLM(bert_dir) if route == "/v1/embeddings" else llama(llama_dir)
    with TestClient(build_app(llm, ServerSettings("zoo")), raise_server_exceptions=False) as client:
        response = client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert f"{where} is not valid Unicode: surrogates not allowed at position" in error["message"]


# ------------------------------------------------------------------ 4: request bodies


def test_a_slow_body_holds_no_concurrency_slot(bert_dir):
    app = build_app(LLM(bert_dir), ServerSettings("zoo", max_concurrent_requests=1))
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_body():
        yield b'{"input": '
        started.set()  # the server has asked for more: the request is in, its body is not
        await release.wait()
        yield b"[[2, 10, 3]]}"

    async def scenario(http):
        headers = {"content-type": "application/json"}
        slow = asyncio.create_task(http.post("/v1/embeddings", content=slow_body(), headers=headers))
        await asyncio.wait_for(started.wait(), 60)
        during = await http.post("/v1/embeddings", json={"input": [[2, 10, 3]]})
        release.set()
        return during, await slow

    ((during, slow),) = asyncio.run(_asgi(app, scenario))
    assert during.status_code == 200, during.text  # the one slot was free: the slow request had not taken it
    assert slow.status_code == 200, slow.text


def test_an_oversized_body_gets_413_declared_or_streamed(bert_dir):
    app = build_app(LLM(bert_dir), ServerSettings("zoo", max_body_bytes=1000))

    async def chunks():
        yield b'{"input": "' + b"x" * 600
        yield b"x" * 600 + b'"}'

    declared, streamed, small = asyncio.run(
        _asgi(
            app,
            lambda http: http.post("/v1/embeddings", json={"input": "x" * 2000}),
            lambda http: http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}),
            lambda http: http.post("/v1/embeddings", json={"input": [[2, 10, 3]]}),
        )
    )
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["message"] == "request body larger than 1000 bytes (the limit)"
        assert response.headers["connection"] == "close"
    assert small.status_code == 200


def test_a_stalled_body_times_out_with_408(bert_dir):
    app = build_app(LLM(bert_dir), ServerSettings("zoo", body_timeout=0.2))
    never = asyncio.Event()

    async def stalled():
        yield b'{"input": '
        await never.wait()
        yield b"}"

    async def post(http):
        async with asyncio.timeout(30):  # bounded even if the server waited for ever
            return await http.post("/v1/embeddings", content=stalled(), headers={"content-type": "application/json"})

    (response,) = asyncio.run(_asgi(app, post))
    assert response.status_code == 408, response.text
    assert response.json()["error"] == {
        "message": "request body not received within 0.2 s",
        "type": "timeout",
        "param": None,
        "code": 408,
    }


# ------------------------------------------------------------------ 5: work off the event loop


def test_tokenising_a_prompt_leaves_the_event_loop_free(llama_dir, monkeypatch):
    llm = llama(llama_dir)
    tok = llm.engine.tokenizer
    entered, release = threading.Event(), threading.Event()
    encode = tok.encode

    def held_encode(*args, **kwargs):
        entered.set()
        release.wait(timeout=30)  # bounded: a server that tokenises on its event loop recovers afterwards
        return encode(*args, **kwargs)

    monkeypatch.setattr(tok, "encode", held_encode)
    result = {}
    with serving(build_app(llm, ServerSettings("zoo"))) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "w5 w6 w7", "max_tokens": 2, "temperature": 0}
        completion = threading.Thread(target=lambda: result.update(r=http.post("/v1/completions", json=body)))
        completion.start()
        assert entered.wait(timeout=30)
        try:
            health = http.get("/health", timeout=5)  # answered while the prompt is being tokenised
        finally:
            release.set()
        completion.join(timeout=60)
    assert health.status_code == 200
    assert result["r"].status_code == 200, result["r"].text


def test_a_pathological_chat_template_fails_within_its_budget_while_health_answers(tmp_path, monkeypatch):
    llm = llama(tiny_llama(tmp_path, chat_template=NESTED_LOOPS))
    app = build_app(llm, ServerSettings("zoo", chat_template_timeout=1.0))
    tok = llm.engine.tokenizer
    rendering, answered = threading.Event(), threading.Event()
    render = tok.apply_chat_template

    def held_render(*args, **kwargs):
        rendering.set()
        answered.wait(timeout=30)  # hold the render until /health answered (bounded if it never can)
        return render(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", held_render)
    result = {}
    body = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        chat = threading.Thread(target=lambda: result.update(r=http.post("/v1/chat/completions", json=body)))
        chat.start()
        assert rendering.wait(timeout=30)
        try:
            health = http.get("/health", timeout=5)  # a template rendering on the event loop would block this
        finally:
            answered.set()
        started = time.monotonic()
        chat.join(timeout=60)
        took = time.monotonic() - started
    assert health.status_code == 200
    response = result["r"]
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "rendering took longer than 1 s (the limit)" in response.json()["error"]["message"]
    assert took < 30  # the budget, not the 10^10 iterations


# ------------------------------------------------------------------ 9: server settings


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--port", "70000", "a TCP port in 1..65535"),
        ("--port", "0", "a TCP port in 1..65535"),
        ("--request-timeout", "-1", "a finite number of seconds > 0"),
        ("--request-timeout", "nan", "a finite number of seconds > 0"),
        ("--max-input-tokens", "0", "an integer >= 1"),
        ("--max-concurrent-requests", "0", "an integer >= 1"),
        ("--max-body-bytes", "1.5", "an integer >= 1"),
        ("--body-timeout", "inf", "a finite number of seconds > 0"),
        ("--shutdown-timeout", "0", "a finite number of seconds > 0"),
    ],
)
def test_bad_serve_options_are_usage_errors_naming_the_option(option, value, expected, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", f"{option}={value}"])
    assert info.value.code == 2
    assert f"argument {option}: {value}: expected {expected}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_timeout", -1),
        ("request_timeout", float("nan")),
        ("max_input_tokens", 0),
        ("max_concurrent_requests", 0),
        ("max_inputs_per_request", True),
        ("max_body_bytes", 0),
        ("body_timeout", float("inf")),
        ("chat_template_timeout", 0),
        ("shutdown_timeout", -5),
    ],
)
def test_bad_server_settings_name_the_field_and_the_range(field, value):
    with pytest.raises(InvalidInputError, match=rf"^{field}=.*: expected (an integer >= 1|a finite number of sec)"):
        ServerSettings("zoo", **{field: value})


# ------------------------------------------------------------------ 11: API key, error texts, model names


def test_api_key_is_compared_in_constant_time_and_the_scheme_in_any_case(bert_dir, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    app = build_app(LLM(bert_dir), ServerSettings("zoo", api_key="s3cret"))
    with TestClient(app) as client:
        statuses = {
            header: client.get("/v1/models", headers={"authorization": header} if header else {}).status_code
            for header in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret", "Bearer wrong", "Basic s3cret", "")
        }
        unauthenticated = client.get("/v1/models")
    assert statuses == {
        "Bearer s3cret": 200,
        "bearer s3cret": 200,
        "BEARER  s3cret": 200,
        "Bearer wrong": 401,
        "Basic s3cret": 401,
        "": 401,
    }
    assert compared, "the key was not compared with hmac.compare_digest"
    assert unauthenticated.headers["www-authenticate"] == "Bearer"


def test_api_key_from_argv_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    def settings(*argv: str) -> ServerSettings:
        return ServerSettings.from_args(build_parser().parse_args(["serve", *argv]))

    key_file, empty = tmp_path / "key", tmp_path / "empty"
    key_file.write_text("from-file\n")
    empty.write_text("\n")
    monkeypatch.setenv("HYPREC_API_KEY", "from-env")
    assert settings().api_key == "from-env"
    assert settings("--api-key-file", str(key_file)).api_key == "from-file"
    assert settings("--api-key", "from-argv").api_key == "from-argv"
    monkeypatch.delenv("HYPREC_API_KEY")
    assert settings().api_key is None
    for argv, words in [
        (["--api-key-file", str(empty)], "expected the key on its first line, which is empty"),
        (["--api-key", "a", "--api-key-file", str(key_file)], "give one of them, not both"),
    ]:
        with pytest.raises(InvalidInputError, match=words):
            settings(*argv)
    # The CLI reports a bad key file before loading any model.
    assert main(["-q", "serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "--api-key-file" in capsys.readouterr().err


def test_503_bodies_carry_no_internal_error_text(llama_dir):
    llm = llama(llama_dir)

    def broken_step():
        raise RuntimeError("/secret/internal/path")

    llm.engine.step = broken_step
    with TestClient(build_app(llm, ServerSettings("zoo")), raise_server_exceptions=False) as client:
        failed = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        health = client.get("/health")
        after = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert (failed.status_code, health.status_code, after.status_code) == (500, 503, 503)
    for response in (failed, health, after):
        assert "secret" not in response.text, response.text


def test_a_model_given_by_path_is_served_under_its_directory_name(bert_dir):
    def name(*argv: str) -> str:
        return ServerSettings.from_args(build_parser().parse_args(["serve", *argv])).model_name

    settings = ServerSettings.from_args(build_parser().parse_args(["serve", str(bert_dir)]))
    assert settings.model_name == "my-embedder"
    with TestClient(build_app(LLM(bert_dir), settings)) as client:
        models = client.get("/v1/models").json()
        wrong = client.post("/v1/embeddings", json={"input": "x", "model": "other"})
        metrics = client.get("/metrics").text
    assert [m["id"] for m in models["data"]] == ["my-embedder"]
    assert "'my-embedder'" in wrong.json()["error"]["message"]
    assert str(bert_dir.parent) not in wrong.text + metrics + json.dumps(models)
    assert name() == "minilm" and name("gemma") == "gemma"  # aliases as given
    assert name(str(bert_dir), "--served-model-name", "org/model") == "org/model"


# ------------------------------------------------------------------ 12: shutdown deadline


def test_sigterm_ends_an_open_stream_with_an_error_after_the_shutdown_deadline(tmp_path):
    """A stream of up to 8,000 tokens (seconds even on a fast machine, far more than the 0.5 s grace period)."""
    model = tiny_llama(tmp_path / "model", max_positions=8192)
    port = free_port()
    cmd = [sys.executable, "-m", "hyprec.entrypoints.cli", "-q", "serve", str(model), "--port", str(port),
           "--shutdown-timeout", "0.5"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "w5 w6", "max_tokens": 8000, "ignore_eos": True, "temperature": 0, "stream": True}
    events = []
    with tempfile.TemporaryFile(mode="w+t") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not _answers(f"{url}/health"):
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)  # the poll interval, cut short if the server exits
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)  # it exits once the stream is closed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            output = log.read()
    assert "error" in events[-1], f"the stream was not cut: {events[-1]}\n{output}"
    assert events[-1]["error"]["code"] == 503 and "shutting down" in events[-1]["error"]["message"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])  # cut short, not finished
    assert len(events) < 8000


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
