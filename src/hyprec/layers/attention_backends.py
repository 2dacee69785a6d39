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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyprec.dtypes import HALF_DTYPES
from hyprec.layers.attention import AttentionBackend, AttentionMetadata, CacheGroupSlots, Packing


def _flat_rows(packing: Packing, meta: AttentionMetadata) -> torch.Tensor:
    """Row of each packed token in the padded ``[batch * max_len]`` layout (computed once per batch)."""
    key = ("flat-rows", id(packing))
    if key not in meta.derived:
        meta.derived[key] = packing.batch_index * packing.max_len + packing.position
    return meta.derived[key]


def _pad(x: torch.Tensor, packing: Packing, meta: AttentionMetadata, role: str) -> torch.Tensor:
    """Packed ``[N, H, D]`` -> padded ``[B, H, T, D]`` (a strided view of ``[B, T, H, D]``, the layout the fused CPU
    kernel reads). Equal lengths need no copy. Ragged batches are copied into a zeroed buffer kept for the whole
    forward pass: every layer writes the same real rows, so the padding rows stay zero (finite: a masked key's
    zero probability times its value must not be NaN) without being cleared again."""
    batch, length = len(packing.lens), packing.max_len
    if not packing.ragged:
        return x.reshape(batch, length, *x.shape[1:]).transpose(1, 2)
    key = ("pad-buffer", role, id(packing), tuple(x.shape[1:]), x.dtype)
    if key not in meta.derived:
        meta.derived[key] = x.new_zeros(batch * length, *x.shape[1:])
    buffer = meta.derived[key]
    buffer.index_copy_(0, _flat_rows(packing, meta), x)
    return buffer.view(batch, length, *x.shape[1:]).transpose(1, 2)


def _unpad(out: torch.Tensor, packing: Packing, meta: AttentionMetadata) -> torch.Tensor:
    """Padded ``[B, H, T, D]`` kernel output -> packed ``[N, H, D]``."""
    rows = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])  # a view: the kernel writes [B, T, H, D]
    return rows if not packing.ragged else rows.index_select(0, _flat_rows(packing, meta))


def _lens(packing: Packing, device: torch.device) -> torch.Tensor:
    return torch.tensor(packing.lens, device=device)


def _rows(starts: list[int], members: list[int], length: int, device: torch.device) -> torch.Tensor:
    """Packed row indices of ``length`` tokens from each member sequence, in member order."""
    first = torch.tensor([starts[i] for i in members], device=device)
    return (first[:, None] + torch.arange(length, device=device)[None, :]).flatten()


@dataclass
class _Group:
    """Sequences attended together in batch-invariant mode: same query and key lengths."""

    members: int
    q_len: int
    k_len: int
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    mask: torch.Tensor | None


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
        if meta.batch_invariant:
            return self._forward_grouped(q, k, v, meta, slots, scale)
        # Masks depend on the batch, not the layer: build each once per forward pass.
        key = ("sdpa-mask", None if slots is None else slots.window, q.dtype)
        if key not in meta.derived:
            meta.derived[key] = self._encoder_mask(meta, q.dtype) if slots is None else self._decoder_mask(meta, slots)
        mask = meta.derived[key]
        kp = meta.queries if slots is None else slots.keys
        out = F.scaled_dot_product_attention(
            _pad(q, meta.queries, meta, "q"),
            _pad(k, kp, meta, "k"),
            _pad(v, kp, meta, "v"),
            attn_mask=mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return _unpad(out, meta.queries, meta)

    def _forward_grouped(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        slots: CacheGroupSlots | None,
        scale: float,
    ) -> torch.Tensor:
        """Batch-invariant attention: one SDPA call per group of sequences with the same (query, key) lengths.

        The fused CPU kernel splits queries and keys into blocks by the lengths it is given and computes every
        (sequence, head, query block) independently, so a sequence's result depends on its own lengths only, never
        on how far its neighbours were padded (measured bit-identical for any batch composition in float32,
        float16 and bfloat16). Each sequence gets exactly the mask it would get alone.
        """
        key = ("sdpa-groups", None if slots is None else slots.window, q.dtype)
        if key not in meta.derived:
            meta.derived[key] = self._groups(meta, slots, q.dtype)
        out = torch.empty_like(q)
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
        for group in meta.derived[key]:
            size = group.members
            qs = q[group.q_rows].view(size, group.q_len, heads, dim).transpose(1, 2)
            ks = k[group.k_rows].view(size, group.k_len, kv_heads, dim).transpose(1, 2)
            vs = v[group.k_rows].view(size, group.k_len, kv_heads, dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=group.mask, scale=scale, enable_gqa=heads != kv_heads
            )
            out[group.q_rows] = o.transpose(1, 2).reshape(-1, heads, dim)
        return out

    def _groups(self, meta: AttentionMetadata, slots: CacheGroupSlots | None, dtype: torch.dtype) -> list[_Group]:
        qp = meta.queries
        kp = qp if slots is None else slots.keys
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(zip(qp.lens, kp.lens, strict=True)):
            by_shape.setdefault(shape, []).append(i)
        full_mask = None if slots is None else self._decoder_mask(meta, slots)
        q_starts, k_starts = qp.cu.tolist(), kp.cu.tolist()
        device = qp.cu.device
        groups = []
        for (q_len, k_len), members in by_shape.items():
            if full_mask is not None:
                mask = full_mask[members, :, :q_len, :k_len].contiguous()
            elif meta.bias is not None:
                mask = meta.bias[:, :, :q_len, :k_len].to(dtype).contiguous()  # relative bias: same for every seq
            else:
                mask = None  # equal lengths, no padding: nothing to mask
            groups.append(
                _Group(
                    members=len(members),
                    q_len=q_len,
                    k_len=k_len,
                    q_rows=_rows(q_starts, members, q_len, device),
                    k_rows=_rows(k_starts, members, k_len, device),
                    mask=mask,
                )
            )
        return groups


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
    device: torch.device | str, attn_dtype: torch.dtype, *, needs_bias: bool = False, batch_invariant: bool = False
) -> AttentionBackend:
    """The backend for (device, attention dtype): FlashAttention on CUDA in half precision when installed, the
    model needs no additive bias and batch invariance is not asked for (its split heuristics depend on the batch),
    otherwise the SDPA reference."""
    cuda = torch.device(device).type == "cuda"
    if cuda and attn_dtype in HALF_DTYPES and not needs_bias and not batch_invariant and flash_attn_available():
        return FlashAttentionBackend()
    return _SDPA
