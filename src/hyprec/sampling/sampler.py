"""The sampler: one next token per sequence from a batch of logits, following vLLM's semantics.

For every row of the float32 logits ``[B, V]``, in this order:

1. repetition penalty over the prompt and output tokens, then frequency and presence penalties over the output
   tokens (``apply_penalties``);
2. greedy rows (temperature 0) take the argmax, the lowest token id on ties;
3. other rows are divided by their temperature, filtered by min_p, top_k and top_p (``scale_and_filter``, which
   always keeps the most likely token) and sampled: rows with a generator each draw from their own, so a seeded
   sequence gets the same tokens whatever else is in the batch and in whichever row it sits; the others share
   torch's global generator.

Log-probabilities are those of the raw model distribution (log_softmax of the logits as given, before penalties,
temperature and filters), as vLLM returns by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hyprec.errors import InputTypeError, InvalidInputError, NonFiniteOutputError
from hyprec.sampling_params import SamplingParams

_UINT64 = 1 << 64
# top_p ranks this many most likely tokens first, widening by the factor below only when their mass is short of top_p.
_TOP_P_FIRST_WIDTH = 1024
_TOP_P_GROWTH = 16


def make_generator(seed: int, sample_index: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for sample ``sample_index`` (0 .. n-1) of a request with ``seed``.

    It is seeded with ``(seed + sample_index) mod 2**64``, as vLLM seeds the n child sequences of a request, so the
    n samples differ from each other while each stays reproducible. ``device`` must be the device of the logits.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + sample_index) % _UINT64)
    return generator


@dataclass
class SequenceSamplingState:
    """What the sampler needs to know about one sequence; the engine keeps it across decoding steps.

    Attributes:
        params: the request's sampling parameters.
        prompt_token_ids: the prompt (read by the repetition penalty).
        output_token_ids: the tokens generated so far (read by all penalties); the sampler does not append to it.
        generator: this sequence's own random generator, which the sampler advances; None uses torch's global
            one. Create it once per sequence (``make_generator`` or ``for_request``) and keep it for every step.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @classmethod
    def for_request(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        sample_index: int = 0,
        device: torch.device | str = "cpu",
    ) -> SequenceSamplingState:
        """The state of sample ``sample_index`` of a new request, with a generator when ``params.seed`` is set."""
        generator = None if params.seed is None else make_generator(params.seed, sample_index, device)
        return cls(params=params, prompt_token_ids=list(prompt_token_ids), generator=generator)


@dataclass
class SamplerOutput:
    """The sampler's choice for each of the B sequences, in batch order.

    Attributes:
        token_ids: the chosen token of each sequence.
        logprobs: the log-probability of each chosen token under the raw model distribution.
        top_logprobs: for sequences whose ``params.logprobs`` is N, the N most likely ``(token_id, logprob)`` pairs
            of the raw distribution, most likely first (ties by lower token id); None where ``logprobs`` is None.
        failures: rows that could not be sampled, with their error (only from :meth:`Sampler.sample_each`); their
            entries in the lists above are placeholders (token -1, logprob NaN, top None).
    """

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]
    failures: dict[int, Exception] = field(default_factory=dict)


