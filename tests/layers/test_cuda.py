"""CUDA paths. They skip cleanly on machines without a GPU (CI and the development machines have none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyprec.layers.attention_backends import FlashAttentionBackend, SDPABackend, flash_attn_available, select_backend

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cpu_always_gets_the_sdpa_reference():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert isinstance(select_backend("cpu", dtype), SDPABackend)


@cuda
def test_cuda_backend_choice():
    backend = select_backend("cuda", torch.float16)
    assert isinstance(backend, FlashAttentionBackend if flash_attn_available() else SDPABackend)
    assert isinstance(select_backend("cuda", torch.float32), SDPABackend)  # flash-attn has no float32 mode
    assert isinstance(select_backend("cuda", torch.float16, needs_bias=True), SDPABackend)  # MPNet's bias


@cuda
@pytest.mark.parametrize("attn_dtype", ["float16", "bfloat16"])
def test_cuda_embeddings_match_cpu(eval_texts, minilm_fp32, attn_dtype):
    from hyprec import LLM

    texts = eval_texts[::4]
    cpu = minilm_fp32.embed(texts)
    gpu = LLM("minilm", dtype="hybrid", attn_dtype=attn_dtype, device="cuda").embed(texts)
    cos = (cpu * gpu).sum(1)
    assert cos.min() >= (0.99999 if attn_dtype == "float16" else 0.9999)
    assert gpu.dtype == np.float32


@cuda
def test_cuda_generation_matches_cpu(gemma_fp32):
    from hyprec import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    cpu = gemma_fp32.generate(prompts, params)
    gpu = LLM("gemma", dtype="hybrid", attn_dtype="float16", device="cuda").generate(prompts, params)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
