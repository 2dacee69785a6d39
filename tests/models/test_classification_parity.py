"""Sequence classifiers and cross-encoders against transformers and sentence-transformers' ``CrossEncoder``.

No PyPI package here ships a real cross-encoder, so parity rests on random-initialised transformers models of several
shapes (BERT, RoBERTa, XLM-RoBERTa; one label and several), saved with the all-MiniLM-L6-v2 tokenizer, scored on
real text pairs. Float32 logits must match transformers' to 1e-5 (float32 round-off over a few layers of width
<= 96 stays near 1e-6); ``CrossEncoder.predict`` on the same model saved in its format must match to 1e-5 with the
same ranking.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from hyprec import LLM
from hyprec.errors import InputTypeError, InvalidInputError
from hyprec.model_sources import resolve_model

pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = 1e-5
QUERIES = ["How do I read a file in Python?", "What is a prime number?"]
DOCUMENTS = [
    "Use open() with a context manager to read the file's contents.",
    "A prime number has exactly two divisors: one and itself.",
    "The weather in spring is mild and often rainy.",
    "Half precision overflows above 65504.",
    "Python's pathlib offers read_text() for small files.",
]
#: name -> (transformers classes, config overrides, labels)
CASES = {
    "bert-1": ("Bert", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}, 1),
    "bert-3": ("Bert", {"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3}, 3),
    "roberta-1": ("Roberta", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}, 1),
    "xlm-roberta-2": ("XLMRoberta", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}, 2),
}


def _pairs() -> list[tuple[str, str]]:
    return [(q, d) for q in QUERIES for d in DOCUMENTS]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict:
    """Per case: (HF directory, transformers model)."""
    import transformers

    tokenizer_dir = resolve_model("minilm")
    root = tmp_path_factory.mktemp("classifiers")
    built = {}
    for name, (family, shape, labels) in CASES.items():
        torch.manual_seed(len(built))
        config = getattr(transformers, f"{family}Config")(
            vocab_size=30522,
            intermediate_size=2 * shape["hidden_size"],
            max_position_embeddings=256,
            type_vocab_size=2,  # the BERT tokenizer marks the second text of a pair with segment 1
            initializer_range=0.08,  # wider than the default 0.02, so scores spread and an error cannot hide
            num_labels=labels,
            **shape,
        )
        model = getattr(transformers, f"{family}ForSequenceClassification")(config).eval()
        path = root / name
        model.save_pretrained(path)
        for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(tokenizer_dir / file, path / file)
        built[name] = (path, model)
    return built


def _reference_logits(path, model, pairs) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    batch = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.float().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(classifiers, name):
    path, model = classifiers[name]
    llm = LLM(path, dtype="float32")
    got = llm.engine.logits(_pairs())
    want = _reference_logits(path, model, _pairs())
    assert got.shape == want.shape == (len(_pairs()), CASES[name][2])
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["bert-1", "roberta-1"])
def test_scores_and_ranking_match_cross_encoder(classifiers, tmp_path, name):
    from sentence_transformers import CrossEncoder

    path, _ = classifiers[name]
    st_dir = tmp_path / "st"
    CrossEncoder(str(path), device="cpu").save(str(st_dir))  # sentence-transformers' own format
    reference = CrossEncoder(str(st_dir), device="cpu")
    llm = LLM(st_dir, dtype="float32")
    assert llm.engine.activation == "Sigmoid"
    for query in QUERIES:
        want = reference.predict([(query, d) for d in DOCUMENTS])
        got = llm.score(query, DOCUMENTS)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
        ranked = [r.index for r in llm.rerank(query, DOCUMENTS)]
        assert ranked == [r["corpus_id"] for r in reference.rank(query, DOCUMENTS)]


def test_classify_gives_labels_and_probabilities(classifiers):
    path, model = classifiers["bert-3"]
    llm = LLM(path, dtype="float32")
    out = llm.classify(DOCUMENTS)
    logits = _reference_logits(path, model, [(d, "") for d in DOCUMENTS])  # only for the label order
    assert len(out) == len(DOCUMENTS) and llm.engine.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    for result in out:
        assert len(result.probs) == 3 and abs(sum(result.probs) - 1) < 1e-6
        assert result.label == llm.engine.labels[int(np.argmax(result.probs))]
    assert logits.shape[1] == 3


def test_hybrid_policies_keep_the_ranking_on_real_text(classifiers):
    """Under half-precision attention every score stays within a quarter of the format's unit roundoff u of float32's
    (q/k/v rounded by u move these sigmoid scores by ~0.03u, measured: an 8x margin), so no two documents whose
    float32 scores differ by more than twice that can swap; most pairs here differ by more (checked), and those keep
    their order. Closer pairs are ties at the format's precision."""
    path, _ = classifiers["bert-1"]
    reference = LLM(path, dtype="float32").score(_pairs())
    for attn, unit_roundoff in (("float16", 2**-11), ("bfloat16", 2**-8)):
        bound = unit_roundoff / 4
        scores = LLM(path, dtype="hybrid", attn_dtype=attn).score(_pairs())
        np.testing.assert_allclose(scores, reference, rtol=0, atol=bound)
        apart = [
            (i, j)
            for i in range(len(reference))
            for j in range(len(reference))
            if reference[i] - reference[j] > 2 * bound
        ]
        assert len(apart) >= 0.6 * len(reference) * (len(reference) - 1) / 2, (attn, len(apart))
        assert all(scores[i] > scores[j] for i, j in apart), attn