class Sampler:
    """Chooses the next token of each sequence of a batch; stateless apart from the sequences' generators."""

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> SamplerOutput:
        """Choose the next token of each sequence: row b of ``logits`` ``[B, V]`` belongs to ``states[b]``.

        ``logits`` may have any floating dtype and device; the computation is done in float32 on that device, and
        seeded states' generators must live on the same device type.

        Raises InputTypeError / InvalidInputError for malformed arguments and NonFiniteOutputError for a row with NaN
        or +inf logits, or with no finite logit left.
        """
        raw = _checked_logits(logits, states)
        if raw.shape[0] == 0:
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])
        processed = apply_penalties(raw, states)
        if processed is not raw:  # a tiny repetition_penalty can overflow a positive logit to +inf
            _check_rows_finite(processed, "after the penalties")
        tokens = _choose(processed, states)
        # logsumexp + gather rather than a full [B, V] log_softmax: the same values, without a second B x V tensor.
        lse = torch.logsumexp(raw, dim=1)
        chosen = raw.gather(1, tokens[:, None]).squeeze(1) - lse
        return SamplerOutput(
            token_ids=tokens.tolist(), logprobs=chosen.tolist(), top_logprobs=_top_logprobs(raw, lse, states)
        )

    def sample_each(
        self,
        logits: torch.Tensor,
        states: Sequence[SequenceSamplingState],
        failed: dict[int, Exception] | None = None,
    ) -> SamplerOutput:
        """Like calling the sampler, but a row that cannot be sampled fails alone instead of failing the batch.

        Rows in ``failed`` (row -> error, e.g. non-finite model logits found by the caller) are not sampled. The
        others are sampled together; if that raises (whatever the error), each is sampled on its own, so only the
        rows that fail alone fail. Their errors are in ``SamplerOutput.failures``. Seeded rows draw the same numbers
        as in a batch that did not fail: their generators are restored before the retry, and a row's result never
        depends on its neighbours.
        """
        failures = dict(failed or {})
        rows = [i for i in range(len(states)) if i not in failures]
        saved = {i: states[i].generator.get_state() for i in rows if states[i].generator is not None}
        done: dict[int, tuple[int, float, list[tuple[int, float]] | None]] = {}
        try:
            part = self(_rows(logits, rows), [states[i] for i in rows])
            done.update(zip(rows, zip(part.token_ids, part.logprobs, part.top_logprobs, strict=True), strict=True))
        except Exception as batch_error:
            if len(rows) == 1:
                failures[rows[0]] = batch_error
            else:
                for i in rows:
                    if i in saved:
                        states[i].generator.set_state(saved[i])
                    try:
                        one = self(logits[i : i + 1], [states[i]])
                    except Exception as exc:  # this row's own failure
                        failures[i] = exc
                    else:
                        done[i] = (one.token_ids[0], one.logprobs[0], one.top_logprobs[0])
        placeholder = (-1, math.nan, None)
        picked = [done.get(i, placeholder) for i in range(len(states))]
        return SamplerOutput(
            token_ids=[p[0] for p in picked],
            logprobs=[p[1] for p in picked],
            top_logprobs=[p[2] for p in picked],
            failures=failures,
        )


