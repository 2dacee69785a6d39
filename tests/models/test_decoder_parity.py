"""Decoder parity with transformers: teacher-forced logits at every position, greedy decoding, hybrid wiring.

Small randomly initialised decoders are built with transformers' own classes (Llama, Mistral, Qwen2, Qwen3, Gemma 3)
and saved with ``save_pretrained`` into a module-scoped temporary directory, each once per module (the case table is
``DECODER_CASES`` in tests/helpers.py, shared with the repair tests). The shapes cover GQA ratios 4:1, 2:1 and 1:1,
non-power-of-two head sizes (12, 20) including ``head_dim`` values that are not ``hidden_size / heads``, tied and
untied embeddings, 1-3 layers, linear RoPE scaling and other RoPE bases, and sliding windows shorter than the
prompts (Mistral: every layer; Qwen3: ``max_window_layers``; Gemma 3: a sliding/full mix with its own RoPE bases,
``query_pre_attn_scalar``, final-logit soft-capping and randomised ``(1 + w)`` norm weights).

How hyprec's per-position logits are obtained: the engine computes logits only for the rows that sample, so the
test hooks the decoder module the model runner calls (``llm.engine.model``, whose output is the final-norm hidden
state of every token of a step) and records each step's packed input ids, positions, segment lengths and hidden
states while ``llm.generate`` runs a batch of prompts. One prefill step covers every prompt position and each
decode step adds one position per sequence (through the paged KV cache), so ``compute_logits`` of the recorded
rows gives hyprec's teacher-forced logits over ``prompt + generated[:-1]``. The helper checks the recorded ids and
positions against the sequence before trusting the row-to-sequence assignment, and that the last row's argmax is
the token the sampler chose. transformers' reference is ``model(input_ids).logits`` of the same token sequence,
one sequence at a time (no padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hyprec import LLM, SamplingParams
from tests.helpers import DECODER_CASE_BY_NAME as CASE_BY_NAME
from tests.helpers import DECODER_CASES as CASES
from tests.helpers import DECODER_MAX_POS as MAX_POS
from tests.helpers import DECODER_VOCAB as VOCAB
from tests.helpers import DecoderCase as Case
from tests.helpers import build_hf_decoder

GEN_TOKENS = 32
PROMPT_LENS = (13, 21, 9)  # all longer than every sliding window of the cases
NUM_KV_BLOCKS = 32  # 32 x 16 slots: explicit, so the engine does not allocate its 1 GiB default


pytestmark = pytest.mark.usefixtures("single_thread")


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding one real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def fp32_logits_tol(config: dict, scale: float) -> float:
    """Largest |hyprec - transformers| allowed for float32 logits of largest |value| ``scale``.

    Both compute the same float32 maths and differ only in the order of their sums (GEMM blocking, the fused
    attention kernel, norm statistics, the paged cache's gather). An n-term sum evaluated in two orders differs by
    at most 2 n u sum|terms|; with mixed-sign terms the errors are random (typically sqrt(n) u sum|terms|), so
    n u scale per sum is a safe figure, with n the widest sum. Each layer adds its own share to what it passes on:
    layers + 1 (embeddings and head), x4 for the norms' 1/rms scaling of absolute errors. Log-probabilities move
    by at most twice the largest logit change (log-softmax subtracts a log-sum-exp), hence 2x for those.
    Wiring faults (a lost window, a wrong position, a cache slot mix-up) move logits by O(scale).
    """
    n = max(config["hidden_size"], config["intermediate_size"], config.get("head_dim") or 0)
    return 4 * (config["num_hidden_layers"] + 1) * n * unit_roundoff(torch.float32) * scale


def hybrid_logits_tol(config: dict, attn: str, scale: float) -> float:
    """Largest |hybrid - float32| allowed for logits of largest |value| ``scale`` with attention (and the KV cache)
    in ``attn``: per layer q, k, v and the attention output are rounded to ``attn`` (k and v once, into the
    cache), four roundings of relative size u that move the attention output by about 4 u of its scale; each
    layer adds that to what it passes on through the residual stream, x2 for the MLP and norms after it."""
    return 2 * config["num_hidden_layers"] * 4 * unit_roundoff(getattr(torch, attn)) * scale


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@dataclass
class Run:
    """One hyprec generate() over the case's prompts, with the teacher-forced logits recorded on the way."""

    token_ids: list[list[int]]  # generated tokens of each prompt
    logits: list[torch.Tensor]  # [len(prompt) + len(generated) - 1, vocab] per prompt
    last_logprobs: list[list[dict[int, float]]]


def hyprec_teacher_forced(llm: LLM, prompts: list[list[int]], max_tokens: int) -> Run:
    """Greedy-generate ``prompts`` together and return hyprec's logits at every position (see module docstring)."""
    engine = llm.engine
    steps: list[tuple[list[int], list[int], list[int], torch.Tensor]] = []

    def hook(module, args, out):
        input_ids, positions, meta = args
        steps.append((input_ids.tolist(), positions.tolist(), list(meta.queries.lens), out.detach().float().clone()))

    handle = engine.model.register_forward_hook(hook)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=1))
    finally:
        handle.remove()
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    seen_ids: list[list[int]] = [[] for _ in prompts]
    seen_pos: list[list[int]] = [[] for _ in prompts]
    for ids, pos, lens, hidden in steps:
        # Nothing finishes early (no EOS without a tokenizer) and the budget holds every prompt, so every step
        # carries one segment per sequence, in request order; the id/position checks below confirm it.
        assert len(lens) == len(prompts), f"step with {len(lens)} segments for {len(prompts)} prompts"
        start = 0
        for i, n in enumerate(lens):
            rows[i].append(hidden[start : start + n])
            seen_ids[i] += ids[start : start + n]
            seen_pos[i] += pos[start : start + n]
            start += n
    logits = []
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        full = p + out.outputs[0].token_ids
        assert seen_ids[i] == full[:-1], f"prompt {i}: recorded ids are not the sequence"
        assert seen_pos[i] == list(range(len(full) - 1))
        with torch.inference_mode():
            lg = engine.model.compute_logits(torch.cat(rows[i])).float()
        # The recorded logits are the ones the sampler used: greedy picks their argmax.
        assert lg[len(p) - 1 :].argmax(dim=1).tolist() == out.outputs[0].token_ids
        logits.append(lg)
    return Run([o.outputs[0].token_ids for o in outs], logits, [o.outputs[0].logprobs for o in outs])


