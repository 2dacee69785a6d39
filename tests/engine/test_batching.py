"""Token-budget batching of length-sorted sequences (``hyprec.engine.batching``), without a model.

``length_batches`` sorts sequences longest first and closes a batch when its padded size (``batch * longest``)
would pass the token budget, when it holds ``max_seqs`` sequences, or when its padded share would pass
``max_padding``; a sequence longer than the budget runs alone. The property test checks every rule on every
batch of many random inputs, plus that each batch is *maximal*: the next sequence in length order was left out
for one of those reasons, not arbitrarily.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprec.engine.batching import MAX_PADDING, BatchStats, length_batches


def _padded(lengths: list[int], batch: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def _padding_share(lengths: list[int], batch: list[int]) -> float:
    return 1 - sum(lengths[i] for i in batch) / _padded(lengths, batch)


def _check_plan(lengths: list[int], max_tokens: int, max_seqs: int, max_padding: float) -> list[list[int]]:
    batches = length_batches(lengths, max_tokens, max_seqs, max_padding)
    flat = [i for b in batches for i in b]
    # Every index exactly once.
    assert sorted(flat) == list(range(len(lengths)))
    assert all(batches), "no empty batch"
    # Longest first, and stable: equal lengths keep their input order.
    assert flat == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for b in batches:
        assert len(b) <= max_seqs
        if len(b) > 1:  # a single sequence may exceed the budget (it runs alone); a batch of several may not
            assert _padded(lengths, b) <= max_tokens
            # Exact rational comparison would be nicer, but length_batches decides with the same float
            # expression, so the same expression here is exact agreement, not a tolerance.
            assert not 1 - sum(lengths[i] for i in b) / _padded(lengths, b) > max_padding
    # Maximal: adding the next sequence (in length order) to a batch would have broken a rule.
    for cur, nxt in itertools.pairwise(batches):
        grown = [*cur, nxt[0]]
        longest = lengths[cur[0]]
        padded = len(grown) * longest
        broke = len(cur) >= max_seqs or padded > max_tokens or 1 - sum(lengths[i] for i in grown) / padded > max_padding
        assert broke, f"batch {cur} closed before {nxt[0]} for no reason"
    return batches


def test_empty_input_gives_no_batches():
    assert length_batches([], 100, 8) == []


def test_token_budget_closes_batches():
    # 8 sequences of 4 tokens, budget 16: exactly 4 per batch (4 x 4 = 16 fits, 5 x 4 = 20 does not).
    assert length_batches([4] * 8, max_tokens=16, max_seqs=100) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # One token less of budget: 3 per batch.
    assert length_batches([4] * 8, max_tokens=15, max_seqs=100) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_max_seqs_closes_batches():
    assert length_batches([3] * 5, max_tokens=1000, max_seqs=2) == [[0, 1], [2, 3], [4]]
    assert length_batches([3] * 5, max_tokens=1000, max_seqs=1) == [[0], [1], [2], [3], [4]]


def test_padding_cap_closes_batches():
    # Lengths 10 and 8 together: 20 padded positions, 18 real, padding 10%: allowed at max_padding=0.1 ...
    assert length_batches([10, 8], max_tokens=1000, max_seqs=8, max_padding=0.1) == [[0, 1]]
    # ... but not at 0.05; the shorter one starts its own batch.
    assert length_batches([10, 8], max_tokens=1000, max_seqs=8, max_padding=0.05) == [[0], [1]]
    # The default cap is the module's MAX_PADDING: 10 and 1 (45% padding) never share a batch.
    assert length_batches([1, 10], max_tokens=1000, max_seqs=8) == [[1], [0]]
    assert MAX_PADDING < 0.45


def test_long_sequence_runs_alone():
    # 50 tokens against a budget of 16: alone, and it does not drag the short ones into an oversized batch.
    lengths = [3, 50, 3, 3]
    batches = length_batches(lengths, max_tokens=16, max_seqs=8, max_padding=1.0)
    assert batches[0] == [1]
    assert batches[1:] == [[0, 2, 3]]
    # Two sequences over the budget: each alone.
    assert length_batches([40, 50], max_tokens=16, max_seqs=8, max_padding=1.0) == [[1], [0]]


def test_longest_first_and_stable_for_ties():
    lengths = [5, 9, 5, 9, 7]
    batches = length_batches(lengths, max_tokens=10_000, max_seqs=100, max_padding=1.0)
    assert batches == [[1, 3, 4, 0, 2]]


@given(
    lengths=st.lists(st.integers(1, 64), max_size=40),
    max_tokens=st.integers(1, 256),
    max_seqs=st.integers(1, 12),
    max_padding=st.sampled_from([0.0, 0.05, MAX_PADDING, 0.3, 1.0]),
)
def test_every_rule_holds_on_random_inputs(lengths, max_tokens, max_seqs, max_padding):
    _check_plan(lengths, max_tokens, max_seqs, max_padding)


@pytest.mark.parametrize("max_padding", [0.0, MAX_PADDING])
def test_uniform_lengths_fill_batches_to_the_limit(max_padding):
    batches = _check_plan([16] * 37, max_tokens=128, max_seqs=64, max_padding=max_padding)
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]


def test_batch_stats_padding_fraction():
    stats = BatchStats()
    assert stats.padding_fraction == 0.0  # nothing run yet
    stats.add([4, 4])
    assert (stats.batches, stats.tokens, stats.padded_tokens) == (1, 8, 8)
    assert stats.padding_fraction == 0.0
    stats.add([6, 2])  # 12 padded positions, 8 real
    assert (stats.batches, stats.tokens, stats.padded_tokens) == (2, 16, 20)
    # 1 - 16/20 in float64: the one rounding of 16/20 = 0.8 is below 2^-53, so 0.2 +- 1e-15 is exact enough.
    assert stats.padding_fraction == pytest.approx(0.2, abs=1e-15)


def test_default_token_budget_depends_on_the_engine_kind():
    from hyprec.config import CPU_ENCODER_TOKEN_BUDGET, GENERATION_TOKEN_BUDGET, EngineConfig

    assert EngineConfig().with_token_budget(generative=False).max_num_batched_tokens == CPU_ENCODER_TOKEN_BUDGET
    assert EngineConfig().with_token_budget(generative=True).max_num_batched_tokens == GENERATION_TOKEN_BUDGET
    assert EngineConfig(max_num_batched_tokens=300).with_token_budget(generative=False).max_num_batched_tokens == 300


def test_an_encoder_runs_passes_of_its_budget(minilm_fp32, eval_texts):
    from hyprec.config import CPU_ENCODER_TOKEN_BUDGET

    budget = minilm_fp32.engine.engine_config.max_num_batched_tokens
    assert budget == CPU_ENCODER_TOKEN_BUDGET
    minilm_fp32.embed(eval_texts)
    stats = minilm_fp32.engine.last_stats
    assert stats.tokens > budget * 4 and stats.batches >= stats.padded_tokens / budget  # many passes, none over it
