"""Float32 linear layers from bfloat16 products (``matmul_precision``): accuracy bounds, policy choice, invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyprec.dtype_policy import resolve_matmul, resolve_policy
from hyprec.errors import ConfigError
from hyprec.hardware import BF16X3, KernelProfile
from hyprec.layers.compensated import SplitWeight, bf16_gemm_available, split_linear

needs_gemm = pytest.mark.skipif(not bf16_gemm_available(), reason="this PyTorch build has no bf16 -> f32 GEMM")


def profile(x3_ms: float) -> KernelProfile:
    return KernelProfile(
        device="cpu",
        hardware="test CPU",
        threads=2,
        torch_version=torch.__version__,
        linear_ms={"float32": 1.0, "float16": 1.0, "bfloat16": 0.2, BF16X3: x3_ms},
        attention_ms={"float32": 1.0, "float16": 1.0, "bfloat16": 1.0},
        source="test",
    )


def _case(rows: int = 67, k: int = 384, n: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * 3
    w = torch.randn(n, k, generator=gen) * k**-0.5
    b = torch.randn(n, generator=gen)
    magnitude = x.abs().double() @ w.abs().double().T  # sum_k |x_k w_k|: the scale every rounding error is relative to
    return x, w, b, (x.double() @ w.double().T + b.double()), magnitude


@needs_gemm
def test_compensated_product_error_is_float32_grade():
    x, w, b, exact, magnitude = _case()
    got = split_linear(x, SplitWeight.of(w, "high"), b).double()
    # Three products drop x_lo*w_lo (<= 2^-16 |x||w|) and round each tail to bfloat16 (<= 2^-17 each), then
    # accumulate in float32: every element within 2^-15 of sum|x||w| (plain bfloat16 is ~2^-8).
    assert ((got - exact).abs() <= 2**-15 * magnitude + 1e-6).all()
    # One product (medium) is bfloat16-grade: within 2^-7 but clearly outside the float32-grade bound.
    one = split_linear(x, SplitWeight.of(w, "medium"), b).double()
    assert ((one - exact).abs() <= 2**-7 * magnitude + 1e-6).all()
    assert not ((one - exact).abs() <= 2**-15 * magnitude + 1e-6).all()


@needs_gemm
def test_rows_do_not_depend_on_their_neighbours_shape():
    x, w, b, _, _ = _case(rows=130)
    split = SplitWeight.of(w, "high")
    full = split_linear(x, split, b)
    assert split_linear(x[:0], split, b).shape == (0, 200)
    # Leading dimensions are kept; with and without bias.
    assert split_linear(x.view(2, 65, 384), split, None).shape == (2, 65, 200)
    assert torch.allclose(full, split_linear(x, split, None) + b, rtol=0, atol=1e-5)


def test_auto_picks_the_compensated_product_only_where_measured_faster():
    base = resolve_policy("float32")
    fast, slow = (lambda: profile(0.5)), (lambda: profile(1.5))
    if bf16_gemm_available():
        p = resolve_matmul(base, "auto", kernel_speeds=fast)
        assert p.matmul == "high" and p.name == "float32+bf16x3" and "bf16x3 0.50 ms" in p.reason
    assert resolve_matmul(base, "auto", kernel_speeds=slow).matmul == "highest"
    # Generation keeps float32 GEMMs (decode is bound by weight bytes, and the two bfloat16 parts weigh as much).
    assert resolve_matmul(base, "auto", generative=True, kernel_speeds=fast).matmul == "highest"
    # Whole-model half precision has no float32 GEMMs to speed up.
    assert resolve_matmul(resolve_policy("bfloat16"), "auto", kernel_speeds=fast).matmul == "highest"


def test_explicit_choices_are_checked():
    with pytest.raises(ConfigError, match="matmul_precision='high' applies to float32 weights"):
        resolve_matmul(resolve_policy("bfloat16"), "high")
    with pytest.raises(ConfigError, match="matmul_precision='fastest'"):
        resolve_matmul(resolve_policy("float32"), "fastest")
    from hyprec import LLM
    from hyprec.errors import HyprecError

    with pytest.raises(HyprecError, match="matmul_precision='bf16'"):
        LLM("minilm", matmul_precision="bf16")


@needs_gemm
def test_minilm_high_precision_matches_float32(minilm_fp32, eval_texts):
    from hyprec import LLM

    high = LLM("minilm", dtype="float32", matmul_precision="high")
    assert high.policy.name == "float32+bf16x3" and high.info()["policy"]["matmul_precision"] == "high"
    ours, ref = high.embed(eval_texts), minilm_fp32.embed(eval_texts)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 1 - 1e-6  # measured 1 - 2.4e-7 (float32's own cosine rounding is ~1e-7)
    medium = LLM("minilm", dtype="float32", matmul_precision="medium").embed(eval_texts)
    cos_medium = (medium * ref).sum(1) / np.linalg.norm(medium, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos_medium.min() < cos.min()  # one bfloat16 product is measurably coarser


@needs_gemm
def test_high_precision_is_batch_invariant_in_deterministic_mode(eval_texts):
    from hyprec import LLM

    llm = LLM("minilm", dtype="float32", matmul_precision="high", deterministic=True)
    texts = eval_texts[:24]
    together = llm.embed(texts)
    alone = np.stack([llm.embed([t])[0] for t in texts[:6]])
    np.testing.assert_array_equal(together[:6], alone)
