"""Weights kept in GGUF's stored Q8_0 blocks (``hyprec.layers.quantized``, ``hyprec/kernels/q8_0.c``) against their
float32-dequantised reference, and the ``weights`` policy that puts them to use."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from hyprec import kernels
from hyprec.errors import ConfigError
from hyprec.layers import quantized
from hyprec.layers.quantized import Q8_0Weight

needs_kernel = pytest.mark.skipif(not quantized.native_kernel_available(), reason="no C compiler for the kernel")


def random_q8_0(out: int, k: int, seed: int = 0) -> Q8_0Weight:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-128, 128, (out, k), generator=gen, dtype=torch.int8)
    # Scales as GGUF stores them: float16, widened exactly.
    scales = (torch.rand(out, k // 32, generator=gen) * 0.02).half().float()
    return Q8_0Weight(values, scales)


def float32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Both sides sum K products in float32, in different orders: each is within K * 2^-24 * sum|x||w| of the exact
    result (the classic gamma_K bound), so they are within twice that of each other."""
    k = x.shape[-1]
    return 2 * k * 2.0**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30


@needs_kernel
@pytest.mark.parametrize(("out", "k"), [(1, 32), (37, 96), (300, 640), (1029, 2048)])
@pytest.mark.parametrize("rows", [1, 3, 16, 21])
def test_kernel_equals_the_dequantised_layer_up_to_float32_summation(out, k, rows):
    w = random_q8_0(out, k, seed=out + k)
    dense = w.dequantize()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    got = w.linear(x, invariant=True).double()  # invariant: every row through the kernel, 16 at a time
    want = F.linear(x.double(), dense.double())
    assert ((got - want).abs() <= float32_bound(x, dense)).all()
    # A layer with a bug (a block's scale misplaced) is far outside the bound.
    broken = Q8_0Weight(w.values, w.scales.roll(1, dims=1))
    if k > 32:
        assert not ((broken.linear(x, invariant=True).double() - want).abs() <= float32_bound(x, dense)).all()


@needs_kernel
def test_each_row_is_independent_of_its_batch():
    w = random_q8_0(513, 640)
    x = torch.randn(40, 640)
    together = w.linear(x, invariant=True)
    alone = torch.cat([w.linear(x[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    assert w.linear(x[:0]).shape == (0, 513) and w.linear(x.view(4, 10, 640)[:, :2]).shape == (4, 2, 513)


@needs_kernel
def test_portable_and_avx512_paths_round_alike(tmp_path):
    """The portable C path (what a CPU without AVX-512 runs) computes the same operations in the same order."""
    compiler = kernels._compiler()
    source = kernels._SOURCES / "q8_0.c"
    portable = tmp_path / "q8_0_portable.so"
    flags = [f for f in kernels._FLAGS if f != "-march=native"] + ["-march=x86-64-v3"]
    if compiler is None or shutil.which(compiler) is None:
        pytest.skip("no compiler")
    subprocess.run([compiler, *flags, str(source), "-o", str(portable), *kernels._LIBS], check=True)
    fn = ctypes.CDLL(str(portable)).q8_0_linear
    fn.argtypes = quantized._q8_0_kernel().argtypes
    w, x = random_q8_0(301, 640), torch.randn(5, 640)
    out = torch.empty(5, 301)
    fn(x.data_ptr(), 5, 640, w.values.data_ptr(), w.scales.data_ptr(), 301, out.data_ptr(), 2)
    torch.testing.assert_close(out, w.linear(x), rtol=0, atol=0)


def test_without_a_compiler_the_reference_runs(monkeypatch):
    w = random_q8_0(300, 96)
    x = torch.randn(3, 96)
    monkeypatch.setattr(quantized, "_q8_0_kernel", lambda: None)
    dense = w.dequantize()
    got = w.linear(x)
    assert ((got.double() - F.linear(x.double(), dense.double())).abs() <= float32_bound(x, dense)).all()


def test_malformed_blocks_are_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        Q8_0Weight(torch.zeros(4, 40, dtype=torch.int8), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="scales must be float32"):
        Q8_0Weight(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------------------------
# GGUF blocks and the `weights` policy on Gemma-3-270M (Q4_K_M file: Q8_0 tied embedding/head)
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_blocks_dequantise_to_exactly_the_loaded_float32(gemma_fp32):
    ckpt = gemma_fp32.engine.checkpoint
    head = Q8_0Weight(*ckpt.q8_0("model.embed_tokens.weight"))
    assert head.shape == (262144, 640)
    loaded = gemma_fp32.engine.model.model.embed_tokens.weight  # dequantised by gguf-py at load
    assert torch.equal(head.dequantize(), loaded)
    assert ckpt.q8_0("model.norm.weight") is None  # stored as F32 (and offset by the converter)
    assert ckpt.q8_0("model.layers.0.mlp.down_proj.weight") is None  # Q6_K / Q4_K: not (yet) kept packed


def test_default_keeps_the_gemma_head_stored_and_matches_float32(gemma_path, gemma_fp32):
    from hyprec import LLM, SamplingParams

    stored = gemma_fp32  # the default keeps the head stored
    assert stored.policy.weights == "stored: head Q8_0" and "Q8_0 blocks" in stored.policy.reason
    assert stored.info()["policy"]["weights"] == "stored: head Q8_0"
    dense = LLM(gemma_path, dtype="float32", max_model_len=256, weights="float32")
    assert dense.policy.weights == "float32" and dense.engine.model.stored_head is None
    params = SamplingParams(temperature=0, max_tokens=16)
    prompt = "The capital of France is"
    greedy = [llm.generate(prompt, params)[0].outputs[0].token_ids for llm in (stored, dense)]
    assert greedy[0] == greedy[1]
    # Teacher-forced logits at 8 positions (8 rows: the kernel) agree within float32 summation error of the head
    # (K = 640 products on logits of magnitude <= ~50: 2 * 640 * 2^-24 * 50 ~ 4e-3).
    ids = stored.engine.tokenizer.encode("Hybrid precision keeps float32 where range matters.")[:9]
    got = torch.cat([logits for _, logits in stored.engine.logits(ids)])
    want = torch.cat([logits for _, logits in dense.engine.logits(ids)])
    assert (got - want).abs().max() < 4e-3


def test_weights_stored_where_it_cannot_apply_is_a_clear_error(minilm_dir, gemma_fp32):
    from hyprec import LLM
    from hyprec.dtype_policy import resolve_policy
    from hyprec.engine.model_loading import _with_stored_weights

    with pytest.raises(ConfigError, match="weights='stored' does not apply here: the checkpoint stores no Q8_0"):
        LLM(minilm_dir, weights="stored")
    engine = gemma_fp32.engine
    with pytest.raises(ConfigError, match=r"weights='stored' does not apply here: the policy computes the head in"):
        _with_stored_weights(engine.model, resolve_policy("bfloat16"), engine.checkpoint, "stored")
    model, policy = _with_stored_weights(engine.model, resolve_policy("bfloat16"), engine.checkpoint, "auto")
    assert policy.weights == "float32" and model is engine.model
    with pytest.raises(ConfigError, match="weights='packed'"):
        LLM(minilm_dir, weights="packed")
