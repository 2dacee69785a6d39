"""sentence-transformers pipeline compatibility: pooling modes, Dense, Normalize, prompts, Matryoshka.

Each case saves a real sentence-transformers pipeline around a tiny random BERT that uses all-MiniLM-L6-v2's
tokenizer (what is tested is the pipeline, not the weights) and compares hyprec's float32 output with
sentence-transformers' on the same texts. The last tests run the real all-MiniLM-L6-v2 pipeline.
"""

from __future__ import annotations

import json
import os
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
HIDDEN, LAYERS, INTERMEDIATE = 32, 2, 64
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Both sides compute in float32 and differ only in the order of their sums (GEMM blocking, the fused attention
# kernel, pooling). The same n-term sum in two orders differs by at most 2 n u sum|terms| (u = 2^-24, the
# float32 unit roundoff); the widest sum is the FFN's (n = INTERMEDIATE for the tiny model, 1536 for MiniLM), and
# every layer adds its own share on top of the error it passes on. So, relative to max(1, max|reference|):
# 2 * n * u per layer, for the layers plus one for pooling and Dense, and a factor 4 for the LayerNorms, whose
# 1/std rescaling amplifies absolute errors of these hidden states by up to ~4.
TINY_RTOL = 4 * (LAYERS + 1) * 2 * INTERMEDIATE * 2**-24
MINILM_RTOL = 4 * (6 + 1) * 2 * 1536 * 2**-24


@pytest.fixture(scope="module")
def texts(eval_texts):
    return [*eval_texts[::10], "", "  padded  ", "x"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir):
    """A 2-layer random BERT (hidden 32) saved with all-MiniLM-L6-v2's tokenizer files."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked attention and spread-out states: a wrong mask or pooling shows
    )
    BertModel(config).eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    return path


def _build(path, tiny_bert, pooling, dense=(), normalize=False, **st_kwargs):
    torch.manual_seed(0)
    modules = [Transformer(str(tiny_bert), max_seq_length=MAX_LEN), pooling, *dense]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", **st_kwargs)
    model.save(str(path))
    return model


def _assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float = TINY_RTOL) -> None:
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize(
    "modes",
    [["cls"], ["max"], ["mean"], ["mean_sqrt_len_tokens"], ["weightedmean"], ["lasttoken"], ["mean", "cls"]],
)
def test_pooling_modes(tmp_path, tiny_bert, texts, modes):
    st = _build(tmp_path, tiny_bert, Pooling(HIDDEN, pooling_mode=modes))
    ours = LLM(tmp_path, dtype="float32").embed(texts)
    _assert_close(ours, st.encode(texts))


def test_legacy_pooling_flags_concatenate_in_st_order(tmp_path, tiny_bert, texts):
    st = _build(tmp_path, tiny_bert, Pooling(HIDDEN, pooling_mode=["cls", "max", "mean"]))
    legacy = {
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_cls_token": True,
        "pooling_mode_max_tokens": True,
    }
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    _assert_close(LLM(tmp_path, dtype="float32").embed(texts), st.encode(texts))


def test_dense_tanh_and_normalize(tmp_path, tiny_bert, texts):
    dense = Dense(2 * HIDDEN, 24, activation_function=torch.nn.Tanh())
    st = _build(tmp_path, tiny_bert, Pooling(HIDDEN, pooling_mode=["cls", "mean"]), [dense], normalize=True)
    llm = LLM(tmp_path, dtype="float32")
    assert llm.info()["embedding_dimension"] == 24
    _assert_close(llm.embed(texts), st.encode(texts))


@pytest.mark.parametrize("out_features", [HIDDEN, 12])
def test_dense_with_residual(tmp_path, tiny_bert, texts, out_features):
    dense = Dense(HIDDEN, out_features, activation_function=torch.nn.ReLU(), use_residual=True)
    st = _build(tmp_path, tiny_bert, Pooling(HIDDEN), [dense])
    _assert_close(LLM(tmp_path, dtype="float32").embed(texts), st.encode(texts))


def test_prompts_and_include_prompt_false(tmp_path, tiny_bert, texts):
    st = _build(
        tmp_path,
        tiny_bert,
        Pooling(HIDDEN, pooling_mode=["mean", "cls"], include_prompt=False),
        normalize=True,
        prompts={"query": "query: ", "passage": "passage: "},
        default_prompt_name="query",
    )
    llm = LLM(tmp_path, dtype="float32")
    assert {"query", "passage"} <= set(llm.info()["prompts"])
    _assert_close(llm.embed(texts), st.encode(texts))  # default prompt applies
    _assert_close(llm.embed(texts, prompt_name="passage"), st.encode(texts, prompt_name="passage"))
    _assert_close(llm.embed(texts, prompt="search: "), st.encode(texts, prompt="search: "))


def test_matryoshka_dimensions_renormalise(minilm_fp32, texts, st_minilm):
    ours = minilm_fp32.embed(texts, dimensions=64)
    ref = st_minilm.encode(texts)[:, :64]
    _assert_close(ours, ref / np.linalg.norm(ref, axis=1, keepdims=True), MINILM_RTOL)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=0, atol=norm_tol(64))


def norm_tol(n: int) -> float:
    """How far two float32 normalisations of the same n-vector (or its norm from 1) may differ: the sum of n
    squares is off by at most n u relatively, the square root halves that, the division adds u; doubled."""
    return 2 * (n + 2) * 2**-24


def test_matryoshka_without_normalisation_is_a_plain_cut(tmp_path, tiny_bert, texts):
    _build(tmp_path, tiny_bert, Pooling(HIDDEN))
    st = SentenceTransformer(str(tmp_path), device="cpu", truncate_dim=16)
    _assert_close(LLM(tmp_path, dtype="float32").embed(texts, dimensions=16), st.encode(texts))


def test_normalize_override(minilm_fp32, texts):
    raw = minilm_fp32.embed(texts, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    # The same forward pass both times: only the normalisation (numpy here, torch in hyprec) differs.
    normalized = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(minilm_fp32.embed(texts), normalized, rtol=0, atol=norm_tol(raw.shape[1]))


def test_plain_hf_directory_gets_mean_pooling(tmp_path, minilm_dir, texts, st_minilm):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        os.symlink(minilm_dir / name, tmp_path / name)
    llm = LLM(tmp_path, dtype="float32")
    assert llm.info()["pipeline"].endswith("Pooling(mean)")
    # ST's model_max_length (512) applies there; compare on texts short enough for both.
    short = [t for t in texts if len(t) < 500]
    ref = st_minilm.encode(short)
    ours = llm.embed(short)
    _assert_close(ours / np.linalg.norm(ours, axis=1, keepdims=True), ref, MINILM_RTOL)
