"""Shared fixtures. Models load once per session; nothing here touches the network."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
    """all-MiniLM-L6-v2 under the default policy (hybrid, fp16 attention)."""
    from hyprec import LLM

    return LLM("minilm")


@pytest.fixture(scope="session")
def st_minilm(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models: intra-op threads only add synchronisation, and on a loaded machine a spinning
    thread pool makes every small op 10-20x slower. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Test helper modules (the model zoo) live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
