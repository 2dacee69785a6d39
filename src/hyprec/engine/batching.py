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


def plan_batches(lengths: list[int], max_tokens: int, max_seqs: int) -> list[list[int]]:
    """Group sequence indices into batches, longest first.

    Sorting by length keeps each batch's sequences similar, so the padded attention tensor (``batch * longest``)
    carries little padding; the budget caps that padded size. A sequence longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= max_seqs or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
