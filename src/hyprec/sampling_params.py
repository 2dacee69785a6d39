"""Sampling parameters of a generation request, with vLLM's names, defaults and meanings.

Every field is validated (and lists are copied and normalised) when the object is built, so the sampler and the
engine can trust them; a bad value raises InputTypeError (wrong type) or InvalidInputError (out of range) naming the
field, the value and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from hyprec.errors import InputTypeError, InvalidInputError

MAX_LOGPROBS = 20
"""The largest ``logprobs`` (top log-probabilities returned per generated token) a request may ask for."""

# The sampler works in float32: a positive value below its smallest normal number becomes 0 there (or counts as 0
# where denormals are flushed), and one above its largest becomes inf; either turns a row into NaN.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38

MIN_TEMPERATURE = FLOAT32_TINY
"""The smallest positive ``temperature`` (the smallest normal float32, ~1.18e-38); 0 means greedy."""
MAX_TEMPERATURE = FLOAT32_MAX
"""The largest ``temperature`` (the largest float32, ~3.4e38)."""
MIN_REPETITION_PENALTY = 0.01
"""The smallest ``repetition_penalty``: dividing a logit by it multiplies it by at most 100, which cannot overflow
float32 for any logit a model produces."""
MAX_REPETITION_PENALTY = 100.0
"""The largest ``repetition_penalty``."""

# torch.Generator.manual_seed accepts exactly this range (negative seeds wrap modulo 2**64).
_SEED_MIN = -(1 << 63)
_SEED_MAX = (1 << 64) - 1


def _as_int(name: str, value: Any) -> int:
    """``value`` as an int; bools are refused although Python counts them as ints (``max_tokens=True`` is a bug)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputTypeError(f"{name}={value!r}: expected an int, got {type(value).__name__}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    """``value`` as a finite float; bools, NaN and infinities are refused (NaN passes every ``<``/``>`` check)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputTypeError(f"{name}={value!r}: expected a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidInputError(f"{name}={value!r}: expected a finite number")
    return result


def _as_bool(name: str, value: Any) -> bool:
    """``value`` if it is a real bool; 0/1 or strings such as "false" are refused rather than guessed at."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{name}={value!r}: expected True or False, got {type(value).__name__}")
    return value


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise InvalidInputError(f"{name}={value!r}: expected {expected}")


def _as_list(name: str, value: Any) -> list[Any]:
    """A list or tuple ``value`` copied into a new list (so later changes by the caller do not leak in)."""
    if not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{name}={value!r}: expected a list, got {type(value).__name__}")
    return list(value)


def _normalise_stop(value: Any) -> list[str]:
    """``stop`` as a list of non-empty strings (None -> [], a string -> [string])."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else _as_list("stop", value)
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InputTypeError(f"stop[{i}]={s!r}: expected a string, got {type(s).__name__}")
        # An empty stop string would match at every position and end generation before its first token.
        _require(s != "", f"stop[{i}]", s, "a non-empty string")
    return items


def _normalise_stop_token_ids(value: Any) -> list[int]:
    """``stop_token_ids`` as a list of token ids >= 0 (None -> [])."""
    if value is None:
        return []
    items = [_as_int(f"stop_token_ids[{i}]", t) for i, t in enumerate(_as_list("stop_token_ids", value))]
    for i, t in enumerate(items):
        _require(t >= 0, f"stop_token_ids[{i}]", t, "a token id >= 0")
    return items


@dataclass(kw_only=True)
class SamplingParams:
    """How to pick the tokens of one generation request (vLLM-compatible; pass every field by keyword).

    Attributes:
        n: number of sequences generated for the prompt (>= 1).
        temperature: softmax temperature: 0 means greedy decoding, which ignores top_p, top_k and min_p; otherwise
            in [MIN_TEMPERATURE, MAX_TEMPERATURE] (the float32 range the sampler divides in, ~1.18e-38 to ~3.4e38).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p,
            in [FLOAT32_TINY, 1] (above 0 in float32); 1 disables it.
        top_k: keep the k most likely tokens (>= 1); 0 or -1 disables it (-1 is stored as 0).
        min_p: drop tokens less likely than min_p times the most likely token, in [0, 1]; 0 disables it.
        seed: seed of this request's own random generator, making its samples reproducible whatever else is in the
            batch; None uses the global generator.
        max_tokens: the most tokens to generate (>= 1).
        stop: strings that end generation; None, a string or a list, stored as a list of non-empty strings.
        stop_token_ids: token ids that end generation, stored as a list (None -> []).
        ignore_eos: keep generating after the end-of-sequence token.
        repetition_penalty: in [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY] (0.01 to 100); logits of tokens
            already in the prompt or the output are divided by it when positive and multiplied by it when negative;
            1 disables it.
        presence_penalty: in [-2, 2]; subtracted once from the logit of every token already in the output.
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per occurrence in the output.
        logprobs: None, or how many top log-probabilities (0 to 20) to return per generated token; the
            log-probability of the chosen token itself is always computed.
        include_stop_str_in_output: keep the matched stop string at the end of the output text.
        skip_special_tokens: leave special tokens out of the detokenised output.

    Validation happens once, in ``__post_init__``; use ``dataclasses.replace`` rather than assigning to a field,
    so the new value is validated too.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._validate_sampling()
        self._validate_penalties()
        self._validate_output()

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0) rather than sampled."""
        return self.temperature == 0.0

    def _validate_sampling(self) -> None:
        self.n = _as_int("n", self.n)
        _require(self.n >= 1, "n", self.n, "an int >= 1")
        self.temperature = _as_float("temperature", self.temperature)
        _require(
            self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            self.temperature,
            f"0 (greedy) or a number in [{MIN_TEMPERATURE:.8g}, {MAX_TEMPERATURE:.8g}] (the float32 range)",
        )
        self.top_p = _as_float("top_p", self.top_p)
        _require(
            FLOAT32_TINY <= self.top_p <= 1.0,
            "top_p",
            self.top_p,
            f"a number in [{FLOAT32_TINY:.8g}, 1] (above 0 in float32; 1 disables it)",
        )
        self.top_k = _as_int("top_k", self.top_k)
        _require(self.top_k >= -1, "top_k", self.top_k, "an int >= 1, or 0 or -1 to disable it")
        self.top_k = max(self.top_k, 0)  # one spelling of "disabled", so the sampler tests a single value
        self.min_p = _as_float("min_p", self.min_p)
        _require(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "a number in [0, 1] (0 disables it)")
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
            _require(_SEED_MIN <= self.seed <= _SEED_MAX, "seed", self.seed, f"an int in [{_SEED_MIN}, {_SEED_MAX}]")

    def _validate_penalties(self) -> None:
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        _require(
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            self.repetition_penalty,
            f"a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 disables it)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            _require(-2.0 <= value <= 2.0, name, value, "a number in [-2, 2]")
            setattr(self, name, value)

    def _validate_output(self) -> None:
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        _require(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an int >= 1")
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)
        if self.logprobs is not None:
            self.logprobs = _as_int("logprobs", self.logprobs)
            _require(
                0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs, f"None or an int in [0, {MAX_LOGPROBS}]"
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _as_bool(name, getattr(self, name))
