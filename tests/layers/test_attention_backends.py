"""Attention backends against a naive reference written here in plain torch, without a model.

* SDPA: the encoder key-padding mask (and MPNet's additive bias), and the decoder's causal + sliding-window mask
  over cached keys, on ragged batches that mix fresh prompts, continued prefill chunks and decode steps.
* FlashAttention: ``flash_attn_varlen_func`` is CUDA-only, so a stand-in with the same signature and the maths
  that flash-attn documents (causal mask aligned to the bottom-right corner, ``window_size=(left, right)`` around
  that diagonal, grouped-query heads) is put in ``sys.modules["flash_attn"]``. The real
  :class:`FlashAttentionBackend` then runs on CPU, so its translation of hyprec's absolute positions and windows
  into flash-attn's arguments is executed in CI and compared with SDPA.

Tolerances are derived from the attention dtype in :func:`atol` (both sides get the same rounded q/k/v).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from hyprec.layers import attention_backends
from hyprec.layers.attention import AttentionMetadata, CacheGroupSlots, Packing
from hyprec.layers.attention_backends import FlashAttentionBackend, SDPABackend, select_backend

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a thread pool only adds overhead

HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS, HEAD_DIM = 4, 16
SCALE = HEAD_DIM**-0.5
# The batch-invariant SDPA mode (one kernel call per group of equal-shape sequences) must meet the same reference.
MODES = [pytest.param(False, id="padded"), pytest.param(True, id="batch-invariant")]


def atol(dtype: torch.dtype, v: torch.Tensor, scores_abs: float) -> float:
    """Largest |backend - exact| for attention over inputs already in ``dtype`` (exact = float64 maths on the same
    rounded q/k/v), with u the unit roundoff of ``dtype`` (eps / 2) and u32 that of float32:

    * the output is rounded to ``dtype``: <= u * max|o| <= u * max|v|, since each output row is a convex
      combination of rows of v;
    * fused half-precision kernels round the probabilities P to ``dtype`` before P @ V: |sum_j dp_j v_j|
      <= u * sum_j p_j |v_j| <= u * max|v|;
    * scores are float32 dot products over head_dim terms: |ds| <= head_dim * u32 * sum_d |q_d k_d| * scale (the
      standard bound gamma_n ~ n u), plus u32 of the same for the scale and the additive mask; ``scores_abs`` is
      the largest such sum of absolute terms. A softmax moves by at most 2 max|ds| in l1 norm, so o by at most
      2 max|ds| max|v|;
    * the float32 exp, normalisation and P @ V accumulation are of the same order again: a factor 2 on the sum.
    """
    u = torch.finfo(dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    ds = (HEAD_DIM + 1) * u32 * scores_abs
    return 2 * (2 * u + 2 * ds) * v.abs().max().item()


@dataclass
class Batch:
    """One attention call's inputs: per sequence the absolute position of its first query and first key."""

    q_lens: list[int]
    k_lens: list[int]
    q_starts: list[int]
    k_starts: list[int]

    def check(self) -> None:
        # As in the engine: a sequence's keys end with its last query (its own new tokens are cached first).
        for lq, lk, qs, ks in zip(self.q_lens, self.k_lens, self.q_starts, self.k_starts, strict=True):
            assert ks + lk == qs + lq and ks <= qs


