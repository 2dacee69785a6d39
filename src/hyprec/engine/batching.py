"""Token-budget batching: consecutive groups of sequences under a budget (:func:`greedy_groups`), and the encoder's
padding-aware batches of length-sorted sequences (:func:`length_batches`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
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


def greedy_groups(n: int, fits: Callable[[int, int], bool]) -> list[list[int]]:
    """Items ``0 .. n-1`` in order, in consecutive groups: item ``i`` joins the group that starts at ``first`` when
    ``fits(first, i)`` (items ``first .. i`` together keep within the budget), else it opens the next group (an item
    alone always forms one: an item larger than any budget runs alone). Every token-budget batching is this walk with
    its own rule; with prefix sums a rule costs O(1)."""
    groups: list[list[int]] = []
    first = 0
    for i in range(1, n):
        if not fits(first, i):
            groups.append(list(range(first, i)))
            first = i
    if n:
        groups.append(list(range(first, n)))
    return groups


def prefix_sums(values: list[int]) -> list[int]:
    """``[0, v0, v0 + v1, ...]``: the sum of ``values[a:b]`` is ``sums[b] - sums[a]``."""
    return [0, *itertools.accumulate(values)]


def length_batches(
    lengths: list[int], max_tokens: int, max_seqs: int, max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """Group sequence indices into batches, longest first.

    Token-wise work (projections, FFN, norms) runs on packed real tokens, so padding only costs inside the
    attention backend, whose padded tensor is ``batch * longest``. Sorting by length keeps batches uniform; a
    batch closes when that padded size would pass ``max_tokens``, when it holds ``max_seqs`` sequences, or when
    its padded share would pass ``max_padding``. A sequence longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sizes = [lengths[i] for i in order]
    sums = prefix_sums(sizes)

    def fits(first: int, i: int) -> bool:
        padded = (i - first + 1) * sizes[first]  # the first is the longest
        real = sums[i + 1] - sums[first]
        return i - first < max_seqs and padded <= max_tokens and 1 - real / padded <= max_padding

    return [[order[j] for j in group] for group in greedy_groups(len(order), fits)]
