"""The generation engine's behaviour: continuous batching, preemption, chunked prefill, the KV cache's dtype and
sliding-window blocks, sampling end to end, input errors, and streaming.

Two small randomly initialised decoders are built with transformers' own classes and saved once per module: a
Llama (GQA 2:1, untied embeddings) and a Gemma 3 with one sliding-window layer and one full-attention layer. Their
numerical parity with transformers is tested in tests/models/test_decoder_parity.py; here the reference for every
scheduling variant is hyprec's own float32 greedy output for the request run alone in a roomy engine, which must
come out token for token identical however the scheduler slices, batches, evicts or recomputes the request.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import transformers

from hyprec import LLM, SamplingParams
from hyprec.engine.block_manager import RELEASED
from hyprec.errors import ConfigError, HyprecError, InputTypeError, InvalidInputError

VOCAB = 160
MAX_POS = 256
WINDOW = 8
BLOCK = 4


pytestmark = pytest.mark.usefixtures("single_thread")


def _common(**extra):
    return {
        "vocab_size": VOCAB,
        "hidden_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "max_position_embeddings": MAX_POS,
        "initializer_range": 0.15,  # spread-out logits: greedy decoding does not collapse to one token
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **extra,
    }


def _save(model: torch.nn.Module, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    with torch.no_grad():
        if model.config.tie_word_embeddings:
            model.get_input_embeddings().weight.mul_(0.3)  # else every token predicts itself (see parity tests)
        for name, p in model.named_parameters():
            if "norm" in name and model.config.model_type == "gemma3_text":
                p.copy_(torch.randn_like(p) * 0.5)  # Gemma norms start at 0 (gain 1 + w)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_common(tie_word_embeddings=False))
    return _save(transformers.LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("gen") / "llama", 1)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    config = transformers.Gemma3TextConfig(
        **_common(
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            tie_word_embeddings=True,
        )
    )
    return _save(transformers.Gemma3ForCausalLM(config).eval(), tmp_path_factory.mktemp("gen") / "gemma", 3)


def _llm(path: Path, **kw) -> LLM:
    opts = {"dtype": "float32", "max_model_len": 128, "num_kv_blocks": 64, "block_size": BLOCK, **kw}
    return LLM(str(path), **opts)


@pytest.fixture(scope="module")
def llama(llama_dir) -> LLM:
    return _llm(llama_dir)


@pytest.fixture(scope="module")
def gemma(gemma_dir) -> LLM:
    return _llm(gemma_dir)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def _alone(llm: LLM, prompt: list[int], max_tokens: int) -> list[int]:
    (out,) = llm.generate([prompt], greedy(max_tokens))
    assert out.finished and len(out.outputs[0].token_ids) == max_tokens
    return out.outputs[0].token_ids


def _drain(engine) -> dict[str, list[int]]:
    """Step the engine until idle; the generated tokens of every request that finished meanwhile."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def _assert_cache_empty(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.tables == {}
    assert engine.block_manager.num_free_blocks() == {n: g.num_blocks for n, g in engine.kv_cache.groups.items()}


# ---------------------------------------------------------------------------------------------------------------
# Scheduling: continuous batching, preemption, chunked prefill
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_request_joining_mid_decode_gets_the_same_greedy_output(request, model):
    llm = request.getfixturevalue(model)
    engine = llm.engine
    first, second = _prompt(19, 10), _prompt(11, 11)
    ref_first, ref_second = _alone(llm, first, 24), _alone(llm, second, 12)
    assert len(set(ref_first)) > 3 and len(set(ref_second)) > 3  # not a degenerate model

    a = engine.add_request(first, greedy(24))
    for _ in range(5):  # prefill + 4 decode steps
        (out,) = engine.step()
    assert out.request_id == a and len(out.outputs[0].token_ids) == 5 and not out.finished
    b = engine.add_request(second, greedy(12))
    outs = engine.step()  # b's prefill runs in the same forward pass as a's decode
    assert {o.request_id for o in outs} == {a, b}
    done = _drain(engine)
    assert done[a] == ref_first
    assert done[b] == ref_second
    _assert_cache_empty(llm)


