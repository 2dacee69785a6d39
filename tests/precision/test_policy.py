"""The dtype policy: names, auto resolution, invalid combinations, and its visibility on a loaded model."""

from __future__ import annotations

import pytest
import torch

from hyprec import LLM
from hyprec.errors import ConfigError
from hyprec.precision.policy import resolve_policy

DTYPE_NAMES = "auto, float32, float16, bfloat16, hybrid"
ATTN_NAMES = "auto, float32, float16, bfloat16"


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


# ------------------------------------------------------------------------------- names and aliases through LLM


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        pytest.param({"dtype": "float8"}, ["dtype='float8'", DTYPE_NAMES], id="dtype"),
        pytest.param({"dtype": 16}, ["dtype=16", DTYPE_NAMES], id="dtype-int"),
        pytest.param({"dtype": torch.float64}, ["dtype='float64'", DTYPE_NAMES], id="dtype-torch-f64"),
        pytest.param({"attn_dtype": "fp8"}, ["attn_dtype='fp8'", ATTN_NAMES], id="attn"),
        pytest.param({"attn_dtype": "hybrid"}, ["attn_dtype='hybrid'", ATTN_NAMES], id="attn-hybrid"),
        pytest.param({"kv_cache_dtype": "int8"}, ["kv_cache_dtype='int8'", ATTN_NAMES], id="kv"),
    ],
)
def test_invalid_dtype_names(minilm_dir, kwargs, names):
    with pytest.raises(ConfigError) as exc:
        LLM(minilm_dir, **kwargs)
    for name in names:
        assert name in str(exc.value)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        pytest.param(
            {"dtype": "float32", "attn_dtype": "float16"},
            ["dtype='float32'", "attn_dtype", "'float16'", "dtype='hybrid'"],
            id="f32+attn-f16",
        ),
        pytest.param(
            {"dtype": "hybrid", "attn_dtype": "float32"},
            ["dtype='hybrid'", "attn_dtype='float32'", "dtype='float32'"],
            id="hybrid+attn-f32",
        ),
        pytest.param(
            {"dtype": "bfloat16", "attn_dtype": "float16"},
            ["dtype='bfloat16'", "'float16'"],
            id="bf16+attn-f16",
        ),
        pytest.param(
            {"dtype": "bf16", "attn_dtype": "fp16"},
            ["dtype='bfloat16'", "'float16'"],
            id="aliases-bf16+attn-fp16",
        ),
        pytest.param(
            {"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "bfloat16"},
            ["kv_cache_dtype='bfloat16'", "attn_dtype='float16'"],
            id="kv-bf16+attn-f16",
        ),
        pytest.param(
            {"dtype": "float16", "kv_cache_dtype": "bfloat16"},
            ["kv_cache_dtype='bfloat16'", "attn_dtype='float16'"],
            id="f16+kv-bf16",
        ),
    ],
)
def test_invalid_dtype_combinations(minilm_dir, kwargs, names):
    with pytest.raises(ConfigError) as exc:
        LLM(minilm_dir, **kwargs)
    for name in names:
        assert name in str(exc.value)


@pytest.mark.parametrize(
    ("args", "mode", "attn", "kv"),
    [
        (("fp16",), "float16", torch.float16, torch.float16),
        (("bf16",), "bfloat16", torch.bfloat16, torch.bfloat16),
        (("FP32",), "float32", torch.float32, torch.float32),
        (("half",), "float16", torch.float16, torch.float16),
        ((torch.float16,), "float16", torch.float16, torch.float16),
        (("hybrid", "bf16"), "hybrid", torch.bfloat16, torch.bfloat16),
        (("hybrid", "fp16", "fp32"), "hybrid", torch.float16, torch.float32),
        (("hybrid", "float16", "float16"), "hybrid", torch.float16, torch.float16),
    ],
)
def test_dtype_aliases_accepted(args, mode, attn, kv):
    policy = resolve_policy(*args)
    assert (policy.mode, policy.attn_dtype, policy.kv_cache_dtype) == (mode, attn, kv)


def test_dtype_alias_through_llm(minilm_dir):
    llm = LLM(minilm_dir, dtype="fp16")
    assert llm.policy.name == "float16"
    assert llm.policy.compute_dtype == torch.float16
