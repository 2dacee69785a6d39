"""Attention kernels, chosen by (device, attention dtype).

* :class:`SDPABackend` is the reference and always available: ``torch.nn.functional.scaled_dot_product_attention``
  on padded batches. On CPU PyTorch dispatches it to its fused flash-attention kernel for float32, bfloat16 and
  float16 alike (with or without an additive mask), so QK^T and the softmax statistics stay in float32.
* :class:`FlashAttentionBackend` runs ``flash_attn_varlen_func`` directly on packed sequences when the
  ``flash-attn`` package and a CUDA device are present and the attention dtype is half precision. It has no
  additive-bias input, so models with a bias (MPNet) use SDPA there too.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F

from hyprec.layers.attention import AttentionMetadata

HALF = (torch.float16, torch.bfloat16)


class AttentionBackend(Protocol):
    name: str

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Packed q ``[N, H, D]``, k/v ``[N, Hkv, D]`` in the attention dtype -> packed output ``[N, H, D]``."""
        ...


class SDPABackend:
    """Reference backend: pad, run PyTorch's fused SDPA with a key-padding (and bias) mask, unpad."""

    name = "sdpa"

    def _pad(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        padded = x.new_zeros(len(meta.seq_lens), meta.max_seqlen, *x.shape[1:])
        padded[meta.batch_index, meta.position] = x
        return padded.transpose(1, 2)  # [B, H, T, D]

    def _mask(self, meta: AttentionMetadata, dtype: torch.dtype) -> torch.Tensor | None:
        ragged = min(meta.seq_lens) != meta.max_seqlen
        if not ragged and meta.bias is None:
            return None
        device = meta.cu_seqlens.device
        lens = torch.tensor(meta.seq_lens, device=device)
        keep = (torch.arange(meta.max_seqlen, device=device)[None, :] < lens[:, None])[:, None, None, :]
        if meta.bias is None:
            return keep  # boolean key-padding mask [B, 1, 1, T]
        # The bias joins the kernel as an additive mask in the attention dtype; padded keys get -inf.
        return meta.bias.masked_fill(~keep, float("-inf")).to(dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        mask = self._mask(meta, q.dtype)
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(
            self._pad(q, meta),
            self._pad(k, meta),
            self._pad(v, meta),
            attn_mask=mask,
            is_causal=meta.causal and mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2)[meta.batch_index, meta.position]


class FlashAttentionBackend:
    """FlashAttention-2 varlen kernel on packed sequences (CUDA, float16/bfloat16, no additive bias)."""

    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func  # imported lazily: CUDA-only package

        self._varlen = flash_attn_varlen_func

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.bias is not None:
            raise ValueError("flash-attn backend cannot apply an additive bias; select_backend avoids this")
        return self._varlen(
            q,
            k,
            v,
            cu_seqlens_q=meta.cu_seqlens,
            cu_seqlens_k=meta.cu_seqlens,
            max_seqlen_q=meta.max_seqlen,
            max_seqlen_k=meta.max_seqlen,
            softmax_scale=scale,
            causal=meta.causal,
        )


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


_SDPA = SDPABackend()


def select_backend(
    device: torch.device | str, attn_dtype: torch.dtype, *, needs_bias: bool = False
) -> AttentionBackend:
    """The backend for (device, attention dtype): FlashAttention on CUDA in half precision when installed and
    the model needs no additive bias, otherwise the SDPA reference."""
    if torch.device(device).type == "cuda" and attn_dtype in HALF and not needs_bias and flash_attn_available():
        return FlashAttentionBackend()
    return _SDPA