def test_preemption_under_a_tiny_kv_budget_keeps_greedy_outputs(llama, llama_dir):
    prompts = [_prompt(n, 20 + n) for n in (26, 31, 22, 29)]
    max_tokens = 30
    refs = [_alone(llama, p, max_tokens) for p in prompts]
    # 17 blocks of 4 tokens: one more than a single 64-token context needs; the four requests want ~4 x 15.
    tight = _llm(llama_dir, max_model_len=64, num_kv_blocks=17)
    outs = tight.generate(prompts, greedy(max_tokens))
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    _assert_cache_empty(tight)


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_chunked_prefill_gives_the_same_output(request, model):
    llm = request.getfixturevalue(model)
    prompts = [_prompt(n, 30 + n) for n in (23, 17, 9)]
    refs = [_alone(llm, p, 10) for p in prompts]
    chunked = _llm(request.getfixturevalue(f"{model}_dir"), max_num_batched_tokens=7, max_num_seqs=4)
    engine = chunked.engine
    rid = engine.add_request(prompts[0], greedy(10))
    steps = 0
    while not (outs := engine.step()) or not outs[0].outputs[0].token_ids:
        steps += 1
    assert steps == 3, "a 23-token prompt under a 7-token budget prefills in 4 steps"
    rest = [engine.add_request(p, greedy(10)) for p in prompts[1:]]
    done = _drain(engine)
    assert [done[r] for r in [rid, *rest]] == refs
    _assert_cache_empty(chunked)


# ---------------------------------------------------------------------------------------------------------------
# The KV cache: storage dtype and sliding-window blocks
# ---------------------------------------------------------------------------------------------------------------


def test_fp16_kv_cache_halves_the_bytes_and_stores_float16(llama_dir):
    fp32, fp16 = _llm(llama_dir), _llm(llama_dir, kv_cache_dtype="float16")
    assert fp16.policy.attn_dtype == torch.float32 and fp16.policy.kv_cache_dtype == torch.float16
    k32, k16 = fp32.engine.kv_cache, fp16.engine.kv_cache
    assert all(k.dtype == torch.float32 and k.element_size() == 4 for k in k32.keys + k32.values)
    assert all(k.dtype == torch.float16 and k.element_size() == 2 for k in k16.keys + k16.values)
    assert [k.shape for k in k16.keys] == [k.shape for k in k32.keys]
    assert k16.nbytes * 2 == k32.nbytes == sum(t.nbytes for t in k32.keys + k32.values)
    assert k16.bytes_per_token() * 2 == k32.bytes_per_token() == 2 * 2 * 2 * 12 * 4  # layers * (k, v) * kv * hd * 4
    assert fp16.info()["kv_cache_bytes"] * 2 == fp32.info()["kv_cache_bytes"]

    prompt = _prompt(21, 40)
    out32, out16 = (m.generate([prompt], greedy(8, logprobs=2))[0].outputs[0] for m in (fp32, fp16))
    # After the run the cache still holds float16 tensors, filled with the keys/values written during it; layer 0's
    # keys do not depend on the cache, so they are exactly the float32 engine's keys rounded to float16.
    assert all(k.dtype == torch.float16 for k in k16.keys + k16.values)
    assert k16.keys[0].abs().sum() > 0
    assert torch.equal(k16.keys[0], k32.keys[0].half())
    assert torch.equal(k16.values[0], k32.values[0].half())
    assert all(torch.isfinite(k.float()).all() for k in k16.keys + k16.values)
    lp32 = torch.tensor([d[t] for d, t in zip(out32.logprobs, out32.token_ids, strict=True)])
    lp16 = torch.tensor([d[t] for d, t in zip(out16.logprobs, out16.token_ids, strict=True)])
    assert out16.token_ids[:2] == out32.token_ids[:2]
    # Keys and values rounded to float16 (relative u = 2^-11) move each layer's attention output by about 4 u of
    # its scale (three roundings into the scores and values, one more in the output's reach); each of the 2
    # layers adds that to the residual stream, x2 for the MLP and norms, so logits move by 2 * 2 * 4u * max|logit|
    # and log-probabilities by twice that (log-softmax subtracts a log-sum-exp).
    max_logit = max(x.abs().max().item() for _, x in fp32.engine.logits(prompt + out32.token_ids[:2]))
    assert torch.allclose(lp16[:2], lp32[:2], rtol=0, atol=2 * (2 * 2 * 4 * 2**-11) * max_logit)


