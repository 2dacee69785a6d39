"""SamplingParams validation and the Sampler: penalties, greedy, temperature, min_p / top_k / top_p, seeded
reproducibility, the sampled distribution and logprobs.

Everything random is seeded, so no test can flake; the statistical bounds are loose (p < 1e-4 under the null).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hyprec.errors import InputTypeError, InvalidInputError, NonFiniteOutputError
from hyprec.sampling.sampler import (
    Sampler,
    SequenceSamplingState,
    apply_penalties,
    make_generator,
    scale_and_filter,
)
from hyprec.sampling_params import SamplingParams

NAN = float("nan")
INF = float("inf")
# Probabilities of a 4-token toy vocabulary, stored out of order so index and rank differ.
TOY_PROBS = [0.15, 0.5, 0.05, 0.3]


def toy_logits(probs: list[float] = TOY_PROBS) -> torch.Tensor:
    return torch.tensor([probs]).log()


def state(params: SamplingParams | None = None, prompt=(), output=(), index: int = 0) -> SequenceSamplingState:
    s = SequenceSamplingState.for_request(params or SamplingParams(), prompt, sample_index=index)
    s.output_token_ids = list(output)
    return s


def kept(params: SamplingParams, logits: torch.Tensor) -> set[int]:
    """The tokens of a one-row batch that survive temperature and filters."""
    scaled = scale_and_filter(logits, [params])
    return set(torch.isfinite(scaled[0]).nonzero().flatten().tolist())


def log_softmax_tol(logits: torch.Tensor) -> float:
    """|difference| allowed between two float32 (log-)softmax computations of the same logits: the sum of n
    exponentials carries at most ~n u relative error (u = 2^-24), which the log turns into n u absolute, plus u of
    the largest |logit| for subtracting the maximum; doubled. Probabilities (<= 1) are within the same bound."""
    return 2 * (logits.shape[-1] + logits.abs().max().item()) * 2**-24


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------------------- SamplingParams

BAD_PARAMS = [
    # (field, value, error, label the message starts with)
    ("n", 0, InvalidInputError, "n"),
    ("n", False, InputTypeError, "n"),
    ("temperature", -0.1, InvalidInputError, "temperature"),
    ("temperature", NAN, InvalidInputError, "temperature"),
    ("temperature", INF, InvalidInputError, "temperature"),
    ("temperature", "1.0", InputTypeError, "temperature"),
    ("temperature", True, InputTypeError, "temperature"),
    ("top_p", 0.0, InvalidInputError, "top_p"),
    ("top_p", 1.5, InvalidInputError, "top_p"),
    ("top_p", NAN, InvalidInputError, "top_p"),
    ("top_k", 0.5, InputTypeError, "top_k"),
    ("top_k", -2, InvalidInputError, "top_k"),
    ("top_k", True, InputTypeError, "top_k"),
    ("min_p", 2.0, InvalidInputError, "min_p"),
    ("min_p", -0.1, InvalidInputError, "min_p"),
    ("seed", 1.5, InputTypeError, "seed"),
    ("seed", True, InputTypeError, "seed"),
    ("seed", 2**64, InvalidInputError, "seed"),
    ("max_tokens", 0, InvalidInputError, "max_tokens"),
    ("max_tokens", True, InputTypeError, "max_tokens"),
    ("max_tokens", 16.0, InputTypeError, "max_tokens"),
    ("stop", [""], InvalidInputError, "stop[0]"),
    ("stop", ["ok", ""], InvalidInputError, "stop[1]"),
    ("stop", "", InvalidInputError, "stop[0]"),
    ("stop", [3], InputTypeError, "stop[0]"),
    ("stop", 3, InputTypeError, "stop"),
    ("stop_token_ids", [-1], InvalidInputError, "stop_token_ids[0]"),
    ("stop_token_ids", [2, True], InputTypeError, "stop_token_ids[1]"),
    ("stop_token_ids", 2, InputTypeError, "stop_token_ids"),
    ("ignore_eos", 1, InputTypeError, "ignore_eos"),
    ("repetition_penalty", 0.0, InvalidInputError, "repetition_penalty"),
    ("repetition_penalty", -1.0, InvalidInputError, "repetition_penalty"),
    ("repetition_penalty", NAN, InvalidInputError, "repetition_penalty"),
    ("presence_penalty", 2.5, InvalidInputError, "presence_penalty"),
    ("presence_penalty", -2.01, InvalidInputError, "presence_penalty"),
    ("frequency_penalty", -3.0, InvalidInputError, "frequency_penalty"),
    ("frequency_penalty", NAN, InvalidInputError, "frequency_penalty"),
    ("logprobs", 21, InvalidInputError, "logprobs"),
    ("logprobs", -1, InvalidInputError, "logprobs"),
    ("logprobs", 2.0, InputTypeError, "logprobs"),
    ("include_stop_str_in_output", None, InputTypeError, "include_stop_str_in_output"),
    ("skip_special_tokens", "yes", InputTypeError, "skip_special_tokens"),
]


@pytest.mark.parametrize(("field", "value", "error", "label"), BAD_PARAMS)
def test_invalid_params_name_field_value_and_expectation(field, value, error, label):
    with pytest.raises(error) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{label}="), message
    assert "expected" in message, message
    bad_item = value[-1] if isinstance(value, list) else value
    assert repr(bad_item) in message, message


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, None, 16)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == ([], [], False, None)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.include_stop_str_in_output, p.skip_special_tokens) == (False, True)
    assert not p.greedy


def test_boundary_values_are_accepted_and_normalised():
    stops = ["a", "b"]
    p = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=-1,
        min_p=1,
        seed=-1,
        stop=stops,
        stop_token_ids=(np.int64(2),),
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=20,
        max_tokens=np.int64(1),
    )
    stops.append("c")  # the params keep their own copy
    assert p.greedy and p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_k == 0  # -1 and 0 both mean "disabled"; stored as 0
    assert p.stop == ["a", "b"] and p.stop_token_ids == [2] and type(p.stop_token_ids[0]) is int
    assert type(p.max_tokens) is int
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(seed=2**64 - 1, logprobs=0, min_p=0.0, top_p=np.float32(0.5)).top_p == 0.5
    with pytest.raises(InvalidInputError, match="top_k"):
        replace(p, top_k=-5)  # dataclasses.replace re-validates


# ----------------------------------------------------------------------------------------------- penalties


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0], [2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    original = logits.clone()
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    penalised = state(params, prompt=[0, 1], output=[2, 2, 3])
    plain = state(SamplingParams(), prompt=[0, 1], output=[2, 2, 3])
    out = apply_penalties(logits, [penalised, plain])
    # Repetition over prompt+output {0, 1, 2, 3}: 2 -> 1, -1 -> -2, 0.5 -> 0.25, -3 -> -6 (4 and 1 unseen).
    # Then output counts {2: 2, 3: 1}: token 2: 0.25 - (0.5 * 2 + 0.25) = -1; token 3: -6 - (0.5 * 1 + 0.25) = -6.75.
    assert out[0].tolist() == [1.0, -2.0, -1.0, -6.75, 4.0, 1.0]
    assert torch.equal(out[1], original[1])  # a row without penalties is untouched
    assert torch.equal(logits, original)  # the caller's logits are not modified


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Repetition only, < 1 boosts: positives divided (x2), negatives multiplied (x0.5); unseen unchanged.
        (SamplingParams(repetition_penalty=0.5), [4.0, -0.5, 1.0, -1.5, 4.0, 1.0]),
        # Frequency only, over the output only (prompt tokens 0 and 1 untouched): token 2 twice, token 3 once.
        (SamplingParams(frequency_penalty=-1.5), [2.0, -1.0, 3.5, -1.5, 4.0, 1.0]),
        # Presence only: once per distinct output token.
        (SamplingParams(presence_penalty=1.0), [2.0, -1.0, -0.5, -4.0, 4.0, 1.0]),
    ],
)
def test_each_penalty_alone(params, expected):
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    assert apply_penalties(logits, [state(params, prompt=[0, 1], output=[2, 2, 3])])[0].tolist() == expected


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    sampler = Sampler()
    assert sampler(logits, [state(SamplingParams(temperature=0), output=[0])]).token_ids == [0]
    assert sampler(logits, [state(SamplingParams(temperature=0, presence_penalty=0.5), output=[0])]).token_ids == [1]
    assert sampler(logits, [state(SamplingParams(temperature=0, repetition_penalty=1.1), prompt=[0])]).token_ids == [1]


def test_out_of_range_token_ids_are_rejected():
    params = SamplingParams(repetition_penalty=1.2)
    with pytest.raises(InvalidInputError, match=r"states\[0\].*\[0, 3\)"):
        Sampler()(torch.zeros(1, 3), [state(params, prompt=[0, 3])])


# -------------------------------------------------------------------------------------- greedy and temperature


def test_greedy_is_argmax_and_ties_go_to_the_lowest_id():
    logits = random_logits(6, 500)
    out = Sampler()(logits, [state(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=1).tolist()
    tie = torch.tensor([[1.0, 3.0, 0.0, 3.0]])
    assert Sampler()(tie, [state(SamplingParams(temperature=0))]).token_ids == [1]
    # A Gemma-sized vocabulary, where the reduction is split across threads: still the first maximum of each row.
    wide = random_logits(16, 262144)
    for row, first in enumerate(range(1000, 17000, 1000)):
        wide[row, [first, first + 70000, 262143]] = 100.0
    greedy = [state(SamplingParams(temperature=0)) for _ in range(16)]
    assert Sampler()(wide, greedy).token_ids == list(range(1000, 17000, 1000))


@pytest.mark.parametrize("temperature", [1e-5, 1e-12, 1e-30])
def test_temperature_to_zero_tends_to_greedy(temperature):
    logits = random_logits(8, 1000, seed=1)
    best = logits.argmax(dim=1)
    logits[torch.arange(8), best] += 0.5  # a clear winner: its probability is 1 - O(exp(-0.5 / T))
    params = SamplingParams(temperature=temperature, seed=7)
    out = Sampler()(logits, [state(params, index=i) for i in range(8)])
    assert out.token_ids == best.tolist()
    probs = scale_and_filter(logits, [params] * 8).softmax(dim=1)
    assert torch.isfinite(probs).all()  # no overflow to inf / NaN even at T = 1e-30
    assert torch.allclose(probs.max(dim=1).values, torch.ones(8), rtol=0, atol=log_softmax_tol(logits))


def test_temperature_scales_the_distribution():
    logits = toy_logits()
    scaled = scale_and_filter(logits, [SamplingParams(temperature=2.0)])
    assert torch.allclose(scaled.softmax(dim=1), (logits / 2).softmax(dim=1), rtol=0, atol=log_softmax_tol(logits))
    assert scaled.max().item() == 0.0  # shifted so the most likely token sits at 0


# ------------------------------------------------------------------------------------------------- filters


def test_top_k_one_equals_greedy():
    logits = random_logits(16, 2000, seed=2)
    states = [state(SamplingParams(top_k=1, seed=i)) for i in range(8)]
    states += [state(SamplingParams(top_k=1, temperature=5.0)) for _ in range(8)]
    assert Sampler()(logits, states).token_ids == logits.argmax(dim=1).tolist()


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = random_logits(3, 300, seed=3)
    params = [SamplingParams(top_k=5), SamplingParams(top_k=40), SamplingParams()]
    scaled = scale_and_filter(logits, params)
    for row, k in enumerate((5, 40)):
        expected = set(logits[row].topk(k).indices.tolist())
        assert set(torch.isfinite(scaled[row]).nonzero().flatten().tolist()) == expected
    assert torch.isfinite(scaled[2]).all()  # top_k=0 keeps everything


@pytest.mark.parametrize(
    ("top_p", "expected"),
    # Ranked: token 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05); cumulative 0.5, 0.8, 0.95, 1.
    [(1e-6, {1}), (0.4, {1}), (0.75, {1, 3}), (0.9, {0, 1, 3}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingParams(top_p=top_p), toy_logits()) == expected


def test_tiny_top_p_samples_only_the_top_token():
    logits = random_logits(8, 3000, seed=4, scale=0.5)
    out = Sampler()(logits, [state(SamplingParams(top_p=1e-6, seed=i)) for i in range(8)])
    assert out.token_ids == logits.argmax(dim=1).tolist()


def test_top_p_on_a_flat_distribution_matches_a_full_sort():
    # Flat logits over 20k tokens: the cut lies far beyond the first 1024 ranked tokens, which exercises widening.
    logits = random_logits(4, 20_000, seed=5, scale=0.3)
    top_ps = [0.05, 0.5, 0.9, 0.999]
    scaled = scale_and_filter(logits, [SamplingParams(top_p=p) for p in top_ps])
    for row, top_p in enumerate(top_ps):
        probs, order = logits[row].softmax(dim=0).sort(descending=True)
        ahead = probs.cumsum(dim=0) - probs
        expected = set(order[ahead < top_p].tolist())
        assert set(torch.isfinite(scaled[row]).nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"),
    # Threshold min_p * 0.5: 0.05 -> 0.025 keeps all; 0.2 -> 0.1 drops 0.05; 0.5 -> 0.25 keeps 0.5 and 0.3.
    [(0.0, {0, 1, 2, 3}), (0.05, {0, 1, 2, 3}), (0.2, {0, 1, 3}), (0.5, {1, 3}), (0.7, {1}), (1.0, {1})],
)
def test_min_p_filters_relative_to_the_top_token(min_p, expected):
    assert kept(SamplingParams(min_p=min_p), toy_logits()) == expected


def test_min_p_applies_after_temperature():
    # At T = 2 the probabilities flatten (ratio to the top token = sqrt of the T = 1 ratio): 0.05 / 0.5 = 0.1 becomes
    # 0.316, which survives min_p = 0.2.
    assert kept(SamplingParams(min_p=0.2, temperature=2.0), toy_logits()) == {0, 1, 2, 3}


def test_top_p_renormalises_after_top_k():
    # top_k=2 leaves tokens 1 and 3 with renormalised probabilities 0.625 and 0.375; top_p=0.6 is then reached by
    # token 1 alone (on the unfiltered distribution, 0.5 < 0.6 would have kept token 3 too).
    assert kept(SamplingParams(top_k=2, top_p=0.6), toy_logits()) == {1}
    assert kept(SamplingParams(top_p=0.6), toy_logits()) == {1, 3}


# ----------------------------------------------------------------------------------- seeds and distribution


def run_sequence(make_batch, steps: int = 12) -> list[int]:
    """The tokens one seeded sequence gets over ``steps`` calls; ``make_batch(step)`` -> (logits, states, row)."""
    sampler, tokens = Sampler(), []
    for step in range(steps):
        logits, states, row = make_batch(step)
        tokens.append(sampler(logits, states).token_ids[row])
    return tokens


def test_seeded_sampling_is_independent_of_the_batch():
    vocab = 4000
    step_logits = [random_logits(1, vocab, seed=100 + s, scale=1.0) for s in range(12)]
    params = SamplingParams(seed=1234, top_p=0.95, top_k=500, temperature=0.8)

    alone_state = state(params)
    alone = run_sequence(lambda s: (step_logits[s], [alone_state], 0))

    crowd_state = state(params)
    others = [
        state(SamplingParams()),
        state(SamplingParams(temperature=0)),
        state(SamplingParams(seed=99, min_p=0.1)),
        state(SamplingParams(top_p=0.3, repetition_penalty=1.3), prompt=[1, 2, 3]),
    ]

    def crowded(step):
        row = step % 5  # the sequence moves between rows from step to step
        states = [*others[:row], crowd_state, *others[row:]]
        noise = random_logits(4, vocab, seed=step)
        logits = torch.cat([noise[:row], step_logits[step], noise[row:]])
        return logits, states, row

    with torch.random.fork_rng():
        torch.manual_seed(5)  # the shared generator's state must not matter either
        crowd = run_sequence(crowded)
    assert crowd == alone
    assert len(set(alone)) > 3  # really sampled, not a constant


def test_sample_index_gives_distinct_reproducible_streams():
    logits = random_logits(1, 5000, seed=6, scale=0.5)
    params = SamplingParams(seed=42)

    def stream(index: int) -> list[int]:
        s = state(params, index=index)
        return run_sequence(lambda _: (logits, [s], 0), steps=8)

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)
    shifted = state(replace(params, seed=43))  # sample 1 of seed 42 is seeded like sample 0 of seed 43
    assert stream(1) == run_sequence(lambda _: (logits, [shifted], 0), steps=8)
    assert make_generator(2**64 - 1, 1).initial_seed() == 0  # seed + index wraps modulo 2**64


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_at_temperature_one():
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.07, 0.03])
    logits = torch.tensor(np.log(np.append(probs, 1.0)), dtype=torch.float32)
    logits[-1] = -INF  # a masked token: probability 0
    draws = 20_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = Sampler()(logits.expand(draws, -1), [state() for _ in range(draws)])
    counts = np.bincount(out.token_ids, minlength=7)
    assert counts[6] == 0
    # 5 degrees of freedom: P(chi2 > 30) = 1.5e-5.
    assert chi_square(counts[:6], probs) < 30, counts


def test_empirical_distribution_of_a_seeded_filtered_sequence():
    # T = 2 then top_k = 3: tokens 0..2 with probabilities proportional to sqrt(0.3), sqrt(0.25), sqrt(0.2).
    base = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    logits = torch.tensor(np.log(base), dtype=torch.float32)[None]
    expected = np.sqrt(base[:3]) / np.sqrt(base[:3]).sum()
    s = state(SamplingParams(temperature=2.0, top_k=3, seed=2024))
    sampler = Sampler()
    tokens = [sampler(logits, [s]).token_ids[0] for _ in range(3000)]
    counts = np.bincount(tokens, minlength=5)
    assert counts[3:].sum() == 0
    # 2 degrees of freedom: P(chi2 > 20) = 4.5e-5.
    assert chi_square(counts[:3], expected) < 20, counts


# ----------------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_distribution():
    logits = random_logits(4, 50, seed=8)
    params = [
        SamplingParams(logprobs=None, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(logprobs=0, seed=1),
        SamplingParams(logprobs=5, temperature=0, presence_penalty=2.0),
        SamplingParams(logprobs=20, top_k=3, seed=2),
    ]
    states = [state(p, prompt=[1, 2], output=[3, 3]) for p in params]
    out = Sampler()(logits, states)
    reference = logits.log_softmax(dim=1)
    chosen = reference[torch.arange(4), torch.tensor(out.token_ids)]
    assert torch.allclose(torch.tensor(out.logprobs), chosen, rtol=0, atol=log_softmax_tol(logits))
    assert out.top_logprobs[0] is None and out.top_logprobs[1] == []
    for row, n in ((2, 5), (3, 20)):
        top = out.top_logprobs[row]
        assert len(top) == n
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        ref_values, ref_ids = reference[row].topk(n)
        assert [t for t, _ in top] == ref_ids.tolist()
        assert np.allclose(values, ref_values.tolist(), rtol=0, atol=log_softmax_tol(logits))


def test_half_precision_logits_are_computed_in_float32():
    logits = random_logits(2, 100, seed=9).to(torch.bfloat16)
    out = Sampler()(logits, [state(SamplingParams(temperature=0, logprobs=3)) for _ in range(2)])
    reference = logits.float().log_softmax(dim=1)
    assert out.token_ids == logits.float().argmax(dim=1).tolist()
    assert np.allclose(out.logprobs, reference.max(dim=1).values.tolist(), rtol=0, atol=log_softmax_tol(reference))
    assert all(isinstance(lp, float) for lp in out.logprobs)


# --------------------------------------------------------------------------------------------- bad calls


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_logits_are_rejected(bad):
    logits = torch.zeros(3, 5)
    logits[1, 2] = bad
    with pytest.raises(NonFiniteOutputError, match=r"rows \[1\]"):
        Sampler()(logits, [state() for _ in range(3)])


def test_fully_masked_row_is_rejected_and_masked_tokens_are_never_chosen():
    with pytest.raises(NonFiniteOutputError, match=r"rows \[0\]"):
        Sampler()(torch.full((1, 4), -INF), [state()])
    logits = torch.tensor([[-INF, 0.0, -INF, 0.0]]).expand(200, -1)
    out = Sampler()(logits, [state(SamplingParams(seed=i)) for i in range(200)])
    assert set(out.token_ids) == {1, 3}


def test_malformed_calls_are_rejected():
    sampler = Sampler()
    with pytest.raises(InvalidInputError, match="logits"):
        sampler(torch.zeros(4), [state()])
    with pytest.raises(InputTypeError, match="logits"):
        sampler(torch.zeros(1, 4, dtype=torch.long), [state()])
    with pytest.raises(InvalidInputError, match="states"):
        sampler(torch.zeros(2, 4), [state()])
    with pytest.raises(InputTypeError, match=r"states\[0\]"):
        sampler(torch.zeros(1, 4), [SamplingParams()])
    assert sampler(torch.zeros(0, 4), []).token_ids == []