@dataclass
class Built:
    case: Case
    path: Path
    hf: torch.nn.Module
    prompts: list[list[int]]
    _fp32: Run | None = None

    def llm(self, dtype: str = "float32", attn_dtype: str = "auto") -> LLM:
        return LLM(
            str(self.path),
            dtype=dtype,
            attn_dtype=attn_dtype,
            max_model_len=MAX_POS,
            num_kv_blocks=NUM_KV_BLOCKS,
        )

    def fp32(self) -> Run:
        if self._fp32 is None:
            llm = self.llm("float32")
            assert llm.policy.compute_dtype == torch.float32 and llm.policy.attn_dtype == torch.float32
            self._fp32 = hyprec_teacher_forced(llm, self.prompts, GEN_TOKENS)
        return self._fp32

    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_parity")
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            case = CASE_BY_NAME[name]
            hf = build_hf_decoder(case)
            path = root / name
            hf.save_pretrained(path)
            cache[name] = Built(case, path, hf, _prompts(len(name)))
        return cache[name]

    return get


NAMES = [c.name for c in CASES]


@pytest.mark.parametrize("name", NAMES)
def test_float32_logits_match_transformers_at_every_position(built, name):
    b = built(name)
    run = b.fp32()
    worst, scale, lp_worst = 0.0, 0.0, 0.0
    for p, gen, lg, lps in zip(b.prompts, run.token_ids, run.logits, run.last_logprobs, strict=True):
        ref = b.hf_logits((p + gen)[:-1])
        assert lg.shape == ref.shape == (len(p) + len(gen) - 1, VOCAB)
        worst = max(worst, (lg - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
        # The returned logprobs (logprobs=1: the chosen token, which is also the top one) are those of these logits.
        ref_lp = torch.log_softmax(ref[len(p) - 1 :], dim=1)
        for k, (tok, d) in enumerate(zip(gen, lps, strict=True)):
            assert list(d) == [tok]
            lp_worst = max(lp_worst, abs(d[tok] - ref_lp[k, tok].item()))
    tol = fp32_logits_tol(b.case.config, scale)
    print(f"{name}: fp32 logits max|diff| {worst:.2e} (max|logit| {scale:.2f}, tolerance {tol:.2e})")
    print(f"{name}: fp32 logprobs max|diff| {lp_worst:.2e} (tolerance {2 * tol:.2e})")
    assert worst <= tol, f"{name}: max |hyprec - transformers| logits = {worst:.3e} > {tol:.3e}"
    assert lp_worst <= 2 * tol


@pytest.mark.parametrize("name", NAMES)
def test_greedy_decode_matches_transformers_generate(built, name):
    b = built(name)
    run = b.fp32()
    for p, gen in zip(b.prompts, run.token_ids, strict=True):
        with torch.no_grad():
            ref = b.hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False,
                max_new_tokens=GEN_TOKENS,
                min_new_tokens=GEN_TOKENS,
            )[0, len(p) :].tolist()
        assert len(gen) == GEN_TOKENS
        assert gen == ref, f"{name}: prompt of {len(p)} tokens: hyprec {gen} != transformers {ref}"
    # The models are not degenerate: greedy decoding does not just repeat one token.
    for gen in run.token_ids:
        assert len(set(gen)) >= 2, f"{name}: greedy output collapsed to {sorted(set(gen))}"
    assert len({t for gen in run.token_ids for t in gen}) >= 12


@pytest.mark.parametrize("attn", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_hybrid_logits_finite_and_close_to_float32(built, name, attn):
    b = built(name)
    ref = b.fp32()
    llm = b.llm("hybrid", attn)
    assert llm.policy.compute_dtype == torch.float32
    assert llm.policy.attn_dtype == getattr(torch, attn)
    assert all(k.dtype == getattr(torch, attn) for k in llm.engine.kv_cache.keys)
    run = hyprec_teacher_forced(llm, b.prompts, 4)
    worst, scale = 0.0, 0.0
    for p, gen, lg, ref_gen, ref_lg in zip(
        b.prompts, run.token_ids, run.logits, ref.token_ids, ref.logits, strict=True
    ):
        assert torch.isfinite(lg).all()
        # Compare the positions whose inputs agree: the prompt, then the generated tokens up to the first that
        # differs (after a near-tie, half-precision attention may pick another token).
        same = next((i for i, (a, r) in enumerate(zip(gen, ref_gen[: len(gen)], strict=True)) if a != r), len(gen))
        n = len(p) + min(same, len(gen) - 1)
        worst = max(worst, (lg[:n] - ref_lg[:n]).abs().max().item())
        scale = max(scale, ref_lg.abs().max().item())
    tol = hybrid_logits_tol(b.case.config, attn, scale)
    print(f"{name}: hybrid-{attn} logits max|diff| {worst:.2e} (tolerance {tol:.2e})")
    assert worst <= tol
    assert worst > 0, "bit-identical to float32: attention did not run in half precision"


@pytest.mark.parametrize("name", NAMES)
def test_score_matches_transformers(built, name):
    """``LLMEngine.score`` (one teacher-forced prefill pass): argmax and next-token logprobs at every position."""
    b = built(name)
    llm = b.llm("float32")
    for p, gen in zip(b.prompts, b.fp32().token_ids, strict=True):
        ids = p + gen
        top, logprob, _ = llm.engine.score(ids)
        ref_logits = b.hf_logits(ids[:-1])
        ref = torch.log_softmax(ref_logits, dim=1)
        assert top.tolist() == ref.argmax(dim=1).tolist()
        expected = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        tol = 2 * fp32_logits_tol(b.case.config, ref_logits.abs().max().item())  # logprobs: see fp32_logits_tol
        assert (logprob - expected).abs().max().item() <= tol
