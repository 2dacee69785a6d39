"""Scale-out on a local Ray runtime: Ray Data actors, ``hyprec embed-dataset``, and the Ray Serve deployment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

import pyarrow.parquet as pq  # noqa: E402

from hyprec.entrypoints.cli import main  # noqa: E402
from hyprec.ray import EmbedBatch, serve_app  # noqa: E402
from tests.helpers import assert_same_rows  # noqa: E402

BATCH = 64


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def offline(minilm_hybrid):
    return minilm_hybrid  # the policy EmbedBatch(model="minilm") resolves


@pytest.fixture(scope="module")
def texts(eval_texts) -> list[str]:
    # 182 texts of mixed length (two long pages, then paragraphs, docstrings and sentences): several Ray batches
    # and blocks. What is tested is the plumbing, so the other 18 long pages would only add embedding time.
    return eval_texts[18:]


def test_map_batches_on_two_actors_matches_llm_embed(local_ray, offline, texts):
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": "minilm"},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=BATCH,
        num_cpus=0.5,  # the Ray runtime has 2 CPUs; the Serve test below needs room too
        batch_format="pyarrow",
    ).to_arrow_refs()
    table = __import__("pyarrow").concat_tables(ray.get(out))
    assert table.column("id").to_pylist() == list(range(len(texts)))
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    # Ray chooses the batch boundaries; results agree with one LLM.embed call within the batch-invariance
    # tolerance that LLM.embed itself meets for different batchings (tests/engine/test_embedding_engine.py).
    assert_same_rows(got, offline.embed(texts))


def test_each_actor_call_is_exactly_llm_embed_of_its_batch(local_ray, offline, texts):
    # Two blocks of 91 rows, one actor call per block: the same inputs in the same batch as LLM.embed gets. Ray
    # runs a 0.5-CPU actor with one thread, and GEMM rounding depends on the thread count: compare at one thread.
    ds = ray.data.from_items([{"text": t} for t in texts], override_num_blocks=2)
    out = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": "minilm"},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=None,
        num_cpus=0.5,
        batch_format="pyarrow",
    ).take_all()
    got = np.array([row["embedding"] for row in out], dtype=np.float32)
    half = len(texts) // 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = np.concatenate([offline.embed(texts[:half]), offline.embed(texts[half:])])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(got, expected)


def test_embed_dataset_cli_writes_parquet_in_input_order(local_ray, offline, tmp_path, texts):
    source = tmp_path / "corpus.jsonl"
    rows = [{"doc": f"d{i}", "text": t} for i, t in enumerate(texts[:40])]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "out"
    args = ["--model", "minilm", "--ray-address", "local", "--concurrency", "2", "--batch-size", "16"]
    args += ["--num-cpus-per-actor", "0.5"]
    code = main(["-q", "embed-dataset", "--input", str(source), "--output", str(out_dir), *args])
    assert code == 0
    table = pq.read_table(out_dir / "embeddings.parquet")
    assert table.num_rows == 40
    assert table.column("doc").to_pylist() == [r["doc"] for r in rows]
    assert_same_rows(np.array(table.column("embedding").to_pylist(), dtype=np.float32), offline.embed(texts[:40]))


def test_embed_dataset_errors(local_ray, tmp_path, capsys):
    source = tmp_path / "corpus.jsonl"
    source.write_text('{"body": "no text column"}\n')
    assert main(["-q", "embed-dataset", "--input", str(source), "--output", str(tmp_path / "o")]) == 2
    assert "no column 'text'" in capsys.readouterr().err
    assert main(["-q", "embed-dataset", "--input", str(tmp_path / "x.csv"), "--output", str(tmp_path / "o")]) == 2
    assert "expected a .jsonl or .parquet file" in capsys.readouterr().err


def test_ray_serve_deployment_with_two_replicas(local_ray, offline, texts):
    openai = pytest.importorskip("openai")
    from ray import serve

    from tests.helpers import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(serve_app("minilm", num_replicas=2, num_cpus_per_replica=0.5), route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        fits = [t for t, ids in zip(texts, offline.engine.tokenize(texts), strict=True) if len(ids) < 256][:8]
        response = client.embeddings.create(model="minilm", input=fits, encoding_format="float")
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert_same_rows(got, offline.embed(fits))
        assert len(serve.status().applications["default"].deployments["hyprec"].replica_states) >= 1
    finally:
        serve.shutdown()
