"""A sequence being generated: its tokens, sampling state and progress through the KV cache."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from hyprec.engine.detokenizer import IncrementalDetokenizer
from hyprec.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One completion of one request (a request with ``n > 1`` has ``n`` sequences).

    ``num_computed_tokens`` counts the tokens whose keys/values are in the cache. After a preemption it is reset
    to 0 and the prompt plus everything generated so far is recomputed on resume.
    """

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    arrival: int = field(default_factory=lambda: next(_ids))
    # Kept up to date token by token rather than recomputed from the whole output at every step.
    cumulative_logprob: float = 0.0
    detokenizer: IncrementalDetokenizer | None = None
    logprob_entries: list[dict[int, float]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building the whole list (a decode step reads one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - n)]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
