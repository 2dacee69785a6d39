"""sentence-transformers pipeline compatibility: pooling modes, Dense, Normalize, prompts, Matryoshka.

Each case saves a real sentence-transformers pipeline around MiniLM's transformer and compares hyprec's
float32 output with sentence-transformers' on the same texts.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from hyprec import LLM

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

MAX_LEN = 64


@pytest.fixture(scope="module")
def texts(eval_texts):
    return [*eval_texts[::10], "", "  padded  ", "x"]


def _build(path, minilm_dir, pooling, dense=(), normalize=False, **st_kwargs):
    torch.manual_seed(0)
    modules = [Transformer(str(minilm_dir), max_seq_length=MAX_LEN), pooling, *dense]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", **st_kwargs)
    model.save(str(path))
    return model


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5 * max(1.0, float(np.abs(ref).max())), rtol=1e-4)


@pytest.mark.parametrize(
    "modes",
    [["cls"], ["max"], ["mean"], ["mean_sqrt_len_tokens"], ["weightedmean"], ["lasttoken"], ["mean", "cls"]],
)
def test_pooling_modes(tmp_path, minilm_dir, texts, modes):
    st = _build(tmp_path, minilm_dir, Pooling(384, pooling_mode=modes))
    ours = LLM(tmp_path, dtype="float32").embed(texts)
    _assert_close(ours, st.encode(texts))


def test_legacy_pooling_flags_concatenate_in_st_order(tmp_path, minilm_dir, texts):
    st = _build(tmp_path, minilm_dir, Pooling(384, pooling_mode=["cls", "max", "mean"]))
    legacy = {
        "word_embedding_dimension": 384,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_cls_token": True,
        "pooling_mode_max_tokens": True,
    }
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    _assert_close(LLM(tmp_path, dtype="float32").embed(texts), st.encode(texts))


def test_dense_tanh_and_normalize(tmp_path, minilm_dir, texts):
    dense = Dense(768, 96, activation_function=torch.nn.Tanh())
    st = _build(tmp_path, minilm_dir, Pooling(384, pooling_mode=["cls", "mean"]), [dense], normalize=True)
    llm = LLM(tmp_path, dtype="float32")
    assert llm.info()["embedding_dimension"] == 96
    _assert_close(llm.embed(texts), st.encode(texts))


@pytest.mark.parametrize("out_features", [384, 128])
def test_dense_with_residual(tmp_path, minilm_dir, texts, out_features):
    dense = Dense(384, out_features, activation_function=torch.nn.ReLU(), use_residual=True)
    st = _build(tmp_path, minilm_dir, Pooling(384), [dense])
    _assert_close(LLM(tmp_path, dtype="float32").embed(texts), st.encode(texts))


def test_prompts_and_include_prompt_false(tmp_path, minilm_dir, texts):
    st = _build(
        tmp_path,
        minilm_dir,
        Pooling(384, pooling_mode=["mean", "cls"], include_prompt=False),
        normalize=True,
        prompts={"query": "query: ", "passage": "passage: "},
        default_prompt_name="query",
    )
    llm = LLM(tmp_path, dtype="float32")
    assert {"query", "passage"} <= set(llm.info()["prompts"])
    _assert_close(llm.embed(texts), st.encode(texts))  # default prompt applies
    _assert_close(llm.embed(texts, prompt_name="passage"), st.encode(texts, prompt_name="passage"))
    _assert_close(llm.embed(texts, prompt="search: "), st.encode(texts, prompt="search: "))


def test_matryoshka_dimensions_renormalise(minilm_dir, texts, st_minilm):
    llm = LLM(minilm_dir, dtype="float32")
    ours = llm.embed(texts, dimensions=64)
    ref = st_minilm.encode(texts)[:, :64]
    _assert_close(ours, ref / np.linalg.norm(ref, axis=1, keepdims=True))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_matryoshka_without_normalisation_is_a_plain_cut(tmp_path, minilm_dir, texts):
    _build(tmp_path, minilm_dir, Pooling(384))
    st = SentenceTransformer(str(tmp_path), device="cpu", truncate_dim=32)
    _assert_close(LLM(tmp_path, dtype="float32").embed(texts, dimensions=32), st.encode(texts))


def test_normalize_override(minilm_dir, texts):
    llm = LLM(minilm_dir, dtype="float32")
    raw = llm.embed(texts, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    _assert_close(raw / np.linalg.norm(raw, axis=1, keepdims=True), llm.embed(texts))


def test_plain_hf_directory_gets_mean_pooling(tmp_path, minilm_dir, texts, st_minilm):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    llm = LLM(tmp_path, dtype="float32")
    assert llm.info()["pipeline"].endswith("Pooling(mean)")
    # ST's model_max_length (512) applies there; compare on texts short enough for both.
    short = [t for t in texts if len(t) < 500]
    ref = st_minilm.encode(short)
    ours = llm.embed(short)
    _assert_close(ours / np.linalg.norm(ours, axis=1, keepdims=True), ref)
