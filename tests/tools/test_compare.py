"""``hyprec compare``: policies against a reference, for embeddings, cross-encoders and generation."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from hyprec.entrypoints.cli import main
from hyprec.errors import InvalidInputError
from hyprec.tools.compare import HyprecReference, compare, compare_generation, kendall_tau
from hyprec.tools.measure import open_policy
from tests.helpers import clean_llama, massive_residual, tiny_cross_encoder

pytestmark = pytest.mark.usefixtures("single_thread")
TEXTS = [list(range(3, 60)), list(range(10, 90, 2))]
PROMPTS = [[5, 6, 7], [40, 41, 42, 43]]


def test_embedding_compare_against_float32(eval_texts):
    report = compare("minilm", policies=["float32", "hybrid-fp16", "bfloat16"], texts=eval_texts[::5])
    rows = {r["policy"]: r for r in report.rows}
    assert report.kind == "embedding" and report.texts == 40
    assert rows["float32"]["min_cos"] > 0.9999999 and rows["float32"]["top1_agreement"] == 1.0
    assert rows["hybrid-fp16"]["min_cos"] >= 0.99999
    assert rows["bfloat16"]["min_cos"] < rows["hybrid-fp16"]["min_cos"]  # whole-model bf16 drifts more
    assert all(r["non_finite"] == 0 and r["texts_per_s"] > 0 for r in report.rows)
    assert "| policy |" in report.markdown()


@pytest.mark.parametrize(("build", "policy"), [(clean_llama, "hybrid-fp16"), (massive_residual, "float16")])
def test_generation_compare_against_float32(tmp_path, build, policy):
    build(tmp_path)
    load = functools.partial(open_policy, tmp_path, device="cpu")
    rows = compare_generation(HyprecReference(load("float32")), load, ["float32", policy], TEXTS, PROMPTS)
    same, other = rows
    # float32 against a float32 reference of the same weights: the same computation, so KL and log-perplexity
    # differences are float64 accumulation noise (~1e-15), far below these bounds.
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] < 1e-9 and abs(same["ppl_ratio"] - 1) < 1e-6
    assert same["greedy_identical_prefix"] == [48, 48] and same["top5_close"] == 2
    if build is massive_residual:  # the residual stream overflows float16: every logit is NaN, and it is counted
        assert other["non_finite_logits"] == sum(len(t) - 1 for t in TEXTS)
        assert other["greedy_identical_prefix"] == [0, 0]
    else:
        assert other["top1_agreement"] > 0.95 and other["non_finite_logits"] == 0


def test_cli_compare_json(capsys, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a cat on a mat\nhalf precision overflows\nthe weather is fine\n")
    assert (
        main(["-q", "compare", "minilm", "--policies", "float32", "hybrid-bf16", "--texts", str(texts), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in report["rows"]] == ["float32", "hybrid-bf16"]
    assert main(["-q", "compare", "minilm", "--reference", "transformers"]) == 2
    assert "sentence-transformers" in capsys.readouterr().err


def test_cross_encoder_compare_against_sentence_transformers(tmp_path):
    path = tiny_cross_encoder(tmp_path / "ce")
    report = compare(path, policies=["float32", "hybrid-fp16"], reference="sentence-transformers")
    assert (report.kind, report.queries, report.texts) == ("cross-encoder", 5, 20)  # the built-in inputs
    assert "5 queries x 20 documents, reference sentence-transformers" in report.markdown()
    same, hybrid = report.rows
    # float32 against CrossEncoder float32 on the same weights: the parity bound of test_classification_parity
    assert same["max_abs_diff"] <= 1e-5 and same["kendall_tau"] == 1.0
    assert same["top10_overlap"] == 1.0 and same["top1_agreement"] == 1.0
    # float16 attention moves these sigmoid scores by ~1e-5 (float16 rounds at 2^-11 relative): far less than the
    # gaps between a query's scores, so the order holds
    assert hybrid["policy"] == "hybrid-fp16" and 0 < hybrid["max_abs_diff"] < 1e-3 and hybrid["kendall_tau"] >= 0.95
    assert all(r["non_finite"] == 0 and r["pairs_per_s"] > 0 for r in report.rows)


def test_cli_compare_cross_encoder_documents(capsys, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("Open a file to read it.\nPrimes have two divisors.\nIt rains in spring.\n")
    argv = ["-q", "compare", str(tiny_cross_encoder(tmp_path / "ce")), "--policies", "float32", "--texts", str(docs)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["queries"], report["texts"]) == ("cross-encoder", 5, 3)
    assert report["rows"][0]["max_abs_diff"] == 0.0 and "top3_overlap" in report["rows"][0]  # float32 vs itself


def test_cross_encoder_compare_refuses_what_it_cannot_rank(tmp_path):
    with pytest.raises(InvalidInputError, match="cross-encoder models compare against 'float32' or 'sentence-"):
        compare(tiny_cross_encoder(tmp_path / "ce"), policies=["float32"], reference="transformers")
    with pytest.raises(InvalidInputError, match="has 3 labels; compare ranks with cross-encoders"):
        compare(tiny_cross_encoder(tmp_path / "nli", labels=3), policies=["float32"])


def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 5, 20):
        a, b = rng.permutation(n), rng.permutation(n)
        assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    assert kendall_tau(np.arange(7), np.arange(7)) == 1.0 and kendall_tau(np.arange(7), -np.arange(7)) == -1.0