def _choose(logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
    """The token of each row of the penalised ``logits``: argmax for greedy rows, a filtered sample for the rest."""
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy:
        # max(dim) returns the first maximum, so ties go to the lowest token id (as argmax does, but argmax over
        # [16, 262144] float32 rows took 3.9 ms against 1.1 ms with torch 2.13 on CPU).
        tokens[greedy] = _rows(logits, greedy).max(dim=1).indices
    if sampled:
        scaled = scale_and_filter(_rows(logits, sampled), [states[i].params for i in sampled])
        tokens[sampled] = _draw(scaled, [states[i].generator for i in sampled])
    return tokens


# ------------------------------------------------------------------------------------------ checks


def _checked_logits(logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
    """``logits`` as float32 after checking shapes, types and finiteness against ``states``."""
    if not isinstance(logits, torch.Tensor):
        raise InputTypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise InvalidInputError(
            f"logits: expected a [batch, vocab] tensor with vocab >= 1, got shape {list(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise InputTypeError(f"logits: expected a floating-point tensor, got {logits.dtype}")
    if len(states) != logits.shape[0]:
        raise InvalidInputError(f"states: expected one state per logits row ({logits.shape[0]}), got {len(states)}")
    for i, state in enumerate(states):
        _check_state(i, state, logits.device)
    # Half-precision logits are cast up: softmax, cumulative sums and logprobs lose too much below float32.
    raw = logits.float()
    _check_rows_finite(raw, "from the model")
    return raw


def _check_state(i: int, state: SequenceSamplingState, device: torch.device) -> None:
    if not isinstance(state, SequenceSamplingState):
        raise InputTypeError(f"states[{i}]: expected a SequenceSamplingState, got {type(state).__name__}")
    if not isinstance(state.params, SamplingParams):
        raise InputTypeError(f"states[{i}].params: expected SamplingParams, got {type(state.params).__name__}")
    gen = state.generator
    if gen is not None and torch.device(gen.device).type != device.type:
        raise InvalidInputError(f"states[{i}].generator is on {gen.device}; expected the logits' device {device}")


def _check_rows_finite(logits: torch.Tensor, when: str) -> None:
    """Raise unless every row has a finite maximum: one reduction catches NaN (max propagates it), +inf, and
    rows where every token is -inf (nothing could be sampled)."""
    row_max = logits.amax(dim=1)
    bad = (~torch.isfinite(row_max)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteOutputError(
            f"logits {when}: rows {bad[:8]} contain NaN or +inf or no finite value (row maxima "
            f"{row_max[bad[:8]].tolist()}); expected finite logits (-inf allowed for masked tokens)"
        )


def _token_tensor(name: str, ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """``ids`` as a long tensor, checked to be valid indices into a vocabulary of ``vocab`` tokens."""
    t = torch.tensor(ids, dtype=torch.long, device=device)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise InvalidInputError(
            f"{name}: token ids must be in [0, {vocab}), got min {int(t.min())}, max {int(t.max())}"
        )
    return t


# ------------------------------------------------------------------------------------------ logits processing


def apply_penalties(logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
    """``logits`` ``[B, V]`` (float32) with each row's repetition, frequency and presence penalties applied.

    Repetition (over the distinct prompt and output tokens): positive logits are divided by the penalty, negative
    ones multiplied, so the token becomes less likely for a penalty > 1 whatever the sign. Then, over the output
    tokens only: ``logit -= frequency_penalty * count + presence_penalty``. Returns a new tensor when any row is
    penalised, else ``logits`` itself.

    Only the touched tokens are indexed, per row: O(sequence length) rather than O(V) per penalised row.
    """
    if not any(_has_penalty(s.params) for s in states):
        return logits
    out = logits.clone()
    vocab = logits.shape[1]
    for i, s in enumerate(states):
        p = s.params
        if p.repetition_penalty != 1.0:
            tokens = [*s.prompt_token_ids, *s.output_token_ids]
            ids = _token_tensor(f"states[{i}] prompt/output", tokens, vocab, out.device)
            seen = ids.unique()
            vals = out[i, seen]
            out[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and s.output_token_ids:
            ids = _token_tensor(f"states[{i}].output_token_ids", s.output_token_ids, vocab, out.device)
            seen, counts = ids.unique(return_counts=True)
            out[i, seen] -= p.frequency_penalty * counts.float() + p.presence_penalty
    return out


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def scale_and_filter(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits ``[B, V]`` with the tokens removed by min_p, top_k and top_p set to -inf.

    ``softmax`` of the result is the distribution a row is sampled from. Each row is shifted so its maximum is 0
    (softmax is shift-invariant); the most likely token always survives the filters. Every temperature must be > 0.
    """
    if any(p.greedy for p in params):
        raise InvalidInputError("scale_and_filter: temperature=0 rows are greedy; expected temperatures > 0")
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    # Shift before dividing: afterwards every value is <= 0, so a tiny temperature sends the other tokens to -inf
    # (probability 0, the greedy limit) instead of overflowing the maximum to +inf (and inf - inf = NaN in softmax).
    scaled = (logits - logits.amax(dim=1, keepdim=True)) / temps[:, None]
    # The filters below work in place on `scaled`, which this function owns: a 64 x 262k copy costs ~20 ms each.
    _apply_min_p(scaled, [p.min_p for p in params])
    _apply_top_k(scaled, [p.top_k for p in params])
    _apply_top_p(scaled, [p.top_p for p in params])
    return scaled


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor[rows]``, without the copy when ``rows`` is every row (for reading only)."""
    return tensor if len(rows) == tensor.shape[0] else tensor[rows]


def _apply_min_p(scaled: torch.Tensor, min_ps: list[float]) -> None:
    """Drop (in place) tokens with probability < min_p * (probability of the most likely token)."""
    if not any(min_ps):
        return
    # The row maximum is 0, so p_i / p_max = exp(z_i) and the test is z_i < log(min_p): no softmax needed.
    # log(0) = -inf leaves rows without min_p untouched.
    thresholds = [math.log(m) if m > 0 else -math.inf for m in min_ps]
    thresholds_t = torch.tensor(thresholds, dtype=torch.float32, device=scaled.device)
    scaled.masked_fill_(scaled < thresholds_t[:, None], -math.inf)


def _apply_top_k(scaled: torch.Tensor, top_ks: list[int]) -> None:
    """Keep (in place) each row's k largest values, and any tied with the k-th, as vLLM; k = 0 or k >= V keeps all."""
    vocab = scaled.shape[1]
    rows = [i for i, k in enumerate(top_ks) if 0 < k < vocab]
    if not rows:
        return
    ks = torch.tensor([top_ks[i] for i in rows], dtype=torch.long, device=scaled.device)
    # topk with the largest k of the batch, then each row's own k-th value as its threshold: one call for all rows.
    kth = _rows(scaled, rows).topk(int(ks.max()), dim=1).values.gather(1, (ks - 1)[:, None])
    thresholds = torch.full((scaled.shape[0], 1), -math.inf, device=scaled.device)  # -inf: row not filtered
    thresholds[rows] = kth
    scaled.masked_fill_(scaled < thresholds, -math.inf)


def _apply_top_p(scaled: torch.Tensor, top_ps: list[float]) -> None:
    """Keep (in place) the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    rows = [i for i, p in enumerate(top_ps) if p < 1.0]
    vocab = scaled.shape[1]
    # Only the tokens ranked above the cut need ordering, and sorting a whole 262k vocabulary is the slowest step
    # here (seconds for 64 rows on a CPU). So rank the top `width` tokens first and widen, up to the full
    # vocabulary, only for rows whose mass there is still short of top_p; each row stops at the first width that
    # holds its cut, whatever the other rows need, so its result does not depend on the batch.
    width = min(_TOP_P_FIRST_WIDTH, vocab)
    while rows:
        rows = _top_p_pass(scaled, rows, [top_ps[i] for i in rows], width)
        width = min(width * _TOP_P_GROWTH, vocab)


def _top_p_pass(scaled: torch.Tensor, rows: list[int], top_ps: list[float], width: int) -> list[int]:
    """Apply top_p in place to those ``rows`` whose cut lies within their ``width`` most likely tokens (all rows
    when ``width`` is the vocabulary size); return the rows left for a wider pass."""
    sub = _rows(scaled, rows)
    top_p = torch.tensor(top_ps, dtype=torch.float32, device=scaled.device)[:, None]
    probs, ids = sub.softmax(dim=1).topk(width, dim=1)  # most likely first
    mass = probs.cumsum(dim=1)
    # Mass strictly ahead of each token (exclusive cumsum): exactly 0 for the first token, which is therefore always
    # kept (top_p > 0); a token is dropped once the mass ahead of it has reached top_p.
    ahead = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
    keep = torch.zeros_like(sub, dtype=torch.bool).scatter(1, ids, ahead < top_p)
    done = (mass[:, -1:] >= top_p).squeeze(1) | (width == scaled.shape[1])
    flags = done.tolist()
    if any(flags):
        scaled[[r for r, d in zip(rows, flags, strict=True) if d]] = sub[done].masked_fill(~keep[done], -math.inf)
    return [r for r, d in zip(rows, flags, strict=True) if not d]


# ------------------------------------------------------------------------------------------ drawing and logprobs


def _draw(scaled: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, drawn from ``softmax(scaled)`` by inverse transform sampling: the first token whose
    cumulative probability exceeds a uniform number. Rows with a generator take their number from it alone.

    One uniform per row instead of torch.multinomial's V exponential variates: on a CPU that is several times
    faster for a 262k vocabulary, and it lets seeded rows share the vectorised search.
    """
    u = _uniforms(generators, scaled.device)[:, None]
    # exp(scaled) are unnormalised probabilities (the row maximum is 0, so nothing overflows); comparing the
    # cumulative sum against u * total needs no normalisation. The sum is accumulated in float64: a float32 running
    # sum near 1 resolves only 6e-8, which would distort every token less likely than that (most of a large
    # vocabulary) and the total mass of the tail with them.
    cdf = scaled.exp().double().cumsum(dim=1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total; keeping the target strictly below it keeps the search in range.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True finds the first cdf value > target; a zero-probability token repeats its predecessor's cdf value,
    # so it can never be that first one.
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """A float64 uniform number in [0, 1) per row; rows with a generator draw one number from it, the others share
    torch's global generator."""
    u = torch.empty(len(generators), dtype=torch.float64, device=device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        u[shared] = torch.rand(len(shared), dtype=torch.float64, device=device)
    for i, gen in enumerate(generators):
        if gen is not None:
            # Exactly one number per step from a seeded sequence's own generator, whatever else is in the batch.
            u[i] = torch.rand((), dtype=torch.float64, device=device, generator=gen)
    return u


def _top_logprobs(
    raw: torch.Tensor, lse: torch.Tensor, states: Sequence[SequenceSamplingState]
) -> list[list[tuple[int, float]] | None]:
    """The ``params.logprobs`` most likely (token, logprob) pairs of each raw row that asks for them."""
    wanted = [s.params.logprobs for s in states]
    result: list[list[tuple[int, float]] | None] = [None if n is None else [] for n in wanted]
    rows = [i for i, n in enumerate(wanted) if n]
    if not rows:
        return result
    k = min(max(wanted[i] for i in rows), raw.shape[1])
    values, ids = raw[rows].topk(k, dim=1)
    logprobs = (values - lse[rows, None]).tolist()
    for row, token_ids, lps in zip(rows, ids.tolist(), logprobs, strict=True):
        pairs = sorted(zip(token_ids, lps, strict=True), key=lambda pair: (-pair[1], pair[0]))
        result[row] = pairs[: wanted[row]]
    return result
