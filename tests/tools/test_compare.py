"""``hyprec compare``: policies against a reference, for embeddings and generation."""

from __future__ import annotations

import functools
import json

import pytest

from hyprec.entrypoints.cli import main
from hyprec.tools.compare import HyprecReference, compare, compare_generation
from hyprec.tools.measure import open_policy
from tests.helpers import clean_llama, massive_residual

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
