"""Block tables and reference-counted block pools for the paged KV cache.

Every sequence has, per cache group, a block table mapping its logical blocks (``position // block_size``) to
physical blocks. Sliding-window groups release blocks that fall wholly before the window (entries become
:data:`RELEASED`), so a long generation holds only ``window`` tokens there.
"""

from __future__ import annotations

from collections import deque

import torch

from hyprec.engine.kv_cache import CacheGroupSpec

RELEASED = -1


class BlockPool:
    """Physical blocks of one cache group with reference counts (a block is free at count 0)."""

    def __init__(self, num_blocks: int):
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block = self.free.popleft()
        self.ref_counts[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free.append(block)


class BlockManager:
    """Allocates and frees KV cache blocks for sequences, per cache group."""

    def __init__(self, groups: list[CacheGroupSpec], block_size: int):
        self.block_size = block_size
        self.groups = {g.name: g for g in groups}
        self.pools = {g.name: BlockPool(g.num_blocks) for g in groups}
        self.tables: dict[int, dict[str, list[int]]] = {}

    def _first_needed_block(self, group: CacheGroupSpec, first_query_pos: int) -> int:
        if group.window is None:
            return 0
        return max(0, first_query_pos - group.window + 1) // self.block_size

    def _blocks_needed(self, seq_id: int, total_tokens: int, first_query_pos: int) -> dict[str, int]:
        """New blocks each group needs so that positions up to ``total_tokens`` have a slot."""
        need = {}
        for name, group in self.groups.items():
            table = self.tables.get(seq_id, {}).get(name, [])
            last = -(-total_tokens // self.block_size)
            first = self._first_needed_block(group, first_query_pos)
            need[name] = max(0, last - max(len(table), first))
        return need

    def can_grow(self, seq_id: int, total_tokens: int, first_query_pos: int) -> bool:
        need = self._blocks_needed(seq_id, total_tokens, first_query_pos)
        return all(self.pools[g].num_free >= n for g, n in need.items())

    def grow(self, seq_id: int, total_tokens: int, first_query_pos: int) -> None:
        """Give ``seq_id`` slots for every position below ``total_tokens`` that queries from ``first_query_pos``
        on can see; release sliding-window blocks no query will see again. Call :meth:`can_grow` first."""
        tables = self.tables.setdefault(seq_id, {name: [] for name in self.groups})
        last = -(-total_tokens // self.block_size)
        for name, group in self.groups.items():
            table, pool = tables[name], self.pools[name]
            first = self._first_needed_block(group, first_query_pos)
            for i in range(min(first, len(table))):
                if table[i] != RELEASED:
                    pool.release(table[i])
                    table[i] = RELEASED
            while len(table) < first:
                table.append(RELEASED)
            while len(table) < last:
                table.append(pool.allocate())

    def free(self, seq_id: int) -> None:
        for name, table in self.tables.pop(seq_id, {}).items():
            for block in table:
                if block != RELEASED:
                    self.pools[name].release(block)

    def slots(self, seq_id: int, group: str, start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions ``[start, end)`` of a sequence in one group."""
        table = torch.tensor(self.tables[seq_id][group], dtype=torch.long)
        pos = torch.arange(start, end)
        blocks = table[pos // self.block_size]
        if (blocks == RELEASED).any():
            raise RuntimeError(f"positions [{start}, {end}) of sequence {seq_id} were released from {group}")
        return blocks * self.block_size + pos % self.block_size

    def num_free_blocks(self) -> dict[str, int]:
        return {name: pool.num_free for name, pool in self.pools.items()}