def test_hybrid_fp16_policy_caches_in_float16(llama_dir):
    llm = _llm(llama_dir, dtype="hybrid", attn_dtype="float16")
    assert llm.policy.kv_cache_dtype == torch.float16
    assert all(k.dtype == torch.float16 for k in llm.engine.kv_cache.keys + llm.engine.kv_cache.values)
    assert llm.info()["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 12 * 2
    out = llm.generate([_prompt(12, 41)], greedy(4))[0].outputs[0]
    assert len(out.token_ids) == 4


def test_sliding_window_layers_keep_only_their_window(gemma_dir):
    llm = _llm(gemma_dir, max_num_batched_tokens=16, max_num_seqs=4)
    engine = llm.engine
    groups = engine.kv_cache.groups
    sliding, full = f"sliding-{WINDOW}", "full"
    assert set(groups) == {sliding, full}
    assert groups[sliding].window == WINDOW and groups[full].window is None
    # The sliding pool is capped at max_num_seqs x (window + one step's tokens): smaller than the full one.
    assert groups[sliding].num_blocks < groups[full].num_blocks == 64
    sliding_layer, full_layer = groups[sliding].layers[0], groups[full].layers[0]
    assert engine.kv_cache.keys[sliding_layer].shape[0] == groups[sliding].num_blocks * BLOCK
    assert engine.kv_cache.keys[sliding_layer].shape[0] < engine.kv_cache.keys[full_layer].shape[0]
    assert llm.info()["kv_cache_groups"] == {sliding: (WINDOW, groups[sliding].num_blocks), full: (None, 64)}

    prompt = _prompt(13, 50)
    rid = engine.add_request(prompt, greedy(30))
    (seq,) = engine.requests[rid].seqs
    for _ in range(20):  # prefill 13 tokens (one step under the 16-token budget), then 19 decode steps
        engine.step()
    assert seq.num_computed_tokens == 32 and not seq.finished
    tables = engine.block_manager.tables[seq.seq_id]
    # The full group holds every computed position: blocks 0-7.
    assert len(tables[full]) == 8 and RELEASED not in tables[full]
    # The last query (position 31) saw keys 24-31 only, so blocks 0-5 (positions 0-23) went back to the pool.
    assert tables[sliding][:6] == [RELEASED] * 6
    live = tables[sliding][6:]
    assert len(live) == 2 and RELEASED not in live
    free = engine.block_manager.num_free_blocks()
    assert free[sliding] == groups[sliding].num_blocks - 2
    assert free[full] == 64 - 8
    done = _drain(engine)
    _assert_cache_empty(llm)
    # Releasing blocks changed nothing: the same tokens as an engine with a roomy budget.
    roomy = _llm(gemma_dir)
    assert done[rid] == _alone(roomy, prompt, 30)


# ---------------------------------------------------------------------------------------------------------------
# Sampling end to end
# ---------------------------------------------------------------------------------------------------------------


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def test_seeded_sampling_is_reproducible_and_independent_of_batch_neighbours(llama):
    prompt = _prompt(15, 60)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    (alone,) = _tokens(llama.generate([prompt], seeded))
    assert _tokens(llama.generate([prompt], seeded)) == [alone]
    neighbours = [
        (_prompt(30, 61), SamplingParams(temperature=0.8, max_tokens=20)),  # unseeded: the global generator
        (_prompt(7, 62), SamplingParams(temperature=1.2, seed=99, max_tokens=5)),
    ]
    batch = [neighbours[0], (prompt, seeded), neighbours[1]]
    outs = llama.generate([p for p, _ in batch], [sp for _, sp in batch])
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=4321, max_tokens=12)
    assert _tokens(llama.generate([prompt], other_seed)) != [alone]
    greedy_ref = _alone(llama, prompt, 12)
    assert alone != greedy_ref  # temperature 1 really samples


def test_n_returns_n_distinct_completions(llama):
    (out,) = llama.generate([_prompt(10, 70)], SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10))
    assert [c.index for c in out.outputs] == [0, 1]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    (again,) = llama.generate([_prompt(10, 70)], SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10))
    assert _tokens([again]) == _tokens([out])


def test_stop_token_ids_and_max_tokens(llama):
    prompt = _prompt(14, 80)
    ref = _alone(llama, prompt, 16)
    # A stop token that first appears at position k >= 1 of the greedy output.
    k = next(i for i, t in enumerate(ref) if i >= 2 and t not in ref[:i])
    (out,) = llama.generate([prompt], greedy(16, stop_token_ids=[ref[k]]))
    c = out.outputs[0]
    assert c.token_ids == ref[: k + 1]  # the stop token is included
    assert c.finish_reason == "stop" and c.stop_reason == ref[k]
    (out,) = llama.generate([prompt], greedy(5))
    assert out.outputs[0].token_ids == ref[:5]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None


