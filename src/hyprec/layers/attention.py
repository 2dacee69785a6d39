"""The attention seam: the one place where activations leave the compute dtype.

Models hand packed (unpadded) q/k/v of shape ``[num_tokens, heads, head_dim]`` to :class:`Attention`, together
with an :class:`AttentionMetadata` that describes the batch. The layer casts q/k/v to the policy's attention
dtype, runs the backend chosen for (device, attention dtype) and casts the result back to the compute dtype.
Fused kernels keep QK^T, the softmax statistics and the PV accumulation in float32 internally, which is why
half-precision inputs cost so little accuracy there (see shared numerics notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from hyprec.layers.attention_backends import AttentionBackend


@dataclass
class AttentionMetadata:
    """Describes one forward batch of variable-length sequences packed back to back.

    Attributes:
        attn_dtype: dtype q/k/v are cast to before the kernel.
        backend: the kernel implementation (chosen once per batch by :func:`select_backend`).
        seq_lens: tokens of each sequence, in packing order.
        cu_seqlens: int32 prefix sums of ``seq_lens`` (length ``batch + 1``), as varlen kernels expect.
        max_seqlen: longest sequence in the batch.
        batch_index: for each packed token, its sequence (used by padded backends).
        position: for each packed token, its position inside its sequence.
        causal: causal masking (decoders) or full bidirectional attention (encoders).
        bias: optional additive float32 bias ``[1 or batch, heads, max_seqlen, max_seqlen]`` (MPNet's relative
            position bias); backends apply it inside the fused kernel as an additive mask.
    """

    attn_dtype: torch.dtype
    backend: AttentionBackend
    seq_lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch_index: torch.Tensor
    position: torch.Tensor
    causal: bool = False
    bias: torch.Tensor | None = None

    @classmethod
    def for_sequences(
        cls,
        seq_lens: list[int],
        *,
        attn_dtype: torch.dtype,
        backend: AttentionBackend,
        device: torch.device | str,
        causal: bool = False,
    ) -> AttentionMetadata:
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        batch_index = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)
        position = torch.arange(int(lens.sum()), device=device) - cu[:-1].long()[batch_index]
        return cls(
            attn_dtype=attn_dtype,
            backend=backend,
            seq_lens=list(seq_lens),
            cu_seqlens=cu,
            max_seqlen=max(seq_lens),
            batch_index=batch_index,
            position=position,
            causal=causal,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.batch_index.numel())


class Attention(nn.Module):
    """Scaled dot-product attention over packed sequences, computed in the policy's attention dtype.

    Args:
        num_heads: query heads.
        head_dim: size of each head.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        scale: softmax scale; ``1/sqrt(head_dim)`` by default.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int | None = None, scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.scale = scale if scale is not None else head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: ``[N, num_heads, head_dim]``, k/v: ``[N, num_kv_heads, head_dim]`` -> ``[N, num_heads * head_dim]``."""
        out_dtype = q.dtype
        dt = meta.attn_dtype
        out = meta.backend.forward(q.to(dt), k.to(dt), v.to(dt), meta, self.scale)
        return out.to(out_dtype).reshape(q.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
