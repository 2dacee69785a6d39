"""Float32 linear layers from bfloat16 products (``matmul_precision``) and on oneDNN (``float32_gemm``): accuracy
bounds, policy choice, invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyprec.errors import ConfigError
from hyprec.hardware import BF16X3, FLOAT32_ONEDNN
from hyprec.layers import onednn
from hyprec.layers.compensated import SplitWeight, bf16_gemm_available, split_linear
from hyprec.layers.gemm_probe import GemmProfile
from hyprec.layers.linear import Linear
from hyprec.precision.policy import resolve_matmul, resolve_policy

needs_gemm = pytest.mark.skipif(not bf16_gemm_available(), reason="this PyTorch build has no bf16 -> f32 GEMM")


def profile(x3_ms: float) -> GemmProfile:
    return GemmProfile({"float32": 1.0, BF16X3: x3_ms}, rows=512, source="test")


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
        p = resolve_matmul(base, "auto", gemm_speeds=fast)
        assert p.matmul == "high" and p.name == "float32+bf16x3" and "bf16x3 0.50 ms" in p.reason
    assert resolve_matmul(base, "auto", gemm_speeds=slow).matmul == "highest"
    # bf16x3 must beat the fastest exact float32 library, not just F.linear.
    if bf16_gemm_available() and onednn.available():
        close = GemmProfile({"float32": 1.0, BF16X3: 0.85, FLOAT32_ONEDNN: 0.9}, rows=512, source="test")
        assert resolve_matmul(base, "auto", gemm_speeds=lambda: close).matmul == "highest"
        assert resolve_matmul(base, "auto", float32_gemm="torch", gemm_speeds=lambda: close).matmul == "high"
    # Generation keeps float32 GEMMs (decode is bound by weight bytes, and the two bfloat16 parts weigh as much).
    assert resolve_matmul(base, "auto", generative=True, gemm_speeds=fast).matmul == "highest"
    # Whole-model half precision has no float32 GEMMs to speed up.
    assert resolve_matmul(resolve_policy("bfloat16"), "auto", gemm_speeds=fast).matmul == "highest"


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


# ---------------------------------------------------------------------------------------------------------------
# Float32 GEMMs on oneDNN (float32_gemm): prepacked weights, fused activations
# ---------------------------------------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN linear operators")


def gemm_profile(onednn_ms: float) -> GemmProfile:
    p = profile(2.0)
    p.ms[FLOAT32_ONEDNN] = onednn_ms
    return p


def _linear(activation: str | None, bias: bool = True, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(96, 200, bias=bias, activation=activation)
    with torch.no_grad():
        layer.weight.mul_(3)
    return layer


def _float32_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    # Both are float32 GEMMs with float32 accumulation in different orders: each element within a few units of
    # float32 roundoff (2^-24) times K times sum|x||w| (a worst-case bound; the measured error is ~1e-6 of it).
    bound = 96 * 2.0**-24 * (x.abs() @ w.abs().T) + 1e-6
    assert ((got - want).abs() <= bound).all()


@needs_onednn
@pytest.mark.parametrize("activation", [None, *onednn.POST_OPS, "quick_gelu"])
def test_onednn_kernel_matches_f_linear_with_its_activation(activation):
    layer = _linear(activation)
    x = torch.randn(37, 96)
    with torch.inference_mode():
        want = layer(x)  # kernel "torch": F.linear, then the activation unfused
        layer.kernel = "onednn"
        got = layer(x)
    assert layer.prepared is not None  # the oneDNN path really ran
    pre = torch.nn.functional.linear(x, layer.weight, layer.bias)
    if activation is not None:  # a wrong or missing activation is far outside the float32 bound
        assert not torch.allclose(pre, want, atol=1e-3)
    _float32_close(got, want, x, layer.weight)
    # Leading dimensions, no bias, no rows.
    nobias = _linear(activation, bias=False)
    nobias.kernel = "onednn"
    with torch.inference_mode():
        assert nobias(x.view(37, 1, 96)).shape == (37, 1, 200)
        assert nobias(x[:0]).shape == (0, 200)


@needs_onednn
def test_packed_weight_follows_every_change_of_the_weight_and_survives_deepcopy():
    import copy

    layer = _linear(None)
    layer.kernel = "onednn"
    x = torch.randn(5, 96)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(0.5)  # what an exact rescale does
    with torch.inference_mode():
        after = layer(x)
        _float32_close(after, torch.nn.functional.linear(x, layer.weight, layer.bias), x, layer.weight)
        assert not torch.allclose(after, before, atol=1e-2)  # a stale packed weight would still give `before`
    twin = copy.deepcopy(layer)  # opaque packed tensors cannot be copied: the copy packs its own
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), after, rtol=0, atol=0)  # same packed GEMM, same bits
    assert twin.prepared is not None
    layer.to(torch.bfloat16)  # a half-precision layer keeps its own arithmetic
    with torch.inference_mode():
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_auto_picks_onednn_for_encoders_only_where_measured_faster():
    base = resolve_policy("float32")
    fast, slow = (lambda: gemm_profile(0.5)), (lambda: gemm_profile(0.99))
    if onednn.available():
        p = resolve_matmul(base, "auto", gemm_speeds=fast)
        assert p.matmul == "highest" and p.float32_gemm == "onednn" and "fp32-onednn 0.50 ms" in p.reason
        assert p.name == "float32"  # exact float32 either way: the name does not change
        assert resolve_matmul(base, "highest", float32_gemm="onednn").float32_gemm == "onednn"
    assert resolve_matmul(base, "auto", gemm_speeds=slow).float32_gemm == "torch"  # within the 5% margin
    assert resolve_matmul(base, "auto", generative=True, gemm_speeds=fast).float32_gemm == "torch"
    assert resolve_matmul(base, "auto", float32_gemm="torch", gemm_speeds=fast).float32_gemm == "torch"
    with pytest.raises(ConfigError, match="float32_gemm='onednn' applies to float32 weights"):
        resolve_matmul(resolve_policy("bfloat16"), "auto", float32_gemm="onednn")
    with pytest.raises(ConfigError, match="float32_gemm='mkl'"):
        resolve_matmul(base, "auto", float32_gemm="mkl")


@needs_onednn
def test_minilm_on_onednn_matches_f_linear_and_stays_batch_invariant(eval_texts):
    from hyprec import LLM

    ours = LLM("minilm", dtype="float32", float32_gemm="onednn")
    torch_gemm = LLM("minilm", dtype="float32", float32_gemm="torch")
    assert ours.info()["policy"]["float32_gemm"] == "onednn"
    assert torch_gemm.info()["policy"]["float32_gemm"] == "torch"
    a, b = ours.embed(eval_texts), torch_gemm.embed(eval_texts)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 1 - 1e-6  # float32 vs float32 in another summation order (float32 cosine noise ~1e-7)
    det = LLM("minilm", dtype="float32", float32_gemm="onednn", deterministic=True)
    texts = eval_texts[:24]
    together = det.embed(texts)
    alone = np.stack([det.embed([t])[0] for t in texts[:6]])
    np.testing.assert_array_equal(together[:6], alone)
