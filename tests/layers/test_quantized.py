"""Weights kept in GGUF's stored block formats (``hyprec.layers.quantized``, ``hyprec/kernels/gguf_blocks.c``) against
gguf-py's dequantiser (llama.cpp's own reference) and the float32-dequantised layer, and the ``weights`` policy."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from hyprec import kernels
from hyprec.errors import ConfigError
from hyprec.layers import quantized
from hyprec.layers.quantized import FORMATS, BlockWeight, Q8_0Weight, StoredLinear, stored_weight

needs_kernel = pytest.mark.skipif(not quantized.native_kernel_available(), reason="no C compiler for the kernels")
# Where each format keeps its float16 scales inside a block (bytes); the rest of a block is any bit pattern.
HALF_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip


def random_blocks(fmt: str, out: int, k: int, seed: int = 0) -> torch.Tensor:
    """Raw GGUF rows [out, row bytes] of random integers and random positive float16 scales (as a quantiser writes)."""
    rng = np.random.default_rng(seed)
    if fmt in ("F16", "BF16"):
        values = rng.standard_normal((out, k)).astype(np.float32)
        half = values.astype(np.float16) if fmt == "F16" else (values.view(np.uint32) >> 16).astype(np.uint16)
        return torch.from_numpy(half.view(np.uint8).reshape(out, -1).copy())
    spec = FORMATS[fmt]
    raw = rng.integers(0, 256, (out, k // spec.block_values, spec.block_bytes), dtype=np.uint8)
    for offset in HALF_OFFSETS[fmt]:
        scales = (rng.random((out, k // spec.block_values, 1)) * 0.05).astype(np.float16)
        raw[..., offset : offset + 2] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(out, -1))


def gguf_dequantize(fmt: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    values = dequantize(blocks.numpy(), GGMLQuantizationType[fmt]).astype(np.float32)
    return torch.from_numpy(values.reshape(blocks.shape[0], k))


def float32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Both sides sum K products in float32, in different orders: each is within K * 2^-24 * sum|x||w| of the exact
    result (the classic gamma_K bound), so they are within twice that of each other."""
    k = x.shape[-1]
    return 2 * k * 2.0**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30


@needs_kernel
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_dequantises_exactly_and_multiplies_within_float32_summation(fmt):
    for out, blocks in [(1, 1), (37, 3), (300, 5)]:
        k = FORMATS[fmt].block_values * blocks
        blocks = random_blocks(fmt, out, k, seed=out)
        w, reference = stored_weight(fmt, blocks, k), gguf_dequantize(fmt, blocks, k)
        assert torch.equal(w.dequantize().view(torch.int32), reference.view(torch.int32))  # bit for bit
        assert torch.equal(w.dequantize(torch.tensor([out - 1, 0, out - 1])), reference[[out - 1, 0, out - 1]])
        for rows in (1, 3, 16, 21):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
            got = w.linear(x, invariant=True).double()  # invariant: every row through the kernel, 16 at a time
            want = F.linear(x.double(), reference.double())
            assert ((got - want).abs() <= float32_bound(x, reference)).all()
            prefill = w.linear(x).double()  # > 16 rows: dequantised slabs and a float32 GEMM
            assert ((prefill - want).abs() <= float32_bound(x, reference)).all()


@needs_kernel
def test_a_kernel_bug_is_outside_the_bound():
    """The bound is tight enough to fail a kernel that misplaces a block's scale."""
    blocks = random_blocks("Q4_K", 64, 512)
    reference = gguf_dequantize("Q4_K", blocks, 512)
    swapped = blocks.view(64, 2, 144).flip(1).reshape(64, -1)  # the two super-blocks of each row swapped
    x = torch.randn(2, 512)
    got = BlockWeight("Q4_K", swapped, 512).linear(x).double()
    assert not ((got - F.linear(x.double(), reference.double())).abs() <= float32_bound(x, reference)).all()