def _inputs(batch: Batch, dtype: torch.dtype, kv_heads: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Scores of a few units: peaked enough that a wrong mask moves outputs by O(max|v|).
    q = (torch.randn(sum(batch.q_lens), HEADS, HEAD_DIM, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(sum(batch.k_lens), kv_heads, HEAD_DIM, generator=gen) * 1.5).to(dtype)
    v = torch.randn(sum(batch.k_lens), kv_heads, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


def reference(
    q, k, v, batch: Batch, *, causal: bool, window: int | None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Exact attention (float64) of each sequence alone, masked by absolute positions; also the largest score
    computed from absolute values (sum_d |q_d k_d| * scale + |bias|), which bounds its rounding (see atol)."""
    outs, smax = [], 0.0
    qo = ko = 0
    rep = q.shape[1] // k.shape[1]
    for b, (lq, lk, qs, ks) in enumerate(zip(batch.q_lens, batch.k_lens, batch.q_starts, batch.k_starts, strict=True)):
        qb = q[qo : qo + lq].double()
        kb = k[ko : ko + lk].double().repeat_interleave(rep, dim=1)  # query head h reads kv head h // rep
        vb = v[ko : ko + lk].double().repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kb) * SCALE
        s_abs = torch.einsum("qhd,khd->hqk", qb.abs(), kb.abs()) * SCALE
        if bias is not None:
            bb = bias[b if bias.shape[0] > 1 else 0, :, :lq, :lk].double()
            s, s_abs = s + bb, s_abs + bb.abs()
        smax = max(smax, s_abs.max().item())
        q_pos = qs + torch.arange(lq)[:, None]
        k_pos = ks + torch.arange(lk)[None, :]
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            keep &= k_pos <= q_pos
        if window is not None:
            keep &= k_pos > q_pos - window
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vb))
        qo, ko = qo + lq, ko + lk
    return torch.cat(outs), smax


def _encoder_meta(lens, dtype, backend, bias=None, batch_invariant=False) -> AttentionMetadata:
    extra = {"batch_invariant": True} if batch_invariant else {}
    meta = AttentionMetadata.for_sequences(lens, backend=backend, device="cpu", **extra)
    meta.bias = bias
    return meta


def _decoder_meta(batch: Batch, dtype, backend, window, batch_invariant=False) -> tuple[AttentionMetadata, object]:
    batch.check()
    slots = CacheGroupSlots(
        write_slots=torch.empty(0, dtype=torch.long),  # the backend only reads keys; the cache is not involved
        read_slots=torch.empty(0, dtype=torch.long),
        keys=Packing.of(batch.k_lens, "cpu"),
        key_start=torch.tensor(batch.k_starts),
        window=window,
    )
    extra = {"batch_invariant": True} if batch_invariant else {}
    meta = AttentionMetadata(
        backend=backend,
        queries=Packing.of(batch.q_lens, "cpu"),
        causal=True,
        query_start=torch.tensor(batch.q_starts),
        groups={"g": slots},
        **extra,
    )
    return meta, slots


# Decoder batches, built as the engine builds them: fresh prompts (queries from 0), a continued prefill chunk, a
# decode step, and for sliding layers keys that start after released blocks (block size 4, window 8).
PREFILL = Batch(q_lens=[6, 1, 9], k_lens=[6, 1, 9], q_starts=[0, 0, 0], k_starts=[0, 0, 0])
MIXED_FULL = Batch(q_lens=[6, 5, 1], k_lens=[6, 15, 21], q_starts=[0, 10, 20], k_starts=[0, 0, 0])
# Window 8: a query at p sees keys > p - 8; the block holding p - 7 and later ones are kept.
MIXED_SLIDING = Batch(q_lens=[6, 5, 1, 6], k_lens=[6, 15, 9, 14], q_starts=[0, 10, 20, 24], k_starts=[0, 0, 12, 16])
DECODER_CASES = {
    "prefill-full": (PREFILL, None),
    "prefill-window3": (PREFILL, 3),
    "mixed-full": (MIXED_FULL, None),
    "mixed-window8": (MIXED_SLIDING, 8),
}


# ---------------------------------------------------------------------------------------------------------------
# SDPA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_invariant", MODES)
@pytest.mark.parametrize("kv_heads", [HEADS, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens", [[5, 1, 9, 3], [6, 6]], ids=["ragged", "equal"])
def test_sdpa_encoder_masks_padded_keys(lens, dtype, kv_heads, batch_invariant):
    batch = Batch(lens, lens, [0] * len(lens), [0] * len(lens))
    q, k, v = _inputs(batch, dtype, kv_heads)
    meta = _encoder_meta(lens, dtype, SDPABackend(), batch_invariant=batch_invariant)
    out = SDPABackend().forward(q, k, v, meta, None, SCALE)
    assert out.shape == q.shape and out.dtype == dtype
    ref, smax = reference(q, k, v, batch, causal=False, window=None)
    tol = atol(dtype, v, smax)
    assert (out.double() - ref).abs().max().item() <= tol
    # The check can fail: attending over the padded batch without the mask is far off for the short sequences.
    if len(set(lens)) > 1:
        unmasked = torch.nn.functional.scaled_dot_product_attention(
            *(_pad_like_backend(x, lens) for x in (q, k, v)), scale=SCALE, enable_gqa=kv_heads != HEADS
        )
        unmasked = unmasked.transpose(1, 2)[meta.queries.batch_index, meta.queries.position]
        assert (unmasked.double() - ref).abs().max().item() > 20 * tol


def _pad_like_backend(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    packing = Packing.of(lens, "cpu")
    padded = x.new_zeros(len(lens), packing.max_len, *x.shape[1:])
    padded[packing.batch_index, packing.position] = x
    return padded.transpose(1, 2)


@pytest.mark.parametrize("batch_invariant", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_encoder_adds_the_bias_in_the_attention_dtype(dtype, batch_invariant):
    """MPNet's relative position bias ``[1, heads, T, T]`` joins the kernel as an additive mask in the attention
    dtype; padded keys stay masked."""
    lens = [7, 2, 4]
    batch = Batch(lens, lens, [0] * 3, [0] * 3)
    q, k, v = _inputs(batch, dtype, HEADS, seed=1)
    bias = torch.randn(1, HEADS, 7, 7, generator=torch.Generator().manual_seed(2)) * 2
    meta = _encoder_meta(lens, dtype, SDPABackend(), bias=bias, batch_invariant=batch_invariant)
    out = SDPABackend().forward(q, k, v, meta, None, SCALE)
    # The documented contract: the bias is rounded to the attention dtype, so the reference uses that rounding.
    ref, smax = reference(q, k, v, batch, causal=False, window=None, bias=bias.to(dtype))
    assert (out.double() - ref).abs().max().item() <= atol(dtype, v, smax)
    no_bias, _ = reference(q, k, v, batch, causal=False, window=None)
    assert (no_bias - ref).abs().max().item() > 20 * atol(dtype, v, smax)  # the bias matters at this size


def test_sdpa_encoder_bias_per_sequence():
    """A bias with a batch dimension applies to its own sequence (padded default mode)."""
    dtype, lens = torch.float32, [3, 5]
    batch = Batch(lens, lens, [0, 0], [0, 0])
    q, k, v = _inputs(batch, dtype, HEADS, seed=3)
    bias = torch.randn(2, HEADS, 5, 5, generator=torch.Generator().manual_seed(4)) * 2
    out = SDPABackend().forward(q, k, v, _encoder_meta(lens, dtype, SDPABackend(), bias=bias), None, SCALE)
    ref, smax = reference(q, k, v, batch, causal=False, window=None, bias=bias)
    assert (out.double() - ref).abs().max().item() <= atol(dtype, v, smax)


@pytest.mark.parametrize("batch_invariant", MODES)
@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_sdpa_decoder_causal_and_sliding_window(case, dtype, kv_heads, batch_invariant):
    batch, window = DECODER_CASES[case]
    q, k, v = _inputs(batch, dtype, kv_heads, seed=5)
    meta, slots = _decoder_meta(batch, dtype, SDPABackend(), window, batch_invariant)
    out = SDPABackend().forward(q, k, v, meta, slots, SCALE)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    ref, smax = reference(q, k, v, batch, causal=True, window=window)
    tol = atol(dtype, v, smax)
    assert (out.double() - ref).abs().max().item() <= tol
    # The reference is sensitive to what is tested: one key more of window, or none at all, is far off.
    wider, _ = reference(q, k, v, batch, causal=True, window=(window or 0) + 1 if window else None)
    if window is not None:
        assert (wider - ref).abs().max().item() > 20 * tol
    no_causal, _ = reference(q, k, v, batch, causal=False, window=None)
    assert (no_causal - ref).abs().max().item() > 20 * tol


# ---------------------------------------------------------------------------------------------------------------
# FlashAttention through a CPU stand-in for flash_attn_varlen_func
# ---------------------------------------------------------------------------------------------------------------


class FakeFlashAttn:
    """``flash_attn.flash_attn_varlen_func`` (flash-attn 2.x signature) in plain torch, float64 inside.

    Semantics as flash-attn documents them: sequences are packed along the token axis and delimited by int32
    ``cu_seqlens``; with ``causal`` the mask is aligned to the bottom-right corner (query i of a sequence with
    sq queries and sk keys sees keys j <= i + sk - sq); ``window_size=(left, right)`` keeps keys in
    ``[i + sk - sq - left, i + sk - sq + right]``, -1 meaning unbounded; query head h reads key/value head
    h // (heads / kv_heads). Records every call for inspection."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        block_table=None,
    ):
        # What the real kernel insists on.
        assert q.dtype in HALF and k.dtype == v.dtype == q.dtype, "flash-attn runs in float16/bfloat16 only"
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert len(cu_seqlens_q) == len(cu_seqlens_k)
        assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0] == v.shape[0]
        q_lens, k_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
        assert max_seqlen_q == max(q_lens) and max_seqlen_k == max(k_lens)
        assert q.shape[1] % k.shape[1] == 0 and dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
        left, right = window_size
        self.calls.append({"causal": causal, "window_size": tuple(window_size), "softmax_scale": softmax_scale})
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        rep = q.shape[1] // k.shape[1]
        out = torch.zeros(q.shape, dtype=torch.float64)
        for b, (sq, sk) in enumerate(zip(q_lens, k_lens, strict=True)):
            q0, k0 = int(cu_seqlens_q[b]), int(cu_seqlens_k[b])
            qb = q[q0 : q0 + sq].double()
            kb = k[k0 : k0 + sk].double().repeat_interleave(rep, dim=1)
            vb = v[k0 : k0 + sk].double().repeat_interleave(rep, dim=1)
            diag = torch.arange(sq)[:, None] + sk - sq  # the key aligned with each query
            j = torch.arange(sk)[None, :]
            keep = torch.ones(sq, sk, dtype=torch.bool)
            if causal:
                keep &= j <= diag
            if left >= 0:
                keep &= j >= diag - left
            if right >= 0:
                keep &= j <= diag + right
            s = torch.einsum("qhd,khd->hqk", qb, kb) * scale
            p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows give 0
            out[q0 : q0 + sq] = torch.einsum("hqk,khd->qhd", p, vb)
        return out.to(q.dtype)


@pytest.fixture
def fake_flash(monkeypatch) -> FakeFlashAttn:
    fake = FakeFlashAttn()
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = fake
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return fake


@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_flash_backend_decoder_matches_sdpa(fake_flash, case, dtype, kv_heads):
    batch, window = DECODER_CASES[case]
    q, k, v = _inputs(batch, dtype, kv_heads, seed=7)
    flash = FlashAttentionBackend()
    meta, slots = _decoder_meta(batch, dtype, flash, window)
    out = flash.forward(q, k, v, meta, slots, SCALE)
    assert fake_flash.calls == [
        {"causal": True, "window_size": (-1, -1) if window is None else (window - 1, 0), "softmax_scale": SCALE}
    ]
    sdpa_meta, sdpa_slots = _decoder_meta(batch, dtype, SDPABackend(), window)
    expected = SDPABackend().forward(q, k, v, sdpa_meta, sdpa_slots, SCALE)
    ref, smax = reference(q, k, v, batch, causal=True, window=window)
    tol = atol(dtype, v, smax)
    assert out.shape == expected.shape and out.dtype == dtype
    # Both backends are within tol of the exact result, so within 2 tol of each other.
    assert (out.double() - expected.double()).abs().max().item() <= 2 * tol
    assert (out.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_flash_backend_encoder_matches_sdpa(fake_flash, dtype):
    lens = [5, 1, 9, 3]
    batch = Batch(lens, lens, [0] * 4, [0] * 4)
    q, k, v = _inputs(batch, dtype, 2, seed=9)
    out = FlashAttentionBackend().forward(q, k, v, _encoder_meta(lens, dtype, None), None, SCALE)
    assert fake_flash.calls[0]["causal"] is False and fake_flash.calls[0]["window_size"] == (-1, -1)
    expected = SDPABackend().forward(q, k, v, _encoder_meta(lens, dtype, SDPABackend()), None, SCALE)
    _, smax = reference(q, k, v, batch, causal=False, window=None)
    assert (out.double() - expected.double()).abs().max().item() <= 2 * atol(dtype, v, smax)


def test_flash_backend_refuses_an_additive_bias(fake_flash):
    lens = [3, 2]
    q = torch.zeros(5, HEADS, HEAD_DIM, dtype=torch.float16)
    meta = _encoder_meta(lens, torch.float16, None, bias=torch.zeros(1, HEADS, 3, 3))
    with pytest.raises(ValueError, match="additive bias"):
        FlashAttentionBackend().forward(q, q, q, meta, None, SCALE)
    assert not fake_flash.calls


def test_select_backend_prefers_flash_only_where_it_applies(fake_flash, monkeypatch):
    monkeypatch.setattr(attention_backends, "flash_attn_available", lambda: True)
    for dtype in HALF:
        assert isinstance(select_backend("cuda", dtype), FlashAttentionBackend)
        assert isinstance(select_backend("cuda", dtype, needs_bias=True), SDPABackend)  # MPNet's bias
        assert isinstance(select_backend("cpu", dtype), SDPABackend)
    assert isinstance(select_backend("cuda", torch.float32), SDPABackend)  # flash-attn has no float32 mode
    monkeypatch.setattr(attention_backends, "flash_attn_available", lambda: False)
    assert isinstance(select_backend("cuda", torch.float16), SDPABackend)
