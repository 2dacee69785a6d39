"""The continuous-batching scheduler (``hyprec.engine.scheduler``) with a real BlockManager and no model.

A tiny driver plays the engine's part: after each ``schedule()`` it marks the scheduled tokens computed and, for
every sequence whose known tokens are now all computed, appends one "sampled" token and finishes the sequence at
its ``max_tokens`` (as ``LLMEngine.step`` does). That is enough to exercise admission, the token budget, the
sequence limit, chunked prefill, preemption with recompute, restart and abort, and the cache accounting.
"""

from __future__ import annotations

import random

import pytest

from hyprec.engine.block_manager import RELEASED, BlockManager
from hyprec.engine.kv_cache import CacheGroupSpec
from hyprec.engine.scheduler import Scheduler, SchedulerOutput
from hyprec.engine.sequence import Sequence, SequenceStatus
from hyprec.sampling_params import SamplingParams

BS = 4  # tokens per KV block


def _blocks(num_blocks: int, window: int | None = None, sliding_blocks: int | None = None) -> BlockManager:
    groups = [CacheGroupSpec("full", None, num_blocks, (0,))]
    if window is not None:
        groups.append(CacheGroupSpec(f"sliding-{window}", window, sliding_blocks or num_blocks, (1,)))
    return BlockManager(groups, BS)


def _scheduler(
    num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, deterministic: bool = False, **blocks
) -> Scheduler:
    extra = {"deterministic": True} if deterministic else {}
    return Scheduler(_blocks(num_blocks, **blocks), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **extra)


def _seq(prompt_len: int, max_tokens: int = 4, request_id: str | None = None) -> Sequence:
    seq = Sequence(request_id or f"r{prompt_len}", 0, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))
    return seq