@needs_kernel
@pytest.mark.parametrize("fmt", ["Q8_0", "Q6_K"])
def test_each_row_is_independent_of_its_batch(fmt):
    w = stored_weight(fmt, random_blocks(fmt, 513, 512), 512)
    x = torch.randn(40, 512)
    together = w.linear(x, invariant=True)
    alone = torch.cat([w.linear(x[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    assert w.linear(x[:0]).shape == (0, 513) and w.linear(x.view(4, 10, 512)[:, :2]).shape == (4, 2, 513)


@needs_kernel
def test_portable_and_avx512_paths_round_alike(tmp_path):
    """The portable C path (a CPU without AVX-512 or F16C runs it) computes the same values and the same sums."""
    compiler = kernels.find_compiler()
    if compiler is None or shutil.which(compiler) is None:
        pytest.skip("no compiler")
    portable = tmp_path / "gguf_blocks_portable.so"
    flags = [f for f in kernels.FLAGS if f != "-march=native"] + ["-march=x86-64"]
    source = kernels.SOURCE_DIR / "gguf_blocks.c"
    subprocess.run([compiler, *flags, str(source), "-o", str(portable), *kernels.LIBS], check=True)
    lib = ctypes.CDLL(str(portable))
    native = quantized.library()
    for name in ("q8_0_linear", "blocks_linear", "blocks_dequantize"):
        getattr(lib, name).argtypes = getattr(native, name).argtypes
    for fmt, spec in FORMATS.items():
        k = spec.block_values * {256: 3, 32: 15, 16: 31}[spec.block_values]  # odd block counts: the kernels' tails
        w, x = stored_weight(fmt, random_blocks(fmt, 301, k), k), torch.randn(7, k)  # 7 rows: 4 + 2 + 1
        out = torch.empty(7, 301)
        w.kernel_linear(lib, x, out)
        torch.testing.assert_close(out, w.linear(x), rtol=0, atol=0, msg=fmt)
        if isinstance(w, BlockWeight):
            dense = torch.empty(301, k)
            lib.blocks_dequantize(w.spec.type_id, w.data.data_ptr(), w.data.shape[1], 301, k, dense.data_ptr(), 1)
            assert torch.equal(dense, w.dequantize()), fmt


@pytest.mark.parametrize("fmt", ["Q8_0", "Q5_0", "Q4_K", "BF16"])
def test_without_a_compiler_the_reference_runs(monkeypatch, fmt):
    blocks = random_blocks(fmt, 300, 256)
    reference = gguf_dequantize(fmt, blocks, 256)
    monkeypatch.setattr(quantized, "library", lambda: None)
    w = stored_weight(fmt, blocks, 256)
    assert torch.equal(w.dequantize(), reference)
    x = torch.randn(3, 256)
    got = w.linear(x)
    assert ((got.double() - F.linear(x.double(), reference.double())).abs() <= float32_bound(x, reference)).all()


def test_malformed_blocks_are_refused():
    with pytest.raises(ValueError, match=r"Q8_0 rows of 40 values must be uint8 \[out, 34\]"):
        stored_weight("Q8_0", torch.zeros(4, 34, dtype=torch.uint8), 40)
    with pytest.raises(ValueError, match=r"Q4_K rows of 256 values must be uint8 \[out, 144\]"):
        BlockWeight("Q4_K", torch.zeros(4, 140, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="no kernel reads GGUF format 'Q2_K'"):
        BlockWeight("Q2_K", torch.zeros(4, 84, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="scales must be float32"):
        Q8_0Weight(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------------------------
# GGUF files and the `weights` policy
# ---------------------------------------------------------------------------------------------------------------


def test_stored_rows_of_a_synthetic_llama_equal_its_float32_tensors(tmp_path):
    """Every quantized type gguf-py writes, q/k rows interleaved by llama.cpp's converter: the stored rows, put back
    in HF order, dequantise to exactly the float32 tensors the loader gives (and transformers' loader, test_gguf.py)."""
    from hyprec.loading.gguf import GGUFCheckpoint
    from tests.helpers import write_gguf

    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    ckpt = GGUFCheckpoint(path)
    formats = set()
    for name in ckpt.names():
        entry = ckpt.stored(name)
        if entry is None:
            assert ckpt.tensor_type(name) == "F32" or name.endswith("norm.weight"), name
            continue
        dense = ckpt.get(name)
        weight = stored_weight(*entry, dense.shape[1])
        assert torch.equal(weight.dequantize(), dense), name
        formats.add(weight.format)
    assert {"Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "BF16"} <= formats
    assert ckpt.tensor_type("model.layers.0.self_attn.q_proj.weight") == "Q8_0"  # and permuted in the file


def test_gemma_loads_packed_by_default_and_matches_float32(gemma_path, gemma_fp32):
    from hyprec import LLM, SamplingParams

    stored = gemma_fp32  # the default keeps the weights stored
    policy = stored.info()["policy"]
    assert policy["weights"] == "stored" and "81 Q5_0, 27 Q4_K, 10 Q8_0, 9 Q6_K" in policy["reason"]
    model = stored.engine.model
    layers = [m for m in model.modules() if isinstance(m, StoredLinear)]
    assert len(layers) == 18 * 7 and model.stored_head is model.model.embed_tokens.stored  # one copy of the table
    info = stored.info()
    assert info["parameters"] == 268_098_176 and info["weight_memory_mib"] < 260  # float32: ~1024 MiB

    dense = LLM(gemma_path, dtype="float32", max_model_len=256, weights="float32")
    assert dense.policy.weights == "float32" and dense.engine.model.stored_head is None
    assert dense.info()["weight_memory_mib"] > 1000
    checkpoint = stored.engine.checkpoint
    for name in ("model.layers.3.mlp.down_proj.weight", "model.layers.4.mlp.down_proj.weight"):  # Q6_K, Q4_K
        module = stored.engine.model.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(module.weight, checkpoint.get(name)), name
    params = SamplingParams(temperature=0, max_tokens=16)
    prompt = "The capital of France is"
    greedy = [llm.generate(prompt, params)[0].outputs[0].token_ids for llm in (stored, dense)]
    assert greedy[0] == greedy[1]
    # Teacher-forced logits at 8 positions agree within float32 summation error through 18 layers and the head
    # (measured: 1.2e-4 max abs on logits of magnitude ~30).
    ids = stored.engine.tokenizer.encode("Hybrid precision keeps float32 where range matters.")[:9]
    got = torch.cat([logits for _, logits in stored.engine.logits(ids)])
    want = torch.cat([logits for _, logits in dense.engine.logits(ids)])
    assert (got - want).abs().max() < 2e-2 and torch.equal(got.argmax(-1), want.argmax(-1))


def test_weights_stored_where_it_cannot_apply_is_a_clear_error(minilm_dir, gemma_path):
    from hyprec import LLM

    with pytest.raises(ConfigError, match="weights='stored' does not apply here: the checkpoint stores no weights"):
        LLM(minilm_dir, weights="stored")
    # refused once the policy is resolved, before any weight is read
    with pytest.raises(ConfigError, match=r"weights='stored' does not apply here: the policy computes the weights in"):
        LLM(gemma_path, dtype="bfloat16", weights="stored")
    with pytest.raises(ConfigError, match="weights='packed'"):
        LLM(minilm_dir, weights="packed")
