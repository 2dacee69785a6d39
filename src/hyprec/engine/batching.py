"""Token-budget batching of length-sorted sequences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchStats:
    """Token accounting of one call: ``padding_fraction`` is the share of padded attention positions."""

    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add(self, lengths: list[int]) -> None:
        self.batches += 1
        self.tokens += sum(lengths)
        self.padded_tokens += len(lengths) * max(lengths)


MAX_PADDING = 0.1


def plan_batches(
    lengths: list[int], max_tokens: int, max_seqs: int, max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """Group sequence indices into batches, longest first.

    Token-wise work (projections, FFN, norms) runs on packed real tokens, so padding only costs inside the
    attention backend, whose padded tensor is ``batch * longest``. Sorting by length keeps batches uniform; a
    batch closes when that padded size would pass ``max_tokens``, when it holds ``max_seqs`` sequences, or when
    its padded share would pass ``max_padding``. A sequence longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            padded = (len(current) + 1) * lengths[current[0]]
            if len(current) >= max_seqs or padded > max_tokens or 1 - (real + lengths[i]) / padded > max_padding:
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches
