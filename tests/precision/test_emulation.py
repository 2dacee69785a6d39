"""Emulated half precision (``half_arithmetic``, :mod:`hyprec.precision.emulation`) against the native kernels.

Emulation rounds to float16/bfloat16 wherever the native model holds a tensor in it and computes in float32, which
is what a half GEMM accumulating in float32 does up to the order of its sums. The tests run on any x86 CPU: where
the CPU has no half hardware, PyTorch's native half kernels are slow but exact, so the comparison holds there too.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hyprec import LLM
from hyprec.config import EngineConfig
from hyprec.entrypoints.cli import main
from hyprec.errors import ConfigError
from hyprec.precision.emulation import emulated_formats
from hyprec.precision.guard import PrecisionOverflowError
from hyprec.precision.policy import resolve_policy
from hyprec.tools.compare import HyprecReference, compare_generation
from hyprec.tools.measure import POLICY_ARGS, open_policy, row_cosines
from hyprec.tools.repair import render, repair
from tests.helpers import clean_llama, huge_norm_gain, massive_residual

#: Unit roundoff of each half format (half the spacing of the numbers in [1, 2)).
UNIT_ROUNDOFF = {"float16": 2**-11, "bfloat16": 2**-8}
#: Emulated and native embeddings of a text may differ by this many units of roundoff, relative to their norm. They
#: round the same tensors; only the order of the sums differs (and the attention kernel's rounding of its softmax
#: weights), which flips the last bit of some elements, and six layers carry those flips on. Measured on the 200
#: evaluation texts: at most 4.6 u for whole-model float16/bfloat16, 0.9 u for hybrid.
RELATIVE_UNITS = 8
ENGINE = {"max_model_len": 128, "num_kv_blocks": 16}
TOKENS = [list(range(3, 60)), list(range(10, 90, 2))]
PROMPTS = [[5, 6, 7], [40, 41, 42, 43]]


def _policy_dtype(policy: str) -> str:
    return "bfloat16" if policy.endswith(("bf16", "bfloat16")) else "float16"


def _arithmetic(llm: LLM) -> str:
    return llm.info()["half_arithmetic"]


def _hooks(llm: LLM) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in llm.engine.model.modules())


# ------------------------------------------------------------------ agreement with the native kernels


@pytest.fixture(scope="module")
def texts(eval_texts):
    return eval_texts[::10]  # 20 texts, long, medium and very short (few: native float16 may be slow on this CPU)


@pytest.fixture(scope="module")
def reference(minilm_fp32, texts):
    return minilm_fp32.embed(texts)


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "hybrid-fp16", "hybrid-bf16"])
def test_emulated_minilm_matches_native(minilm_dir, texts, reference, policy):
    native = LLM(minilm_dir, precision_guard=False, **POLICY_ARGS[policy])
    emulated = LLM(minilm_dir, precision_guard=False, half_arithmetic="emulated", **POLICY_ARGS[policy])
    assert native.policy.name == emulated.policy.name == policy
    assert _arithmetic(native) == "native" and _hooks(native) == 0  # the native model is untouched
    assert _arithmetic(emulated) == f"{_policy_dtype(policy)} emulated"
    assert all(p.dtype == torch.float32 for p in emulated.engine.model.parameters())
    u = UNIT_ROUNDOFF[_policy_dtype(policy)]
    ours, theirs = emulated.embed(texts), native.embed(texts)
    relative = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert relative.max() <= RELATIVE_UNITS * u, relative.max() / u
    # 1 - cos = |d|^2 / 2 for a small difference d orthogonal to the vector, at most (RELATIVE_UNITS u)^2 / 2.
    assert row_cosines(ours, theirs).min() >= 1 - RELATIVE_UNITS**2 * u**2 / 2
    # What `compare` reports, the drift from float32, comes out the same size either way.
    drift_native = 1 - row_cosines(theirs, reference).min()
    drift_emulated = 1 - row_cosines(ours, reference).min()
    assert drift_native / 2 <= drift_emulated <= 2 * drift_native, (drift_native, drift_emulated)


def test_float32_has_nothing_to_emulate(minilm_dir, minilm_fp32, texts, reference):
    llm = LLM(minilm_dir, dtype="float32", half_arithmetic="emulated")
    assert _arithmetic(llm) == "native"
    np.testing.assert_array_equal(llm.embed(texts), reference)


# ------------------------------------------------------------------ overflow is seen the same way


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("emulation_zoo")
    for build in (massive_residual, huge_norm_gain, clean_llama):
        build(root / build.__name__)
    return {build.__name__: root / build.__name__ for build in (massive_residual, huge_norm_gain, clean_llama)}


def _guard_event(path, arithmetic: str, **policy):
    llm = LLM(path, on_nonfinite="raise", half_arithmetic=arithmetic, **ENGINE, **policy)
    with pytest.raises(PrecisionOverflowError) as exc:
        llm.engine.score(TOKENS[0])
    return exc.value.event


@pytest.mark.parametrize(
    ("model", "policy"),
    [
        ("massive_residual", {"dtype": "float16"}),  # the residual stream passes 65504 (inf, then NaN)
        ("huge_norm_gain", {"dtype": "hybrid", "attn_dtype": "float16"}),  # q/k/v pass 65504 in float32
    ],
)
def test_guard_sees_the_same_overflow(zoo_dirs, model, policy):
    native = _guard_event(zoo_dirs[model], "native", **policy)
    emulated = _guard_event(zoo_dirs[model], "emulated", **policy)
    assert (emulated.layer, emulated.quantity, emulated.policy) == (native.layer, native.quantity, native.policy)
    if np.isfinite(native.value):  # the guard sees q/k/v before the emulated rounding, as before the native cast
        assert emulated.value == pytest.approx(native.value, rel=1e-3)
    else:
        assert not np.isfinite(emulated.value)


def test_compare_counts_the_same_non_finite_logits_and_names_the_arithmetic(zoo_dirs):
    path = zoo_dirs["massive_residual"]
    reference = HyprecReference(open_policy(path, "float32", device="cpu"))
    rows = {}
    for arithmetic in ("native", "emulated"):
        load = functools.partial(open_policy, path, device="cpu", half_arithmetic=arithmetic)
        rows[arithmetic] = compare_generation(reference, load, ["float16"], TOKENS, PROMPTS)[0]
    assert rows["native"]["arithmetic"] == "native" and rows["emulated"]["arithmetic"] == "float16 emulated"
    for key in ("non_finite_logits", "greedy_identical_prefix", "top5_close"):
        assert rows["emulated"][key] == rows["native"][key]
    assert rows["native"]["non_finite_logits"] == sum(len(t) - 1 for t in TOKENS)


def test_guard_fallback_keeps_emulating(zoo_dirs):
    llm = LLM(zoo_dirs["massive_residual"], dtype="float16", half_arithmetic="emulated", **ENGINE)
    llm.engine.score(TOKENS[0])
    assert llm.engine.guard_events[0].layer == "layer 0" and llm.policy.name == "hybrid-fp16"
    assert _arithmetic(llm) == "float16 emulated"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_emulated_decoder_logits_match_native(zoo_dirs, dtype):
    native, emulated = (
        torch.cat(
            [
                x
                for _, x in LLM(zoo_dirs["clean_llama"], dtype=dtype, half_arithmetic=a, **ENGINE).engine.logits(
                    TOKENS[0]
                )
            ]
        )
        for a in ("native", "emulated")
    )
    # A few units of roundoff of the largest logit.
    assert (emulated - native).abs().max() <= RELATIVE_UNITS * UNIT_ROUNDOFF[dtype] * native.abs().max()
    assert torch.equal(emulated.argmax(1), native.argmax(1))


# ------------------------------------------------------------------ auto follows the device's kernel speeds


@pytest.fixture
def slow_float16(tmp_path, monkeypatch):
    """The suite's pinned kernel profile, with the linear layers of a CPU without float16 hardware (AMD Zen 4:
    float16 at 0.23x float32, bfloat16 at 2.6x)."""
    profile = json.loads(Path(os.environ["HYPREC_KERNEL_PROFILE"]).read_text())  # pinned by conftest.py
    profile["linear_ms"] |= {"float32": 1.0, "float16": 4.3, "bfloat16": 0.4}
    path = tmp_path / "zen4.json"  # a new path: hyprec.hardware memoises per pinned file
    path.write_text(json.dumps(profile))
    monkeypatch.setenv("HYPREC_KERNEL_PROFILE", str(path))
    return path


def test_auto_emulates_only_formats_without_hardware(zoo_dirs, slow_float16):
    path = zoo_dirs["clean_llama"]
    assert _arithmetic(LLM(path, dtype="float16", half_arithmetic="auto", **ENGINE)) == "float16 emulated"
    assert _arithmetic(LLM(path, dtype="bfloat16", half_arithmetic="auto", **ENGINE)) == "native"
    assert _arithmetic(LLM(path, dtype="float16", **ENGINE)) == "native"  # the engine's default
    hybrid_fp16 = resolve_policy("hybrid", "float16")
    assert emulated_formats("auto", hybrid_fp16, "cpu") == {torch.float16}
    assert emulated_formats("native", hybrid_fp16, "cpu") == set()
    assert emulated_formats("emulated", resolve_policy("float32"), "cpu") == set()  # nothing to emulate


def test_auto_is_native_where_every_format_is_fast(zoo_dirs):
    # The suite's pinned profile (tests/conftest.py): float16 and bfloat16 linear layers at float32's speed.
    assert emulated_formats("auto", resolve_policy("float16"), "cpu") == set()
    assert _arithmetic(LLM(zoo_dirs["clean_llama"], dtype="float16", half_arithmetic="auto", **ENGINE)) == "native"


@pytest.mark.parametrize(
    ("model", "target", "bf16"),
    [
        ("massive_residual", "float16", False),  # all in float16 behind a rescaled residual stream
        ("huge_norm_gain", "float16", True),  # layer 1 (q/k/v overflow float16) kept out, attending in bfloat16
        ("clean_llama", "bfloat16", True),  # bfloat16 layers attending in (certified) float16
    ],
)
def test_repair_emulates_on_a_cpu_without_float16_and_says_so(zoo_dirs, slow_float16, tmp_path, model, target, bf16):
    path, tokens = zoo_dirs[model], [t[:40] for t in TOKENS]
    plans = {a: repair(path, target=target, texts=tokens, tolerance=0.9, half_arithmetic=a) for a in ("auto", "native")}
    # Each format as the (pinned) device runs it: bfloat16 natively, float16 emulated.
    assert plans["auto"].search["arithmetic"] == ("bfloat16 native, " if bf16 else "") + "float16 emulated"
    assert plans["native"].search["arithmetic"] == ("bfloat16 native, " if bf16 else "") + "float16 native"
    assert "(half precision: " + plans["auto"].search["arithmetic"] + ")" in render(plans["auto"])
    # The same search decisions: the same plan.
    assert plans["auto"].layers == plans["native"].layers and plans["auto"].edges == plans["native"].edges
    assert plans["auto"].residual_scale_log2 == plans["native"].residual_scale_log2
    # The plan file runs emulated too (under auto only its float16 parts), as close to native as whole-model policies.
    plan_file = plans["native"].save(tmp_path / "plan.json")
    llms = {a: LLM(path, precision_plan=plan_file, half_arithmetic=a, **ENGINE) for a in ("native", "auto", "emulated")}
    assert _arithmetic(llms["auto"]) == "float16 emulated"
    logits = {a: torch.cat([x for _, x in llm.engine.logits(TOKENS[0])]) for a, llm in llms.items()}
    for arithmetic in ("auto", "emulated"):
        difference = (logits[arithmetic] - logits["native"]).abs().max()
        assert difference <= RELATIVE_UNITS * UNIT_ROUNDOFF[target] * logits["native"].abs().max()


# ------------------------------------------------------------------ the option


@pytest.mark.parametrize("value", ["fast", "", None, True, "Native"])
def test_bad_values_name_the_option(value):
    with pytest.raises(ConfigError, match=r"half_arithmetic=.*expected one of native, emulated, auto"):
        EngineConfig(half_arithmetic=value)


def test_bad_value_through_llm_and_cli(minilm_dir, capsys):
    with pytest.raises(ConfigError, match="half_arithmetic='fast'"):
        LLM(minilm_dir, half_arithmetic="fast")
    assert main(["-q", "compare", "minilm", "--policies", "float32", "--half-arithmetic", "fast"]) == 2
    assert "half_arithmetic='fast'" in capsys.readouterr().err


def test_guard_watches_only_what_can_overflow(zoo_dirs, minilm_hybrid):
    from hyprec.precision.guard import qkv_cannot_overflow

    # MiniLM's weights certify float16 q/k/v in every layer: the default policy's guard needs no hook at all.
    engine = minilm_hybrid.engine
    assert engine.policy.attn_dtype == torch.float16 and engine.guard is not None
    assert engine.guard.hook_count == 0
    layers = engine.policy.layer_dtypes(len(engine.guard.blocks))
    assert qkv_cannot_overflow(engine.model, layers) == set(range(len(layers)))
    # bfloat16 attention has float32's range; a layer whose bound fails float16 is watched (and overflows: above).
    llm = LLM(zoo_dirs["huge_norm_gain"], dtype="hybrid", attn_dtype="bfloat16", **ENGINE)
    assert llm.engine.guard.hook_count == 0
    watched = LLM(zoo_dirs["huge_norm_gain"], dtype="hybrid", attn_dtype="float16", on_nonfinite="ignore", **ENGINE)
    n = len(watched.engine.guard.blocks)
    assert 0 < watched.engine.guard.hook_count < n + 1
    assert qkv_cannot_overflow(watched.engine.model, watched.engine.policy.layer_dtypes(n)) != set(range(n))
