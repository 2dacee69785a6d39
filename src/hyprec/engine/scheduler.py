"""Continuous-batching scheduler: which sequences run in the next step, and how many of their tokens.

Each step first gives every running sequence the tokens it still needs (one for a decoding sequence, the rest of
its prompt for one mid-prefill), then admits waiting sequences in arrival order while the token budget, the
sequence limit and the KV cache allow. Prompts longer than the remaining budget are prefilled in chunks.
When the cache runs out, the most recently admitted running sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed from its tokens on resume.

In deterministic (batch-invariant) mode a token's computation must not depend on the step it ran in, so chunk
boundaries are fixed by the sequence alone: prompts are prefilled in chunks that end at multiples of
``prefill_chunk`` (or at the prompt's end), a chunk that does not fit this step's budget waits for the next step
instead of being cut, and generated tokens recomputed after a preemption run one per step, exactly as they were
decoded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hyprec.engine.block_manager import BlockManager
from hyprec.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step completes the sequence's known tokens, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


#: Prefill chunk of deterministic mode: prompts up to this length prefill in one step. It is capped at half the
#: token budget, so that a chunk always fits beside the decode tokens of up to half a budget's worth of sequences
#: (a chunk as large as the budget would wait for as long as any other sequence is decoding).
DETERMINISTIC_PREFILL_CHUNK = 512


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        deterministic: bool = False,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        chunk = min(DETERMINISTIC_PREFILL_CHUNK, max(1, max_num_batched_tokens // 2))
        self.prefill_chunk = chunk if deterministic else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def restart(self, block_manager: BlockManager) -> None:
        """Use a new block manager (a rebuilt KV cache): running sequences go back to the queue, in arrival order,
        and are recomputed from their tokens."""
        self.block_manager = block_manager
        for seq in sorted(self.running, key=lambda s: s.arrival, reverse=True):
            seq.status = SequenceStatus.WAITING
            seq.num_computed_tokens = 0
            self.waiting.appendleft(seq)
        self.running.clear()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """Tokens of ``seq`` to compute this step within ``budget``; 0 when it must wait for the next step."""
        if self.prefill_chunk is None:
            return min(seq.num_uncomputed, budget)
        done, prompt = seq.num_computed_tokens, len(seq.prompt_token_ids)
        end = min((done // self.prefill_chunk + 1) * self.prefill_chunk, prompt) if done < prompt else done + 1
        return end - done if end - done <= budget else 0

    def _try_grow(self, seq: Sequence, num_new: int) -> bool:
        total = seq.num_computed_tokens + num_new
        if not self.block_manager.can_grow(seq.seq_id, total, seq.num_computed_tokens):
            return False
        self.block_manager.grow(seq.seq_id, total, seq.num_computed_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1. Running sequences, oldest first; preempt the newest when the cache is full.
        queue = sorted(self.running, key=lambda s: s.arrival)
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = self._num_new_tokens(seq, budget)
            if num_new == 0:
                continue
            while not self._try_grow(seq, num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new

        # 2. Waiting sequences in arrival order, unless something was just preempted (the cache is full).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = self._num_new_tokens(seq, budget)
            if num_new == 0:
                break
            if not self._try_grow(seq, num_new):
                if not self.running:  # nothing to wait for: this sequence can never fit
                    raise RuntimeError(
                        f"the KV cache ({self.block_manager.num_free_blocks()} free blocks) cannot hold "
                        f"{seq.num_tokens} tokens of request {seq.request_id}; raise num_kv_blocks"
                    )
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def finish_with(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        """Mark a sequence finished (``stop``, ``length`` or ``abort``) and free its cache blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq.seq_id)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sequence of a request, wherever it is."""
        dropped = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for seq in dropped:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish_with(seq, "abort", None)
        return dropped