def test_bi_encoders_score_by_cosine(minilm_fp32):
    embeddings = minilm_fp32.embed([QUERIES[0], *DOCUMENTS], normalize=True)
    want = embeddings[1:] @ embeddings[0]
    np.testing.assert_allclose(minilm_fp32.score(QUERIES[0], DOCUMENTS), want, rtol=0, atol=1e-6)


def test_bad_inputs_are_named(classifiers):
    llm = LLM(classifiers["bert-1"][0], dtype="float32")
    with pytest.raises(InvalidInputError, match="documents: expected a non-empty list"):
        llm.rerank("q", [])
    with pytest.raises(InputTypeError, match="query must be a string"):
        llm.rerank(3, ["a"])
    with pytest.raises(InvalidInputError, match="text_1 has 2 texts and text_2 1"):
        llm.score(["a", "b"], ["c"])
    with pytest.raises(InputTypeError, match=r"pairs\[1\]"):
        llm.score([("a", "b"), "c"])
    with pytest.raises(InvalidInputError, match="top_n"):
        llm.rerank("q", ["a"], top_n=0)
    with pytest.raises(InvalidInputError, match="is a classifier"):
        llm.embed(["a"])
    three = LLM(classifiers["bert-3"][0], dtype="float32")
    with pytest.raises(InvalidInputError, match="one label"):
        three.score("q", ["a"])
    assert [r.index for r in llm.rerank("q", DOCUMENTS, top_n=2, return_documents=True)] == [
        r.index for r in llm.rerank("q", DOCUMENTS)
    ][:2]


def test_check_and_every_policy_run_on_a_classifier(classifiers):
    from hyprec.tools.check import check

    path, _ = classifiers["xlm-roberta-2"]
    report = check(path, texts=DOCUMENTS)
    assert report.recommended in ("hybrid-fp16", "hybrid-bf16") and len(report.layers) == 1 + 2
    reference = LLM(path, dtype="float32").engine.logits(_pairs())
    # Whole-model half precision: the encoder rounds at every op (errors of a few units of roundoff u relative to
    # the logits' scale were measured on these models: at most 8.4u), while the head still computes in float32.
    for dtype, unit_roundoff in (("float16", 2**-11), ("bfloat16", 2**-8)):
        llm = LLM(path, dtype=dtype)
        assert llm.engine.model.classifier.out_proj.weight.dtype == torch.float32
        bound = 32 * unit_roundoff * np.abs(reference).max()
        np.testing.assert_allclose(llm.engine.logits(_pairs()), reference, rtol=0, atol=bound)