def _advance(sched: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """What the engine does with a schedule: compute the tokens, sample where a sequence is complete, finish at
    max_tokens. Returns the sequences that finished."""
    sampling = [s.seq for s in out.scheduled if s.samples]
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
    finished = []
    for seq in sampling:
        seq.output_token_ids.append(1000 + len(seq.output_token_ids))
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            sched.finish_with(seq, "length", None)
            finished.append(seq)
    return finished


def _plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def _check_cache(sched: Scheduler) -> None:
    """After a step: every running sequence holds exactly the blocks its computed tokens need, nothing else holds
    blocks, and no block is lost."""
    bm = sched.block_manager
    assert set(bm.tables) == {s.seq_id for s in sched.running}
    for seq in sched.running:
        table = bm.tables[seq.seq_id]["full"]
        assert RELEASED not in table
        assert len(table) == -(-seq.num_computed_tokens // BS)
    used = sum(len(t["full"]) for t in bm.tables.values())
    assert used + bm.num_free_blocks()["full"] == bm.groups["full"].num_blocks


# ---------------------------------------------------------------------------------------------------- admission


def test_waiting_sequences_are_admitted_in_arrival_order_within_the_budget():
    sched = _scheduler(budget=64)
    a, b, c = _seq(30, request_id="a"), _seq(30, request_id="b"), _seq(30, request_id="c")
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    # a and b whole; c gets the 4 tokens left of the budget (the start of a chunked prefill).
    assert _plan(out) == [("a", 30), ("b", 30), ("c", 4)]
    assert out.num_tokens == 64 and not out.preempted
    assert [s.samples for s in out.scheduled] == [True, True, False]
    assert sched.running == [a, b, c] and not sched.waiting
    assert all(s.status is SequenceStatus.RUNNING for s in (a, b, c))


def test_running_sequences_go_first_and_new_ones_fill_the_rest():
    sched = _scheduler(budget=16)
    a = _seq(10, max_tokens=8, request_id="a")
    sched.add(a)
    _advance(sched, sched.schedule())  # a prefilled, one token sampled
    b = _seq(20, request_id="b")
    sched.add(b)
    out = sched.schedule()
    assert _plan(out) == [("a", 1), ("b", 15)]  # a's decode token first, then b's first chunk
    _advance(sched, out)
    assert _plan(sched.schedule()) == [("a", 1), ("b", 5)]


def test_max_num_seqs_holds_back_admission():
    sched = _scheduler(max_num_seqs=2, budget=100)
    seqs = [_seq(5, max_tokens=2, request_id=f"s{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert _plan(out) == [("s0", 5), ("s1", 5)]
    assert list(sched.waiting) == [seqs[2]]
    _advance(sched, out)
    out = sched.schedule()
    assert _plan(out) == [("s0", 1), ("s1", 1)]  # still full
    finished = _advance(sched, out)
    assert finished == seqs[:2] and not sched.running
    assert _plan(sched.schedule()) == [("s2", 5)]


def test_empty_queue_schedules_nothing():
    sched = _scheduler()
    out = sched.schedule()
    assert out.scheduled == [] and out.preempted == [] and out.num_tokens == 0
    assert not sched.has_unfinished()


# ---------------------------------------------------------------------------------------------- chunked prefill


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks():
    sched = _scheduler(budget=7)
    seq = _seq(23, max_tokens=3)
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        out = sched.schedule()
        (item,) = out.scheduled
        chunks.append((item.num_new_tokens, item.samples))
        _advance(sched, out)
        _check_cache(sched)
    # 7 + 7 + 7 + 2 = 23; only the last chunk samples.
    assert chunks == [(7, False), (7, False), (7, False), (2, True)]
    assert seq.num_computed_tokens == 23
    assert len(sched.block_manager.tables[seq.seq_id]["full"]) == 6  # ceil(23 / 4)


def test_chunked_prefill_shares_steps_with_decoding_sequences():
    sched = _scheduler(budget=8)
    a = _seq(4, max_tokens=10, request_id="a")
    sched.add(a)
    _advance(sched, sched.schedule())
    b = _seq(20, max_tokens=1, request_id="b")
    sched.add(b)
    plans = []
    while not b.finished:
        out = sched.schedule()
        assert out.num_tokens <= 8
        plans.append(_plan(out))
        _advance(sched, out)
    # a decodes one token every step while b's 20-token prompt goes through in chunks of 7.
    assert plans == [[("a", 1), ("b", 7)], [("a", 1), ("b", 7)], [("a", 1), ("b", 6)]]
    assert b.finish_reason == "length" and b.seq_id not in sched.block_manager.tables


# ---------------------------------------------------------------------------------------- preemption, recompute


def test_cache_exhaustion_preempts_the_newest_sequence_and_recomputes_it():
    # 6 blocks of 4 tokens = 24 slots. a and b take 3 blocks each for their 12-token prompts; the next token of
    # a needs a 4th block: b (admitted later) is preempted.
    sched = _scheduler(num_blocks=6, budget=64)
    a, b = _seq(12, max_tokens=6, request_id="a"), _seq(12, max_tokens=6, request_id="b")
    sched.add(a)
    sched.add(b)
    _advance(sched, sched.schedule())
    assert sched.block_manager.num_free_blocks() == {"full": 0}
    out = sched.schedule()
    assert out.preempted == [b] and _plan(out) == [("a", 1)]
    assert sched.num_preemptions == 1
    # b lost its blocks and its progress, and waits at the front of the queue; its sampled token is kept.
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.output_token_ids == [1000]
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert b.seq_id not in sched.block_manager.tables
    _advance(sched, out)
    _check_cache(sched)
    # While a runs, b cannot come back (a needs no new block at 14 tokens, but b needs 4 blocks for 13 tokens).
    while not a.finished:
        out = sched.schedule()
        assert _plan(out) == [("a", 1)] and not out.preempted
        _advance(sched, out)
        _check_cache(sched)
    # a done: b is recomputed from its prompt plus the token it had already generated, in one step.
    out = sched.schedule()
    assert _plan(out) == [("b", 13)] and out.scheduled[0].samples
    _advance(sched, out)
    while sched.has_unfinished():
        _advance(sched, sched.schedule())
    assert len(b.output_token_ids) == 6 and b.finish_reason == "length"
    assert sched.block_manager.num_free_blocks() == {"full": 6}


def test_nothing_is_admitted_in_a_step_that_preempted():
    sched = _scheduler(num_blocks=6, budget=64)
    a, b = _seq(12, max_tokens=6, request_id="a"), _seq(12, max_tokens=6, request_id="b")
    sched.add(a)
    sched.add(b)
    _advance(sched, sched.schedule())
    c = _seq(1, request_id="c")  # would fit in a block freed by the preemption
    sched.add(c)
    out = sched.schedule()
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert list(sched.waiting) == [b, c]


def test_a_lone_sequence_that_outgrows_the_cache_preempts_itself_then_errors():
    sched = _scheduler(num_blocks=2, budget=64)
    seq = _seq(8, max_tokens=5, request_id="big")
    sched.add(seq)
    _advance(sched, sched.schedule())  # 8 tokens: both blocks
    out = sched.schedule()  # the 9th token needs a third block and there is nobody else to evict
    assert out.preempted == [seq] and out.scheduled == []
    with pytest.raises(RuntimeError, match=r"cannot hold 9 tokens of request big.*raise num_kv_blocks"):
        sched.schedule()


def test_a_prompt_that_can_never_fit_is_an_error_naming_it():
    sched = _scheduler(num_blocks=2, budget=64)
    sched.add(_seq(9, request_id="too-long"))
    with pytest.raises(RuntimeError, match="too-long"):
        sched.schedule()


def test_a_waiting_prompt_that_does_not_fit_yet_waits_for_running_ones():
    sched = _scheduler(num_blocks=4, budget=64)
    a = _seq(12, max_tokens=2, request_id="a")
    sched.add(a)
    _advance(sched, sched.schedule())
    b = _seq(8, request_id="b")
    sched.add(b)
    out = sched.schedule()  # one block free, b needs two: it waits (no error: a will free its blocks)
    assert _plan(out) == [("a", 1)] and list(sched.waiting) == [b]
    _advance(sched, out)
    assert a.finished
    assert _plan(sched.schedule()) == [("b", 8)]


# ------------------------------------------------------------------------------------- deterministic chunking


def test_deterministic_chunks_end_at_fixed_positions_whatever_the_budget_left():
    """Batch-invariant mode: a prompt's chunks end at multiples of the prefill chunk (half of this 600-token
    budget) or at the prompt's end, however much budget other sequences left; the default mode fills the budget."""
    plans = {}
    for deterministic in (False, True):
        sched = _scheduler(num_blocks=400, budget=600, deterministic=deterministic)
        a = _seq(4, max_tokens=10, request_id="a")
        sched.add(a)
        _advance(sched, sched.schedule())
        sched.add(_seq(1100, max_tokens=1, request_id="b"))
        steps = []
        while sched.has_unfinished():
            out = sched.schedule()
            steps.append(_plan(out))
            _advance(sched, out)
            _check_cache(sched)
        plans[deterministic] = steps
    assert plans[False][:2] == [[("a", 1), ("b", 599)], [("a", 1), ("b", 501)]]
    assert plans[True][:4] == [[("a", 1), ("b", 300)]] * 3 + [[("a", 1), ("b", 200)]]


def test_deterministic_chunk_that_does_not_fit_waits_instead_of_being_cut():
    sched = _scheduler(num_blocks=400, budget=600, deterministic=True)
    sched.add(_seq(100, max_tokens=3, request_id="a"))
    sched.add(_seq(250, max_tokens=3, request_id="c"))
    sched.add(_seq(1100, max_tokens=1, request_id="b"))
    out = sched.schedule()
    assert _plan(out) == [("a", 100), ("c", 250)]  # b's first chunk (300) does not fit the 250 left: it waits whole
    _advance(sched, out)
    assert _plan(sched.schedule()) == [("a", 1), ("c", 1), ("b", 300)]


def test_deterministic_chunks_never_wait_on_a_decoding_sequence():
    """A budget of 32: the chunk is 16, so a long prompt is admitted beside a decoding sequence."""
    sched = _scheduler(num_blocks=100, budget=32, deterministic=True)
    sched.add(_seq(4, max_tokens=50, request_id="a"))
    _advance(sched, sched.schedule())
    sched.add(_seq(40, max_tokens=1, request_id="b"))
    assert _plan(sched.schedule()) == [("a", 1), ("b", 16)]


def test_deterministic_recompute_replays_generated_tokens_one_per_step():
    """After a preemption the prompt is recomputed in its chunks and each generated token in a step of its own,
    exactly as it was decoded, so recomputed keys and values match the originals bit for bit."""
    # 5 blocks of 4: two 5-token prompts take 2 blocks each and decode 3 tokens inside them; at position 8 a takes
    # the last block and b (admitted later) is preempted with 4 generated tokens.
    sched = _scheduler(num_blocks=5, budget=64, deterministic=True)
    a, b = _seq(5, max_tokens=6, request_id="a"), _seq(5, max_tokens=8, request_id="b")
    sched.add(a)
    sched.add(b)
    for _ in range(10):
        out = sched.schedule()
        _advance(sched, out)
        if out.preempted:
            break
    assert out.preempted == [b] and b.num_computed_tokens == 0 and len(b.output_token_ids) == 4
    replay = []  # b's share of each step from here on (it resumes next to a as soon as blocks allow)
    for _ in range(50):
        out = sched.schedule()
        replay += [(item.num_new_tokens, item.samples) for item in out.scheduled if item.seq is b]
        _advance(sched, out)
        _check_cache(sched)
        if len(replay) == 5:
            break
    # The prompt in one chunk, then the 4 generated tokens one by one; the last step samples the 5th.
    assert replay == [(5, False), (1, False), (1, False), (1, False), (1, True)]
    assert len(b.output_token_ids) == 5


# ------------------------------------------------------------------------------------------------ sliding window


def test_sliding_window_blocks_are_released_as_sequences_decode():
    sched = _scheduler(num_blocks=32, budget=16, window=8, sliding_blocks=32)
    seq = _seq(13, max_tokens=30)
    sched.add(seq)
    for _ in range(20):
        _advance(sched, sched.schedule())
    assert seq.num_computed_tokens == 32
    table = sched.block_manager.tables[seq.seq_id]["sliding-8"]
    # The last query (position 31) sees keys 24..31: blocks 0-5 went back to the pool.
    assert table[:6] == [RELEASED] * 6 and RELEASED not in table[6:]
    assert sched.block_manager.num_free_blocks() == {"full": 32 - 8, "sliding-8": 32 - len(table[6:])}


# ------------------------------------------------------------------------------------------ restart and abort


def test_restart_requeues_running_sequences_in_arrival_order():
    sched = _scheduler(budget=64)
    seqs = [_seq(5, max_tokens=9, request_id=f"s{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    late = _seq(3, request_id="late")
    _advance(sched, sched.schedule())
    sched.add(late)
    fresh = _blocks(64)
    sched.restart(fresh)
    assert sched.block_manager is fresh and not sched.running
    assert list(sched.waiting) == [*seqs, late]
    assert all(s.num_computed_tokens == 0 and s.status is SequenceStatus.WAITING for s in seqs)
    out = sched.schedule()
    assert _plan(out) == [("s0", 6), ("s1", 6), ("s2", 6), ("late", 3)]  # prompts plus their sampled token


def test_abort_drops_a_request_wherever_it_is_and_frees_its_blocks():
    sched = _scheduler(max_num_seqs=1, budget=64)
    running = _seq(6, max_tokens=9, request_id="x")
    waiting = [_seq(4, request_id="x"), _seq(4, request_id="y")]
    sched.add(running)
    for s in waiting:
        sched.add(s)
    _advance(sched, sched.schedule())
    assert sched.running == [running] and sched.block_manager.tables
    dropped = sched.abort("x")
    assert set(map(id, dropped)) == {id(running), id(waiting[0])}
    assert all(s.finished and s.finish_reason == "abort" for s in dropped)
    assert not sched.running and list(sched.waiting) == [waiting[1]]
    assert sched.block_manager.tables == {} and sched.block_manager.num_free_blocks() == {"full": 64}
    assert sched.abort("nobody") == []


# ------------------------------------------------------------------------------------ invariants, random loads


@pytest.mark.parametrize(
    ("budget", "max_seqs", "num_blocks", "seed"),
    # 12 blocks = 48 slots, enough for any one sequence here (<= 41 tokens) but not for several: preemption.
    [(16, 3, 12, 0), (6, 8, 12, 1), (6, 1, 12, 2), (40, 8, 12, 3), (6, 8, 64, 4), (40, 3, 64, 5)],
)
def test_random_workloads_keep_every_invariant_and_finish_everything(budget, max_seqs, num_blocks, seed):
    rng = random.Random(seed)
    sched = _scheduler(num_blocks=num_blocks, max_num_seqs=max_seqs, budget=budget)
    pending = [_seq(rng.randint(1, 30), max_tokens=rng.randint(1, 12), request_id=f"q{i}") for i in range(12)]
    everyone = list(pending)
    for _ in range(2000):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop(0))
        if not sched.has_unfinished():
            if not pending:
                break
            continue
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        ids = [id(s.seq) for s in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        for s in out.scheduled:
            assert 0 < s.num_new_tokens <= s.seq.num_uncomputed
            assert s.seq.status is SequenceStatus.RUNNING
        for p in out.preempted:
            assert p.status is SequenceStatus.WAITING and p.num_computed_tokens == 0
        _advance(sched, out)
        _check_cache(sched)
    else:
        pytest.fail("the workload did not finish in 2000 steps")
    assert all(s.finished and len(s.output_token_ids) == s.params.max_tokens for s in everyone)
    assert sched.block_manager.num_free_blocks() == {"full": num_blocks}
    if num_blocks == 12 and max_seqs > 1:
        assert sched.num_preemptions > 0, "the tight cache was meant to force preemptions"


def test_sequence_token_slices_match_the_whole_list():
    from hyprec.engine.sequence import Sequence
    from hyprec.sampling_params import SamplingParams

    seq = Sequence("r", 0, [1, 2, 3], SamplingParams(), output_token_ids=[4, 5])
    for start in range(6):
        for end in range(start, 7):
            assert seq.tokens(start, end) == seq.token_ids[start:end]
