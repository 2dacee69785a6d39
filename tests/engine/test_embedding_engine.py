"""Embedding results do not depend on batching (default mode: within the float16-attention batch noise, see
``assert_same_rows``; bit-identical under ``deterministic=True``, tested in test_batch_invariance.py) and come back
in input order."""

from __future__ import annotations

import numpy as np
import pytest

from hyprec import LLM
from tests.helpers import assert_same_rows

# --------------------------------------------------------------------------------------- result invariance


@pytest.fixture(scope="module")
def mixed_texts(eval_texts) -> list[str]:
    """One long page (truncated), paragraphs and docstrings, short sentences, a single word, a duplicate."""
    picks = [eval_texts[i] for i in (0, 25, 60, 120, 165, -40, -20)]
    return [*picks, "GPU", eval_texts[-20]]


@pytest.fixture(scope="module")
def alone(minilm_hybrid, mixed_texts) -> np.ndarray:
    return np.concatenate([minilm_hybrid.embed([t]) for t in mixed_texts])


def test_batch_matches_one_at_a_time(minilm_hybrid, mixed_texts, alone):
    lengths = {len(ids) for ids in minilm_hybrid.engine.tokenize(mixed_texts)}
    assert max(lengths) >= 200 and min(lengths) <= 5  # really mixed lengths
    batched = minilm_hybrid.embed(mixed_texts)
    assert_same_rows(batched, alone)
    # A duplicate at another position of the same batch: equal up to the default mode's batch noise
    # (bit-identical only under deterministic=True, tested in test_batch_invariance.py).
    assert_same_rows(batched[[-1]], batched[[-3]])


def test_reversed_order(minilm_hybrid, mixed_texts, alone):
    out = minilm_hybrid.embed(mixed_texts[::-1])
    assert_same_rows(out[::-1], alone)


def test_tiny_batch_size(minilm_hybrid, mixed_texts, alone):
    out = minilm_hybrid.embed(mixed_texts, batch_size=3)
    assert minilm_hybrid.engine.last_stats.batches >= 3
    assert_same_rows(out, alone)


def test_tiny_token_budget(minilm_dir, mixed_texts, alone):
    small = LLM(minilm_dir, max_num_batched_tokens=64)
    out = small.embed(mixed_texts)
    assert small.engine.last_stats.batches >= 4
    assert_same_rows(out, alone)


def test_results_in_input_order(minilm_hybrid, mixed_texts, alone):
    # a permutation that interleaves long and short texts; row i must be the embedding of texts[i]
    order = [3, 8, 0, 6, 1, 7, 2, 5, 4]
    out = minilm_hybrid.embed([mixed_texts[i] for i in order], batch_size=2)
    assert_same_rows(out, alone[order])