def test_logprobs_hold_the_chosen_token_and_the_top_k(llama):
    prompt = _prompt(12, 90)
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=8, logprobs=3)
    (out,) = llama.generate([prompt], sampled)
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 8
    for tok, d in zip(c.token_ids, c.logprobs, strict=True):
        assert tok in d and len(d) in (3, 4)  # top 3, plus the chosen token when it is not among them
        assert all(v <= 0 for v in d.values())
        top3 = sorted(d.values(), reverse=True)[:3]
        assert d[tok] <= top3[0]
        assert sum(torch.tensor(top3).exp()) <= 1 + 1e-6
    assert c.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(c.token_ids, c.logprobs, strict=True)))
    # Greedy: the chosen token is the most likely one; logprobs=0 returns only the chosen token.
    (g,) = llama.generate([prompt], greedy(6, logprobs=5))
    for tok, d in zip(g.outputs[0].token_ids, g.outputs[0].logprobs, strict=True):
        assert len(d) == 5 and max(d, key=d.get) == tok
    (z,) = llama.generate([prompt], greedy(6, logprobs=0))
    assert [list(d) for d in z.outputs[0].logprobs] == [[t] for t in z.outputs[0].token_ids]
    (n,) = llama.generate([prompt], greedy(6))
    assert n.outputs[0].logprobs is None


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_window_is_refused(llama):
    limit = llama.engine.max_model_len
    assert limit == 128 and llama.info()["max_model_len"] == 128
    for n in (limit, limit + 5):
        with pytest.raises(InvalidInputError, match="max_model_len=128"):
            llama.generate([_prompt(n, 100)], greedy(4))
    # One token short of the window: exactly one token fits, then the context window ends it.
    (out,) = llama.generate([_prompt(limit - 1, 101)], greedy(10))
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    _assert_cache_empty(llama)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": -0.5}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("max_tokens", {"max_tokens": 0}),
        ("n", {"n": 0}),
        ("logprobs", {"logprobs": 21}),
    ],
)
def test_invalid_sampling_values_name_the_field(field, kwargs):
    with pytest.raises(InvalidInputError, match=rf"^{field}="):
        SamplingParams(**kwargs)


def test_generate_on_an_embedding_model_is_refused(minilm_hybrid):
    assert not minilm_hybrid.is_generative
    with pytest.raises(InvalidInputError, match="embedding model"):
        minilm_hybrid.generate([[1, 2, 3]], greedy(2))
    with pytest.raises(InvalidInputError, match="embedding model"):
        next(iter(minilm_hybrid.stream([1, 2, 3], greedy(2))))


def test_bad_token_ids_are_refused(llama):
    for bad in ([VOCAB], [3, -1], [1, VOCAB + 100, 2]):
        with pytest.raises(InvalidInputError, match=rf"\[0, {VOCAB}\)"):
            llama.generate([bad], greedy(2))
    with pytest.raises(InvalidInputError, match="empty"):
        llama.engine.add_request([], greedy(2))
    with pytest.raises(InputTypeError):
        llama.generate([[1, 2.0, 3]], greedy(2))
    with pytest.raises(InputTypeError):
        llama.generate([[True, 2]], greedy(2))
    _assert_cache_empty(llama)


def test_a_bad_prompt_in_a_batch_queues_nothing(llama):
    with pytest.raises(InvalidInputError, match=r"prompts\[1\]"):
        llama.generate([_prompt(5, 110), [VOCAB]], greedy(3))
    try:
        assert not llama.engine.has_unfinished() and not llama.engine.requests
    finally:
        for rid in list(llama.engine.requests):
            llama.engine.abort(rid)


def test_decoder_embed_of_a_long_text_leaves_the_engine_usable(gemma_dir):
    llm = _llm(gemma_dir, max_num_batched_tokens=16, max_num_seqs=1)
    with contextlib.suppress(HyprecError):
        llm.engine.embed_ids([_prompt(60, 130)])  # either embeds it or refuses it with a clear error
    _assert_cache_empty(llm)
    assert len(llm.generate([_prompt(20, 131)], greedy(3))[0].outputs[0].token_ids) == 3


def test_kv_cache_smaller_than_one_context_is_a_config_error(llama_dir):
    with pytest.raises(ConfigError, match="max_model_len=64"):
        _llm(llama_dir, max_model_len=64, num_kv_blocks=15)


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


def test_stream_yields_growing_outputs_and_ends_finished(llama):
    prompt = _prompt(16, 120)
    ref = _alone(llama, prompt, 9)
    states = list(llama.stream(prompt, greedy(9)))
    assert [len(s.outputs[0].token_ids) for s in states] == list(range(1, 10))
    assert all(s.outputs[0].token_ids == ref[: i + 1] for i, s in enumerate(states))
    assert [s.finished for s in states] == [False] * 8 + [True]
    assert states[-1].outputs[0].finish_reason == "length"
    assert len({s.request_id for s in states}) == 1
    _assert_cache_empty(llama)
    # Leaving the loop early aborts the request and frees its blocks.
    stream = llama.stream(prompt, greedy(9))
    next(stream)
    next(stream)
    stream.close()
    _assert_cache_empty(llama)
