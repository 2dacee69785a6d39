"""The engine owns the rebuild after a guard fallback: the guard names a safer policy, and the model moves there in
place when only attention dtypes change, reloading from the checkpoint only when the weights must change. The
result is what a fresh load under the new policy computes."""

from __future__ import annotations

import pytest
import torch

from hyprec import LLM
from hyprec.layers.attention import Attention
from hyprec.precision.guard import safer_policy
from hyprec.precision.policy import resolve_policy
from tests.helpers import huge_norm_gain, massive_residual

pytestmark = pytest.mark.usefixtures("single_thread")
ENGINE = {"max_model_len": 128, "num_kv_blocks": 16}
TOKENS = list(range(3, 60))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded_zoo")
    for build in (huge_norm_gain, massive_residual):
        build(root / build.__name__)
    return root


def _weights(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def _attention_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {m.attn_dtype for m in model.modules() if isinstance(m, Attention)}


def _logits(llm: LLM) -> torch.Tensor:
    return torch.cat([x for _, x in llm.engine.logits(TOKENS)])


@pytest.mark.parametrize(
    ("policy", "quantity", "safer"),
    [
        ("float16", "residual", "hybrid-fp16"),
        ("float16", "q/k/v", "hybrid-bf16"),
        ("bfloat16", "residual", "hybrid-bf16"),
        ("hybrid-fp16", "q/k/v", "hybrid-bf16"),
        ("hybrid-bf16", "residual", "float32"),
    ],
)
def test_the_guard_names_a_resolved_safer_policy(policy, quantity, safer):
    mode, _, attn = policy.partition("-")
    half = {"fp16": "float16", "bf16": "bfloat16"}
    current = resolve_policy("hybrid", half[attn]) if attn else resolve_policy(mode)
    step = safer_policy(current, quantity)
    assert step.name == safer and f"fallback from {current.name}" in step.reason
    assert step.compute_dtype == torch.float32 and step.kv_cache_dtype == step.attn_dtype


def test_no_policy_is_safer_than_float32():
    assert safer_policy(resolve_policy("float32"), "residual") is None


def test_an_attention_fallback_keeps_every_weight_in_place(zoo):
    path = zoo / "huge_norm_gain"  # q/k/v pass 65504 in float32: float16 attention overflows, bfloat16 does not
    llm = LLM(path, dtype="hybrid", attn_dtype="float16", **ENGINE)
    model, weights = llm.engine.model, _weights(llm.engine.model)
    got = _logits(llm)
    event = llm.engine.guard_events[0]
    assert event.quantity == "q/k/v" and event.new_policy == "hybrid-bf16" and llm.policy.name == "hybrid-bf16"
    assert llm.engine.model is model and _weights(model) == weights  # cast in place: nothing reloaded
    assert _attention_dtypes(model) == {torch.bfloat16}
    assert {k.dtype for k in llm.engine.kv_cache.keys} == {torch.bfloat16}  # the cache was rebuilt for it
    fresh = LLM(path, dtype="hybrid", attn_dtype="bfloat16", **ENGINE)
    assert torch.equal(got, _logits(fresh))


def test_a_weight_fallback_reloads_from_the_checkpoint(zoo):
    path = zoo / "massive_residual"  # the residual stream passes 65504: whole-model float16 must become hybrid
    llm = LLM(path, dtype="float16", **ENGINE)
    model = llm.engine.model
    got = _logits(llm)
    assert llm.policy.name == "hybrid-fp16" and llm.engine.model is not model
    assert {p.dtype for p in llm.engine.model.parameters()} == {torch.float32}
    assert torch.equal(got, _logits(LLM(path, dtype="hybrid", attn_dtype="float16", **ENGINE)))


def test_with_policy_moves_an_engine_between_policies(zoo):
    """The public switch the tools use: the same model object, the new attention dtype, a fresh load's numbers."""
    path = zoo / "massive_residual"
    llm = LLM(path, dtype="hybrid", attn_dtype="bfloat16", precision_guard=False, **ENGINE)
    model = llm.engine.model
    llm.engine.with_policy(resolve_policy("float32"))
    assert llm.policy.name == "float32" and llm.engine.model is model
    assert _attention_dtypes(model) == {torch.float32}
    assert torch.equal(_logits(llm), _logits(LLM(path, dtype="float32", precision_guard=False, **ENGINE)))


def test_score_returns_a_finite_mask_or_raises(zoo):
    from hyprec.errors import NonFiniteOutputError

    llm = LLM(zoo / "massive_residual", dtype="float16", precision_guard=False, **ENGINE)
    with pytest.raises(NonFiniteOutputError, match="non-finite logits"):
        llm.engine.score(TOKENS)
    scores = llm.engine.score(TOKENS, allow_nonfinite=True)
    assert len(scores.argmax) == len(scores.target_logprobs) == len(scores.finite) == len(TOKENS) - 1
    assert not scores.finite.any()  # the overflow reaches every position
