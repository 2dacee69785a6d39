"""The non-finite guard on embeddings: a float16 overflow raises a typed error naming the inputs, or falls back to
hybrid and matches float32; the final barrier refuses non-finite output even when the guard only logs."""

from __future__ import annotations

import numpy as np
import pytest

from hyprec import LLM
from hyprec.errors import NonFiniteOutputError

# ------------------------------------------------------------------------------------------ non-finite guard


@pytest.fixture
def overflow_model(state_dict, with_weights, minilm_hybrid):
    """MiniLM with one token's embedding row set to 1e5: fine in float32, inf (then NaN) in float16."""
    token = minilm_hybrid.engine.tokenizer.encode(["zebra"])[0][1]
    words = state_dict["embeddings.word_embeddings.weight"].clone()
    words[token] = 1e5
    return with_weights({**state_dict, "embeddings.word_embeddings.weight": words})


def test_non_finite_output_raises_without_the_guard(overflow_model):
    texts = ["a quiet morning", "the zebra runs", "plain words here"]
    llm = LLM(overflow_model, dtype="float16", precision_guard=False)
    with pytest.raises(NonFiniteOutputError) as exc:
        llm.embed(texts)
    msg = str(exc.value)
    assert "inputs [1]" in msg  # only the text with the overflowing token
    assert "policy float16" in msg
    assert "dtype='float32'" in msg  # the suggested remedy
    assert isinstance(exc.value, FloatingPointError)
    # the remedy works
    ok = LLM(overflow_model, dtype="float32").embed(texts)
    assert np.isfinite(ok).all()


def test_guard_falls_back_to_hybrid_and_matches_float32(overflow_model, caplog):
    texts = ["a quiet morning", "the zebra runs", "plain words here"]
    llm = LLM(overflow_model, dtype="float16")
    with caplog.at_level("WARNING", logger="hyprec"):
        out = llm.embed(texts)
    assert np.isfinite(out).all()
    assert llm.policy.name == "hybrid-fp16"  # remembered for this instance
    event = llm.engine.guard_events[0]
    assert event.policy == "float16" and event.quantity == "residual stream" and event.layer.startswith("layer ")
    assert any("precision guard" in r.getMessage() and event.layer in r.getMessage() for r in caplog.records)
    ref = LLM(overflow_model, dtype="float32").embed(texts)
    assert (out * ref).sum(1).min() > 0.99999


def test_guard_raise_is_typed(overflow_model):
    from hyprec.precision.guard import PrecisionOverflowError

    llm = LLM(overflow_model, dtype="float16", on_nonfinite="raise")
    with pytest.raises(PrecisionOverflowError) as exc:
        llm.embed(["the zebra runs"])
    assert exc.value.event.layer in str(exc.value) and "float16" in str(exc.value)


def test_guard_records_stay_bounded_and_a_later_pass_is_still_checked(overflow_model):
    from hyprec.precision.guard import PrecisionOverflowError

    llm = LLM(overflow_model, dtype="float16", on_nonfinite="raise")
    guard = llm.engine.guard
    ids = llm.engine.tokenize(["a quiet morning"])
    for _ in range(50):
        llm.engine.hidden_states(ids)  # forward passes nobody asks the guard about
    assert guard.record_count <= 16 * len(guard.blocks)
    with pytest.raises(PrecisionOverflowError, match="residual stream"):
        llm.embed(["the zebra runs"])


def test_non_finite_guard_names_index_and_hybrid_policy(minilm_dir):
    llm = LLM(minilm_dir, on_nonfinite="ignore")  # the guard only logs; the final barrier must still refuse
    engine = llm.engine
    marker = engine.tokenizer.encode(["zebra"])[0][1]

    def poison(_model, args, hidden):  # the marker token's hidden state becomes inf (pooling spreads it)
        hidden = hidden.clone()
        hidden[args[0] == marker] = float("inf")
        return hidden

    handle = engine.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteOutputError) as exc:
        llm.embed(["one", "two", "three", "a zebra", "five"], batch_size=2)
    handle.remove()
    assert "inputs [3]" in str(exc.value)
    assert f"policy {llm.policy.name}" in str(exc.value)
