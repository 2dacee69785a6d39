"""Paged KV cache tensors, stored in the policy's ``kv_cache_dtype`` (per layer under a precision plan).

Each layer owns a key and a value tensor of ``num_blocks * block_size`` slots, ``[slots, kv_heads, head_dim]``.
Layers with the same attention span form a *cache group* and share block tables: the full-attention layers in
one group, each sliding-window size in another (those keep only their window, so their pool is smaller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyprec.layers.attention import Attention


@dataclass(frozen=True)
class CacheGroupSpec:
    name: str
    window: int | None
    num_blocks: int
    layers: tuple[int, ...]


class KVCache:
    """The allocated key/value tensors of every layer."""

    def __init__(
        self,
        layers: list[Attention],
        groups: list[CacheGroupSpec],
        block_size: int,
        dtypes: list[torch.dtype],
        device: torch.device | str,
    ):
        self.block_size = block_size
        self.groups = {g.name: g for g in groups}
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        group_of = {i: g for g in groups for i in g.layers}
        for i, (attn, dtype) in enumerate(zip(layers, dtypes, strict=True)):
            shape = (group_of[i].num_blocks * block_size, attn.num_kv_heads, attn.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def bytes_per_token(self) -> int:
        """Bytes one cached token takes across all layers (keys and values)."""
        return sum(k.shape[1] * k.shape[2] * k.element_size() * 2 for k in self.keys)


def cache_groups(
    layers: list[Attention], num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
) -> list[CacheGroupSpec]:
    """Group layers by attention span and size each group's block pool.

    A sliding group never needs more than ``window + tokens scheduled in one step`` slots per sequence, so its pool
    is capped there; full-attention groups get ``num_blocks``.
    """
    by_group: dict[str, list[int]] = {}
    for i, attn in enumerate(layers):
        by_group.setdefault(attn.cache_group, []).append(i)
    specs = []
    for name, idx in by_group.items():
        window = layers[idx[0]].sliding_window
        blocks = num_blocks
        if window is not None:
            per_seq = -(-(window + max_num_batched_tokens) // block_size) + 1
            blocks = min(num_blocks, max_num_seqs * per_seq)
        specs.append(CacheGroupSpec(name, window, blocks, tuple(idx)))
    return specs
