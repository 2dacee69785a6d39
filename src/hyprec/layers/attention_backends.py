"""Attention kernels, chosen by (device, attention dtype).

* :class:`SDPABackend` is the reference and always available: ``torch.nn.functional.scaled_dot_product_attention``
  on padded batches. On CPU PyTorch dispatches it to its fused flash-attention kernel for float32, bfloat16 and
  float16 alike (with or without a mask), so QK^T and the softmax statistics stay in float32.
* :class:`FlashAttentionBackend` runs ``flash_attn_varlen_func`` directly on packed sequences when the
  ``flash-attn`` package and a CUDA device are present and the attention dtype is half precision. It has no
  additive-bias input, so models with a bias (MPNet) use SDPA there too.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F

from hyprec.layers.attention import AttentionMetadata, CacheGroupSlots, Packing

HALF = (torch.float16, torch.bfloat16)


class AttentionBackend(Protocol):
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


def _pad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    padded = x.new_zeros(len(packing.lens), packing.max_len, *x.shape[1:])
    padded[packing.batch_index, packing.position] = x
    return padded.transpose(1, 2)  # [B, H, T, D]


def _lens(packing: Packing, device: torch.device) -> torch.Tensor:
    return torch.tensor(packing.lens, device=device)


class SDPABackend:
    """Reference backend: pad, run PyTorch's fused SDPA with a boolean (or bias) mask, unpad."""

    name = "sdpa"

    def _encoder_mask(self, meta: AttentionMetadata, dtype: torch.dtype) -> torch.Tensor | None:
        qp = meta.queries
        if not qp.ragged and meta.bias is None:
            return None
        device = qp.cu.device
        keep = (torch.arange(qp.max_len, device=device)[None, :] < _lens(qp, device)[:, None])[:, None, None, :]
        if meta.bias is None:
            return keep  # key-padding mask [B, 1, 1, T]
        # The bias joins the kernel as an additive mask in the attention dtype; padded keys get -inf.
        return meta.bias.masked_fill(~keep, float("-inf")).to(dtype)

    def _decoder_mask(self, meta: AttentionMetadata, slots: CacheGroupSlots) -> torch.Tensor:
        qp, kp = meta.queries, slots.keys
        device = qp.cu.device
        q_pos = meta.query_start[:, None] + torch.arange(qp.max_len, device=device)[None, :]  # [B, Tq]
        k_idx = torch.arange(kp.max_len, device=device)[None, :]
        k_pos = slots.key_start[:, None] + k_idx  # [B, Tk]
        keep = (k_idx < _lens(kp, device)[:, None])[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if slots.window is not None:
            keep &= k_pos[:, None, :] > q_pos[:, :, None] - slots.window
        # Padded query rows would see no key at all (NaN); let them see key 0, their output is discarded.
        pad_rows = torch.arange(qp.max_len, device=device)[None, :] >= _lens(qp, device)[:, None]
        keep[:, :, 0] |= pad_rows
        return keep[:, None]  # [B, 1, Tq, Tk]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        slots: CacheGroupSlots | None,
        scale: float,
    ) -> torch.Tensor:
        # Masks depend on the batch, not the layer: build each once per forward pass.
        key = ("sdpa-mask", None if slots is None else slots.window, q.dtype)
        if key not in meta.derived:
            meta.derived[key] = self._encoder_mask(meta, q.dtype) if slots is None else self._decoder_mask(meta, slots)
        mask = meta.derived[key]
        kp = meta.queries if slots is None else slots.keys
        out = F.scaled_dot_product_attention(
            _pad(q, meta.queries),
            _pad(k, kp),
            _pad(v, kp),
            attn_mask=mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.transpose(1, 2)[meta.queries.batch_index, meta.queries.position]


class FlashAttentionBackend:
    """FlashAttention-2 varlen kernel on packed sequences (CUDA, float16/bfloat16, no additive bias)."""

    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func  # imported lazily: CUDA-only package

        self._varlen = flash_attn_varlen_func

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        slots: CacheGroupSlots | None,
        scale: float,
    ) -> torch.Tensor:
        if meta.bias is not None:
            raise ValueError("flash-attn backend cannot apply an additive bias; select_backend avoids this")
        kp = meta.queries if slots is None else slots.keys
        window = (-1, -1) if slots is None or slots.window is None else (slots.window - 1, 0)
        # Causal masking in flash-attn aligns the last query with the last key, which is where a sequence's
        # new tokens sit relative to its cached keys.
        return self._varlen(
            q,
            k,
            v,
            cu_seqlens_q=meta.queries.cu,
            cu_seqlens_k=kp.cu,
            max_seqlen_q=meta.queries.max_len,
            max_seqlen_k=kp.max_len,
            softmax_scale=scale,
            causal=meta.causal,
            window_size=window,
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
