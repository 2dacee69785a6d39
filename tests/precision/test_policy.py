"""The dtype policy: names, auto resolution, invalid combinations, and its visibility on a loaded model."""

from __future__ import annotations

import pytest
import torch

from hyprec.errors import ConfigError
from hyprec.precision.policy import resolve_policy


def test_float32_checkpoint_resolves_to_hybrid_fp16_when_certified():
    p = resolve_policy(checkpoint_dtype=torch.float32, fp16_attention_safe=lambda: (True, "bound 47"))
    assert p.mode == "hybrid" and p.name == "hybrid-fp16"
    assert (p.compute_dtype, p.attn_dtype, p.kv_cache_dtype) == (torch.float32, torch.float16, torch.float16)
    assert "bound 47" in p.reason


def test_uncertified_attention_falls_back_to_bfloat16():
    p = resolve_policy(fp16_attention_safe=lambda: (False, "q bound 1e6 at layer 3"))
    assert p.name == "hybrid-bf16" and p.attn_dtype == torch.bfloat16
    assert "layer 3" in p.reason


@pytest.mark.parametrize("ckpt", [torch.bfloat16, torch.float16])
def test_half_checkpoint_runs_in_its_own_dtype(ckpt):
    p = resolve_policy(checkpoint_dtype=ckpt)
    assert p.compute_dtype == p.attn_dtype == p.kv_cache_dtype == ckpt


def test_the_safety_check_runs_only_when_needed():
    def boom():
        raise AssertionError("must not be called")

    assert resolve_policy("float32", fp16_attention_safe=boom).attn_dtype == torch.float32
    assert resolve_policy("hybrid", "bfloat16", fp16_attention_safe=boom).attn_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("float32", "auto", "auto"), (torch.float32, torch.float32, torch.float32)),
        (("hybrid", "float16", "auto"), (torch.float32, torch.float16, torch.float16)),
        (("hybrid", "bf16", "float32"), (torch.float32, torch.bfloat16, torch.float32)),
        (("fp16", "auto", "auto"), (torch.float16, torch.float16, torch.float16)),
        ((torch.bfloat16, torch.bfloat16, "auto"), (torch.bfloat16, torch.bfloat16, torch.bfloat16)),
    ],
)
def test_explicit_policies(args, expected):
    p = resolve_policy(*args)
    assert (p.compute_dtype, p.attn_dtype, p.kv_cache_dtype) == expected


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dtype": "float64"}, "auto, float32, float16, bfloat16, hybrid"),
        ({"attn_dtype": "int8"}, "auto, float32, float16, bfloat16"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8'"),
        ({"dtype": 3}, "dtype=3"),
        ({"dtype": "float32", "attn_dtype": "float16"}, "use dtype='hybrid'"),
        ({"dtype": "hybrid", "attn_dtype": "float32"}, "use dtype='float32'"),
        ({"dtype": "bfloat16", "attn_dtype": "float16"}, "attn_dtype must be 'auto' or 'bfloat16'"),
        ({"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "bfloat16"}, "two half formats"),
    ],
)
def test_invalid_names_and_combinations(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        resolve_policy(**kwargs)
    assert needle in str(err.value)


def test_policy_is_visible_on_the_engine(minilm_hybrid):
    policy = minilm_hybrid.policy
    assert policy.name == "hybrid-fp16"  # MiniLM's weights certify fp16 attention inputs
    info = minilm_hybrid.info()
    assert info["policy"]["attn_dtype"] == "float16" and info["policy"]["compute_dtype"] == "float32"
    assert "bound" in info["policy"]["reason"]


def test_policy_is_logged_once_at_load(caplog):
    from hyprec import LLM

    with caplog.at_level("INFO", logger="hyprec"):
        llm = LLM("minilm", dtype="hybrid", attn_dtype="bfloat16")
    records = [r for r in caplog.records if "policy" in r.getMessage()]
    assert len(records) == 1 and llm.policy.name in records[0].getMessage()
