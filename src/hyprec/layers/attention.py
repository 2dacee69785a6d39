"""The attention seam: the one place where activations leave the compute dtype.

Models hand packed (unpadded) q/k/v of shape ``[num_tokens, heads, head_dim]`` to :class:`Attention`, together
with an :class:`AttentionMetadata` that describes the batch. The layer casts q/k/v to the policy's attention
dtype, writes new keys/values to the KV cache (decoders), and runs the backend chosen for (device, attention
dtype); the result is cast back to the compute dtype. Fused kernels keep QK^T, the softmax statistics and the PV
accumulation in float32 internally, which is why half-precision inputs cost so little accuracy there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


class AttentionBackend(Protocol):
    """A fused attention kernel over packed sequences (implementations: :mod:`hyprec.layers.attention_backends`)."""

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        slots: CacheGroupSlots | None,
        scale: float,
    ) -> torch.Tensor:
        """Packed q ``[N, H, D]`` and k/v ``[Nk, Hkv, D]`` in the attention dtype -> packed output ``[N, H, D]``.

        ``slots`` is None when keys are the queries' own tokens (encoders), else it describes the keys' packing,
        positions and window."""
        ...


class LayerCache(Protocol):
    """The KV cache as attention layers see it (the engine's :class:`~hyprec.engine.kv_cache.KVCache`)."""

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s key and value tensors, ``[slots, kv_heads, head_dim]`` each."""
        ...


@dataclass
class Packing:
    """Variable-length segments packed back to back along the token axis.

    Attributes:
        lens: tokens of each segment.
        cu: int32 prefix sums of ``lens`` (length ``batch + 1``), as varlen kernels expect.
        max_len: longest segment.
        batch_index: for each packed token, its segment.
        position: for each packed token, its index inside its segment.
    """

    lens: list[int]
    cu: torch.Tensor
    max_len: int
    batch_index: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, lens: list[int], device: torch.device | str) -> Packing:
        lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens_t, 0)
        batch_index = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
        position = torch.arange(int(lens_t.sum()), device=device) - cu[:-1].long()[batch_index]
        return cls(list(lens), cu, max(lens), batch_index, position)

    @property
    def ragged(self) -> bool:
        return min(self.lens) != self.max_len


@dataclass
class CacheGroupSlots:
    """Where one step reads and writes the KV cache, for the layers of one cache group.

    Attributes:
        write_slots: flat cache slot of each new token (``block * block_size + offset``), packed like the queries.
        read_slots: flat cache slots of the keys each sequence attends to, packed by sequence.
        keys: packing of the gathered keys.
        key_start: absolute position of each sequence's first gathered key ``[batch]``.
        window: sliding window (keys with ``pos > query_pos - window``), or None for full attention.
    """

    write_slots: torch.Tensor
    read_slots: torch.Tensor
    keys: Packing
    key_start: torch.Tensor
    window: int | None = None


@dataclass
class AttentionMetadata:
    """Describes one forward batch.

    Encoders: queries and keys are this batch's tokens, no cache, no causal mask. Decoders: queries are the new
    tokens of each sequence (a prompt chunk or one decode token), starting at absolute position ``query_start``;
    keys come from the KV cache per cache group.

    Attributes:
        backend: the kernel implementation (chosen once by :func:`select_backend`).
        queries: packing of the new tokens.
        causal: causal masking (decoders).
        bias: optional additive float32 bias ``[1 or batch, heads, max_len, max_len]`` (MPNet's relative position
            bias, encoders only); backends apply it inside the fused kernel as an additive mask.
        query_start: absolute position of each sequence's first query ``[batch]`` (decoders).
        kv_cache: the cache tensors (decoders).
        groups: per cache group, where to read and write it (decoders).
        batch_invariant: compute each sequence's attention so that it cannot depend on the other sequences of the
            batch (backends group sequences of equal shape instead of padding them to the longest).
    """

    backend: AttentionBackend
    queries: Packing
    causal: bool = False
    bias: torch.Tensor | None = None
    query_start: torch.Tensor | None = None
    kv_cache: LayerCache | None = None
    groups: dict[str, CacheGroupSlots] = field(default_factory=dict)
    batch_invariant: bool = False
    # Per-batch tensors a backend derives once and reuses in every layer (masks), keyed by the backend.
    derived: dict[object, object] = field(default_factory=dict)

    @classmethod
    def for_sequences(
        cls,
        seq_lens: list[int],
        *,
        backend: AttentionBackend,
        device: torch.device | str,
        causal: bool = False,
        batch_invariant: bool = False,
    ) -> AttentionMetadata:
        """Metadata for a cache-less batch whose sequences attend to themselves (encoders)."""
        return cls(
            backend=backend,
            queries=Packing.of(seq_lens, device),
            causal=causal,
            batch_invariant=batch_invariant,
        )

    # Encoder-side shorthands.
    @property
    def seq_lens(self) -> list[int]:
        return self.queries.lens

    @property
    def max_seqlen(self) -> int:
        return self.queries.max_len

    @property
    def position(self) -> torch.Tensor:
        return self.queries.position

    @property
    def num_tokens(self) -> int:
        return int(self.queries.batch_index.numel())


class Attention(nn.Module):
    """Scaled dot-product attention over packed sequences, computed in the policy's attention dtype.

    Args:
        num_heads: query heads.
        head_dim: size of each head.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        scale: softmax scale; ``1/sqrt(head_dim)`` by default.
        layer_idx: index of the layer's KV cache tensors (decoders).
        sliding_window: attend only to the last ``sliding_window`` positions (the query's own included).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        scale: float | None = None,
        *,
        layer_idx: int = 0,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.scale = scale if scale is not None else head_dim**-0.5
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        # The dtype q/k/v enter the kernel in: the one route of the policy's attention dtype to the kernel, set per
        # layer when the engine installs a policy (hyprec.precision.casting.set_attention_dtypes).
        self.attn_dtype = torch.float32

    @property
    def cache_group(self) -> str:
        """Layers with the same window share block tables; a sliding layer keeps only its window cached."""
        return "full" if self.sliding_window is None else f"sliding-{self.sliding_window}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: ``[N, num_heads, head_dim]``, k/v: ``[N, num_kv_heads, head_dim]`` -> ``[N, num_heads * head_dim]``."""
        out_dtype = q.dtype
        dt = self.attn_dtype
        q = q.to(dt)
        if meta.kv_cache is None:
            out = meta.backend.forward(q, k.to(dt), v.to(dt), meta, None, self.scale)
        else:
            slots = meta.groups[self.cache_group]
            k_cache, v_cache = meta.kv_cache.layer(self.layer_idx)
            # The cache stores keys/values in kv_cache_dtype; reads come back in the attention dtype.
            # index_copy_/index_select rather than indexing syntax: the same copies, without advanced indexing's
            # per-call set-up (3.0 -> 1.5 us-scale ops; they run twice per layer per step).
            k_cache.index_copy_(0, slots.write_slots, k.to(k_cache.dtype))
            v_cache.index_copy_(0, slots.write_slots, v.to(v_cache.dtype))
            keys = k_cache.index_select(0, slots.read_slots).to(dt)
            values = v_cache.index_select(0, slots.read_slots).to(dt)
            out = meta.backend.forward(q, keys, values, meta, slots, self.scale)
        return out.to(out_dtype).reshape(q.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        window = f", window={self.sliding_window}" if self.sliding_window else ""
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{window}"
