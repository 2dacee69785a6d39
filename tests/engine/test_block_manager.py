"""Paged KV cache bookkeeping (``hyprec.engine.block_manager``) without a model: allocation, slots,
sliding-window freeing, and running out of blocks."""

from __future__ import annotations

import pytest
import torch

from hyprec.engine.block_manager import RELEASED, BlockManager, BlockPool
from hyprec.engine.kv_cache import CacheGroupSpec

BS = 4  # tokens per block


def _manager(full_blocks: int = 16, window: int | None = None, sliding_blocks: int = 8) -> BlockManager:
    groups = [CacheGroupSpec("full", None, full_blocks, (0,))]
    if window is not None:
        groups.append(CacheGroupSpec(f"sliding-{window}", window, sliding_blocks, (1,)))
    return BlockManager(groups, BS)


def _used(bm: BlockManager, group: str) -> int:
    return bm.groups[group].num_blocks - bm.num_free_blocks()[group]


# ------------------------------------------------------------------------------------------------ the pool


def test_pool_hands_out_each_block_once_and_takes_it_back():
    pool = BlockPool(3)
    got = [pool.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and pool.num_free == 0
    assert pool.ref_counts == [1, 1, 1]
    pool.release(got[1])
    assert pool.num_free == 1 and pool.ref_counts[got[1]] == 0
    assert pool.allocate() == got[1]
    # A block referenced twice is free only after both references are released.
    pool.ref_counts[got[0]] += 1
    pool.release(got[0])
    assert pool.num_free == 0
    pool.release(got[0])
    assert pool.num_free == 1


# ------------------------------------------------------------------------------------------------ allocation


def test_grow_allocates_whole_blocks_on_demand():
    bm = _manager()
    assert bm.can_grow(7, 1, 0)
    bm.grow(7, 1, 0)  # one token: one block
    assert len(bm.tables[7]["full"]) == 1 and _used(bm, "full") == 1
    bm.grow(7, 4, 1)  # still inside the first block
    assert len(bm.tables[7]["full"]) == 1
    bm.grow(7, 5, 4)  # position 4 opens block 2
    assert len(bm.tables[7]["full"]) == 2 and _used(bm, "full") == 2
    bm.grow(7, 13, 5)  # a chunk of 8: positions up to 12 -> ceil(13 / 4) = 4 blocks
    assert len(bm.tables[7]["full"]) == 4 and _used(bm, "full") == 4
    assert RELEASED not in bm.tables[7]["full"]


def test_sequences_get_disjoint_blocks_and_slots():
    bm = _manager()
    bm.grow(1, 10, 0)
    bm.grow(2, 7, 0)
    t1, t2 = bm.tables[1]["full"], bm.tables[2]["full"]
    assert not set(t1) & set(t2)
    s1, s2 = bm.slots(1, "full", 0, 10), bm.slots(2, "full", 0, 7)
    assert len(set(s1.tolist()) | set(s2.tolist())) == 17  # no slot shared
    # A slot is block * block_size + offset of the position in its logical block.
    expected = torch.tensor([t1[p // BS] * BS + p % BS for p in range(10)])
    assert torch.equal(s1, expected)
    assert torch.equal(bm.slots(1, "full", 5, 9), expected[5:9])


def test_free_returns_every_block_and_is_idempotent():
    bm = _manager(window=8)
    bm.grow(3, 20, 0)
    assert bm.num_free_blocks() != {"full": 16, "sliding-8": 8}
    bm.free(3)
    assert bm.num_free_blocks() == {"full": 16, "sliding-8": 8}
    assert 3 not in bm.tables
    bm.free(3)  # unknown sequences are a no-op
    bm.free(12345)
    assert bm.num_free_blocks() == {"full": 16, "sliding-8": 8}


# ------------------------------------------------------------------------------------------------ sliding window


def test_sliding_group_releases_blocks_before_the_window():
    window = 8
    bm = _manager(window=window)
    sliding = f"sliding-{window}"
    bm.grow(1, 13, 0)  # prefill 13 tokens: queries 0..12 see keys back to position 0
    assert len(bm.tables[1][sliding]) == 4 and RELEASED not in bm.tables[1][sliding]
    # Decode positions 13..31 one at a time, as the scheduler does (first query position = tokens computed so far).
    for pos in range(13, 32):
        assert bm.can_grow(1, pos + 1, pos)
        bm.grow(1, pos + 1, pos)
        first_key = pos - window + 1  # the oldest key the query at `pos` can see
        table = bm.tables[1][sliding]
        live = [i for i, b in enumerate(table) if b != RELEASED]
        # Blocks wholly before the window are released; the block holding `first_key` and later ones are live.
        assert live == list(range(first_key // BS, -(-(pos + 1) // BS))), (pos, table)
        assert _used(bm, sliding) == len(live)
        # The full-attention group keeps everything.
        assert len(bm.tables[1]["full"]) == -(-(pos + 1) // BS) and RELEASED not in bm.tables[1]["full"]
    # At position 31 the window is 24..31: blocks 6 and 7 only.
    assert bm.tables[1][sliding][:6] == [RELEASED] * 6
    assert _used(bm, sliding) == 2
    live = bm.tables[1][sliding]
    assert bm.slots(1, sliding, 24, 32).tolist() == [live[p // BS] * BS + p % BS for p in range(24, 32)]
    with pytest.raises(RuntimeError, match="released"):
        bm.slots(1, sliding, 20, 32)
    bm.slots(1, "full", 0, 32)  # the full group can still address every position
    bm.free(1)
    assert bm.num_free_blocks() == {"full": 16, sliding: 8}  # released blocks are not released twice


def test_a_long_prompt_chunk_never_allocates_blocks_already_out_of_the_window():
    # A chunk whose first query is at position 20 with window 4: keys before 17 are never needed, so the sliding
    # group allocates nothing for blocks 0..3 and marks them released straight away.
    bm = _manager(window=4)
    bm.grow(9, 24, 20)
    table = bm.tables[9]["sliding-4"]
    assert table[:4] == [RELEASED] * 4 and RELEASED not in table[4:]
    assert len(table) == 6 and _used(bm, "sliding-4") == 2
    assert _used(bm, "full") == 6


# ------------------------------------------------------------------------------------------------ out of blocks


def test_out_of_blocks_is_reported_before_anything_is_taken():
    bm = _manager(full_blocks=4)
    assert bm.can_grow(1, 16, 0)  # exactly four blocks
    assert not bm.can_grow(1, 17, 0)  # five
    bm.grow(1, 12, 0)
    assert bm.num_free_blocks() == {"full": 1}
    assert not bm.can_grow(2, 5, 0)  # needs 2, one left
    assert bm.num_free_blocks() == {"full": 1}  # asking took nothing
    assert bm.can_grow(2, 4, 0)
    bm.grow(2, 4, 0)
    assert bm.num_free_blocks() == {"full": 0}
    assert not bm.can_grow(1, 13, 12)  # growing into a new block fails ...
    assert bm.can_grow(1, 12, 11)  # ... while staying inside allocated blocks needs nothing
    bm.free(2)
    assert bm.can_grow(1, 13, 12)


def test_can_grow_needs_every_group_to_have_room():
    # Full group roomy, sliding group of 3 blocks: the sliding group decides.
    bm = _manager(full_blocks=16, window=8, sliding_blocks=3)
    assert not bm.can_grow(1, 13, 0)  # a fresh 13-token prompt needs 4 sliding blocks
    assert bm.num_free_blocks() == {"full": 16, "sliding-8": 3}
    bm.grow(1, 8, 0)
    assert bm.can_grow(1, 9, 8)  # the query at 8 sees keys 1..8: blocks 0..2
    bm.grow(1, 9, 8)
    assert bm.num_free_blocks()["sliding-8"] == 0
    assert not bm.can_grow(2, 1, 0)  # another sequence finds no sliding block, however roomy the full group
    for pos in (9, 10, 11):  # inside block 2: nothing new needed; at 11 the window starts at 4 and block 0 goes
        assert bm.can_grow(1, pos + 1, pos)
        bm.grow(1, pos + 1, pos)
    assert bm.tables[1]["sliding-8"][0] == RELEASED and bm.num_free_blocks()["sliding-8"] == 1
    assert bm.can_grow(1, 13, 12)  # so position 12 gets a block again
