"""Shared test helpers, imported as ``tests.helpers`` (fixtures live in the conftest files).

* Comparisons and model directories: :func:`assert_same_rows`, :func:`model_copy`.
* The zoo: small models that fail in half precision in known ways, next to clean ones (:data:`ZOO`).
* A checkpoint the fp16 training study trains, with held-out token ids (:func:`study_decoder`).
* Decoder-parity cases: small random decoders of every supported family (:data:`DECODER_CASES`).
* A tiny Llama with a word-level tokenizer and a Jinja chat template (:func:`tiny_chat_llama`).
* A tiny cross-encoder or classifier with the MiniLM tokenizer (:func:`tiny_cross_encoder`).
* Tiny synthetic GGUF files (:func:`write_gguf`; needs the gguf extra).
* ``hyprec serve`` in a subprocess (:func:`running_server`, :func:`free_port`; also used by the load test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import load_file, save_file

try:  # the gguf extra: only the GGUF builders need it
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, RopeScalingType, TokenType
    from gguf.quants import dequantize, quantize
except ImportError:
    GGUFWriter = RopeScalingType = TokenType = Q = dequantize = quantize = None


# -- comparisons and model directories ---------------------------------------------------------------------------


def model_copy(src: Path, dst: Path, replace: tuple[str, ...] = ()) -> Path:
    """``dst`` holding a symlink to each entry of ``src`` except those named in ``replace``."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name not in replace:
            os.symlink(entry, dst / entry.name)
    return dst


def assert_same_rows(a: np.ndarray, b: np.ndarray) -> None:
    """Row by row: max abs diff <= 1e-5 or cosine >= 1 - 1e-6.

    For embeddings of the same inputs computed in different batches (or processes) under float16 attention: the
    float32 parts differ in their last bits (summation order), which can flip the rounding of float16 attention
    values by one unit (2^-11 relative). For unit vectors 1 - cos = |a - b|^2 / 2, so cos >= 1 - 1e-6 allows
    |a - b| <= 1.4e-3, about three such units; 1e-5 absolute admits the rows whose difference is pure float32
    noise (~100 float32 units of their |x| <= 1 values)."""
    assert a.shape == b.shape
    diff = np.abs(a - b).max(axis=1)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    bad = [i for i in range(len(a)) if not (diff[i] <= 1e-5 or cos[i] >= 1 - 1e-6)]
    assert not bad, f"rows {bad} differ: max abs {diff[bad]}, cosine {cos[bad]}"


# -- the zoo -------------------------------------------------------------------------------------------------------
# Each entry is built with transformers' own classes (random init, fixed seed), saved, and then has specific weights
# scaled so that one known failure appears; ``expected`` says which policies must be flagged and for what. Used by
# the tests of ``hyprec check``, the runtime guard, repair, emulation and the server.


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[Path], None]
    # policy -> (verdict, quantity that must be blamed or None)
    expected: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def _llama(path: Path, **overrides) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval().save_pretrained(path)


def _bert(path: Path, model: str = "BertModel", seed: int = 0, **overrides) -> None:
    """A random BERT (transformers class ``model``) saved in ``path``: a tiny shape, or one changed by ``overrides``."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    getattr(transformers, model)(transformers.BertConfig(**{**cfg, **overrides})).eval().save_pretrained(path)


def _scale(path: Path, scales: dict[str, float]) -> None:
    """Multiply named weights of the saved checkpoint (the failure is in the weights, as in real models)."""
    state = load_file(str(path / "model.safetensors"))
    for name, factor in scales.items():
        state[name] = state[name] * factor
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def massive_residual(path: Path) -> None:
    # Gemma-like: a huge embedding scale grows the pre-norm residual stream past 65504; norms hide it from q/k/v.
    _llama(path)
    _scale(path, {"model.embed_tokens.weight": 3e6})


def late_ffn_overflow(path: Path) -> None:
    # T5 / Llama down_proj style: the last layer's gated FFN intermediate exceeds 65504.
    _llama(path)
    _scale(path, {"model.layers.3.mlp.gate_proj.weight": 1000.0, "model.layers.3.mlp.up_proj.weight": 1000.0})


def huge_norm_gain(path: Path) -> None:
    # A norm gain of 1e6 feeding attention: q/k/v themselves overflow float16, so even hybrid-fp16 fails.
    _llama(path)
    _scale(path, {"model.layers.1.input_layernorm.weight": 1e6})


def large_logits(path: Path) -> None:
    # q and k stay far below 65504, but q.k reaches ~5e3: rounding q/k to half shifts logits by whole units.
    _llama(path)
    _scale(path, {"model.layers.2.self_attn.q_proj.weight": 200.0, "model.layers.2.self_attn.k_proj.weight": 200.0})


def first_block_outlier(path: Path) -> None:
    # The fp16 training study's high-learning-rate shape (docs/fp16-study.md, run decoder-lr-3e-2): the first block
    # writes an outlier of ~2e4 into the residual stream and later layers carry it; within 8x of 65504, not beyond.
    _llama(path)
    _scale(path, {"model.layers.0.mlp.down_proj.weight": 2e6})


def clean_llama(path: Path) -> None:
    _llama(path)


def clean_bert(path: Path) -> None:
    _bert(path)


SAFE = ("safe", None)
ZOO = [
    ZooModel(
        "massive-residual",
        massive_residual,
        {"float16": ("fails", "residual"), "hybrid-fp16": SAFE, "hybrid-bf16": SAFE, "bfloat16": SAFE},
    ),
    ZooModel(
        "late-ffn-overflow", late_ffn_overflow, {"float16": ("fails", "ffn"), "hybrid-fp16": SAFE, "hybrid-bf16": SAFE}
    ),
    ZooModel(
        "huge-norm-gain",
        huge_norm_gain,
        # bfloat16 has the range, but logits of ~1e11 lose whole units to q/k rounding.
        {"float16": ("fails", None), "hybrid-fp16": ("fails", None), "hybrid-bf16": ("at-risk", "logits")},
    ),
    ZooModel(
        "large-logits", large_logits, {"hybrid-fp16": ("at-risk", "logits"), "hybrid-bf16": ("at-risk", "logits")}
    ),
    ZooModel(
        "first-block-outlier",
        first_block_outlier,
        {"float16": ("at-risk", "residual"), "bfloat16": SAFE, "hybrid-fp16": SAFE, "hybrid-bf16": SAFE},
    ),
    ZooModel("clean-llama", clean_llama, dict.fromkeys(("float16", "bfloat16", "hybrid-fp16", "hybrid-bf16"), SAFE)),
    ZooModel("clean-bert", clean_bert, dict.fromkeys(("float16", "bfloat16", "hybrid-fp16", "hybrid-bf16"), SAFE)),
]


def study_decoder(directory: Path) -> tuple[Path, list[list[int]]]:
    """The last checkpoint of the fp16 training study's ``--quick`` decoder run (``studies/fp16_training``): a Llama
    trained a few steps on real text with its own tokenizer, saved in ``directory``; and held-out calibration token
    ids that fit its positions."""
    from studies.fp16_training.corpus import study_texts, token_stream, train_tokenizer
    from studies.fp16_training.grid import quick_grid
    from studies.fp16_training.train import train

    cfg = quick_grid()[0]
    texts = study_texts()
    tok = train_tokenizer(cfg.kind, texts.train, cfg.vocab)
    saved: list[Path] = []
    train(cfg, token_stream(tok, texts.train), tok, directory, lambda _step, path, _loss: saved.append(path))
    ids = [enc.ids[: cfg.seq_len] for enc in tok.encode_batch(texts.held_out[:4])]
    return saved[-1], ids


# -- decoder-parity cases ------------------------------------------------------------------------------------------
# Small randomly initialised decoders built with transformers' own classes (tests/models/test_decoder_parity.py
# explains the shapes they cover); the repair tests reuse them.

DECODER_VOCAB = 160
DECODER_MAX_POS = 128


@dataclass(frozen=True)
class DecoderCase:
    name: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)


_DECODER_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def _decoder_cfg(hidden: int, heads: int, kv_heads: int, layers: int, inter: int, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": DECODER_VOCAB,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "max_position_embeddings": DECODER_MAX_POS,
        # Much larger than the default 0.02: peaked attention and spread-out logits, so a wrong mask, window or
        # position moves the logits far beyond the tolerance and greedy decoding does not collapse to one token.
        "initializer_range": 0.15,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        **extra,
    }


_LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
_SLIDING, _FULL = "sliding_attention", "full_attention"

# _decoder_cfg(hidden, heads, kv_heads, layers, intermediate, ...): GQA 4:1, 2:1 and 1:1; head_dim 12, 16, 20 (Qwen3's
# 12 and Gemma's 20 differ from hidden / heads); tied and untied; 1-3 layers; windows 5-7, shorter than every prompt.
DECODER_CASES = [
    DecoderCase(
        "llama-gqa4-hd12-untied-2l-linear-rope", "llama", _decoder_cfg(48, 4, 1, 2, 96, rope_parameters=_LINEAR_ROPE)
    ),
    DecoderCase("llama-mha-hd20-tied-1l", "llama", _decoder_cfg(40, 2, 2, 1, 64, tie_word_embeddings=True)),
    DecoderCase("mistral-gqa2-hd16-sw7-3l", "mistral", _decoder_cfg(64, 4, 2, 3, 96, head_dim=16, sliding_window=7)),
    DecoderCase("qwen2-gqa2-hd20-bias-tied-2l", "qwen2", _decoder_cfg(80, 4, 2, 2, 96, tie_word_embeddings=True)),
    DecoderCase(
        "qwen3-gqa4-hd12-untied-2l-theta5k", "qwen3", _decoder_cfg(40, 4, 1, 2, 80, head_dim=12, rope_theta=5000.0)
    ),
    DecoderCase(
        "qwen3-gqa2-hd20-sw6-mixed-2l",
        "qwen3",
        _decoder_cfg(40, 2, 1, 2, 64, head_dim=20, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    DecoderCase(
        "gemma3-gqa2-hd12-sw6-3l-softcap-tied",
        "gemma3",
        _decoder_cfg(48, 4, 2, 3, 96, head_dim=12, sliding_window=6, layer_types=[_SLIDING, _FULL, _SLIDING])
        | {"query_pre_attn_scalar": 20, "final_logit_softcapping": 2.0, "tie_word_embeddings": True},
    ),
    DecoderCase(
        "gemma3-mha-hd20-sw5-2l-untied",
        "gemma3",
        _decoder_cfg(
            48, 3, 3, 2, 64, head_dim=20, sliding_window=5, layer_types=[_FULL, _SLIDING], query_pre_attn_scalar=32
        ),
    ),
]
DECODER_CASE_BY_NAME = {c.name: c for c in DECODER_CASES}


def build_hf_decoder(case: DecoderCase) -> torch.nn.Module:
    """transformers' float32 model of ``case``, randomly initialised with a seed of its name."""
    import transformers

    conf_cls, model_cls = (getattr(transformers, n) for n in _DECODER_CLASSES[case.family])
    config = conf_cls(**case.config)
    torch.manual_seed(sum(map(ord, case.name)))
    model = model_cls(config).float().eval()
    if model.config.tie_word_embeddings:
        # With tied embeddings the logit of the input token contains |e|^2, so a large table makes every token
        # predict itself and greedy decoding repeats one token; a smaller table keeps the outputs varied.
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(0.3)
    if case.family == "gemma3":
        # transformers initialises Gemma norms to 0 (gain 1 + 0): randomise them so (1 + w) vs w matters.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.randn_like(p) * 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model


# -- a tiny chat Llama ---------------------------------------------------------------------------------------------

CHAT_WORDS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "[UNK]"] + [f"w{i}" for i in range(90)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_chat_llama(d: Path) -> Path:
    """A tiny random Llama in ``d`` with a real word-level tokenizer (:data:`CHAT_WORDS`) and a Jinja chat template
    (:data:`CHAT_TEMPLATE`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(CHAT_WORDS),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    return d


# -- a tiny cross-encoder ------------------------------------------------------------------------------------------


#: A query and documents for reranking tests (the CLI's and the server's).
RERANK_QUERY = "How do I read a file in Python?"
RERANK_DOCUMENTS = [
    "Use open() with a context manager to read the file's contents.",
    "A prime number has exactly two divisors: one and itself.",
    "The weather in spring is mild and often rainy.",
    "Python's pathlib offers read_text() for small files.",
]


def tiny_cross_encoder(path: Path, labels: int = 1, seed: int = 0, positions: int = 512) -> Path:
    """A tiny random BERT sequence classifier in ``path`` with ``labels`` labels (one: a cross-encoder that scores
    text pairs; more: a classifier), saved by transformers with the all-MiniLM-L6-v2 tokenizer: a real vocabulary,
    so real text gets real tokens. ``positions``: 512, the tokenizer's model_max_length, so a long text truncates
    and never overruns (sentence-transformers' CrossEncoder reads it); fewer make over-long inputs easy to write."""
    from hyprec.model_sources import resolve_model

    _bert(
        path,
        "BertForSequenceClassification",
        seed,
        vocab_size=30522,
        num_hidden_layers=2,
        max_position_embeddings=positions,
        type_vocab_size=2,  # the BERT tokenizer marks the second text of a pair with segment 1
        initializer_range=0.08,  # wider than the default 0.02, so scores spread and an error cannot hide
        num_labels=labels,
    )
    tokenizer_dir = resolve_model("minilm")
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / file, path / file)
    return path


# -- tiny GGUF files (the gguf extra) ------------------------------------------------------------------------------

GGUF_HIDDEN, GGUF_HEADS, GGUF_KV_HEADS, GGUF_HEAD_DIM, GGUF_FFN, GGUF_LAYERS = 64, 4, 2, 16, 128, 2
GGUF_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's vocabulary
GGUF_VOCAB = [*GGUF_SPECIALS, "▁", *"abcdefghijklmnopqrstuvwxyz", "▁a", "ab", "▁ab", "cd", "▁cd", "abcd", "▁abcd", "e▁"]

# llama.cpp's names for the HF modules (gguf's docs/gguf.md); the post-attention norm differs per family.
GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Storage type (a GGMLQuantizationType name) per projection: covers every type gguf can write, q quantized and k exact
# (both permuted).
GGUF_LINEAR_TYPES = {
    "self_attn.q_proj": "Q8_0",
    "self_attn.k_proj": "F32",
    "self_attn.v_proj": "Q4_0",
    "self_attn.o_proj": "Q5_0",
    "mlp.gate_proj": "BF16",
    "mlp.up_proj": "Q4_1",
    "mlp.down_proj": "Q5_1",
}


def hf_weights(arch: str, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout weights of a 2-layer decoder of the given family."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch in ("qwen3", "gemma3"):
        norms += ["self_attn.q_norm", "self_attn.k_norm"]
    if arch == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    shapes = {
        "self_attn.q_proj": (GGUF_HEADS * GGUF_HEAD_DIM, GGUF_HIDDEN),
        "self_attn.k_proj": (GGUF_KV_HEADS * GGUF_HEAD_DIM, GGUF_HIDDEN),
        "self_attn.v_proj": (GGUF_KV_HEADS * GGUF_HEAD_DIM, GGUF_HIDDEN),
        "self_attn.o_proj": (GGUF_HIDDEN, GGUF_HEADS * GGUF_HEAD_DIM),
        "mlp.gate_proj": (GGUF_FFN, GGUF_HIDDEN),
        "mlp.up_proj": (GGUF_FFN, GGUF_HIDDEN),
        "mlp.down_proj": (GGUF_HIDDEN, GGUF_FFN),
    }
    out = {
        "model.embed_tokens.weight": rand(len(GGUF_VOCAB), GGUF_HIDDEN),
        "model.norm.weight": 0.1 * rand(GGUF_HIDDEN),
    }
    if not tied:
        out["lm_head.weight"] = rand(len(GGUF_VOCAB), GGUF_HIDDEN)
    for i in range(GGUF_LAYERS):
        for norm in norms:
            out[f"model.layers.{i}.{norm}.weight"] = 0.1 * rand(GGUF_HEAD_DIM if "_norm" in norm else GGUF_HIDDEN)
        for module, shape in shapes.items():
            out[f"model.layers.{i}.{module}.weight"] = rand(*shape)
    return out


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's two rotary halves."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(arch: str, hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module = rest.removesuffix(".weight")
    if module == "post_attention_layernorm":  # Llama's pre-GGUF_FFN norm; Gemma's norm after attention
        short = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    else:
        short = GGUF_NAMES[module]
    return f"blk.{layer}.{short}.weight"


def to_gguf(arch: str, hf: str, w: np.ndarray) -> np.ndarray:
    """The rewrite convert_hf_to_gguf.py applies to one tensor."""
    if arch == "llama" and ".q_proj." in hf:
        return llama_permute(w, GGUF_HEADS)
    if arch == "llama" and ".k_proj." in hf:
        return llama_permute(w, GGUF_KV_HEADS)
    if arch == "gemma3" and hf.endswith("norm.weight"):
        return w + 1
    return w


def storage_type(hf: str) -> Q:
    if hf == "model.embed_tokens.weight":
        return Q.F16
    if hf == "lm_head.weight":
        return Q.Q8_0
    module = hf.split(".", 3)[-1].removesuffix(".weight")
    return Q[GGUF_LINEAR_TYPES.get(module, "F32")]  # norms stay F32, as llama.cpp keeps every 1-D tensor


def add_gguf_tensor(writer: GGUFWriter, name: str, w: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, w)
    elif qtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)


def stored_values(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What survives storing ``w`` as ``qtype`` (row permutations commute with this: blocks run along rows)."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(quantize(w, qtype), qtype)


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    tied: bool = False,
    name: str = "tiny",
    weights: dict[str, np.ndarray] | None = None,
    extra: dict[str, tuple[np.ndarray, Q]] | None = None,
    chat_template: str | None = None,
    rope_scaling: float | None = None,
    file_type: int | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny model of family ``arch`` to ``path``; return its HF-layout weights."""
    weights = hf_weights(arch, tied=tied) if weights is None else weights
    w = GGUFWriter(str(path), arch)
    if file_type is not None:
        w.add_file_type(file_type)  # what llama.cpp's quantizer records (general.file_type)
    w.add_name(name)
    w.add_block_count(GGUF_LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(GGUF_HIDDEN)
    w.add_feed_forward_length(GGUF_FFN)
    w.add_head_count(GGUF_HEADS)
    w.add_head_count_kv(GGUF_KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(GGUF_HEAD_DIM)
    else:
        w.add_key_length(GGUF_HEAD_DIM)
        w.add_value_length(GGUF_HEAD_DIM)
    if arch == "gemma3":
        w.add_sliding_window(16)
    if rope_scaling is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling)
    w.add_tokenizer_model("llama")
    w.add_token_list(GGUF_VOCAB)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(GGUF_VOCAB) - 4)])
    w.add_token_types([TokenType.CONTROL] * 3 + [TokenType.UNKNOWN] + [TokenType.NORMAL] * (len(GGUF_VOCAB) - 4))
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for hf, value in weights.items():
        add_gguf_tensor(w, gguf_name(arch, hf), to_gguf(arch, hf, value), storage_type(hf))
    for gguf_tensor, (value, qtype) in (extra or {}).items():
        add_gguf_tensor(w, gguf_tensor, value, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


# -- ``hyprec serve`` in a subprocess ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, startup_timeout: float = 180.0) -> Iterator[str]:
    """``hyprec serve ARGS`` on a free loopback port; yields its base URL and stops it afterwards.

    Readiness is polled (``/health``) until a deadline; between polls the wait is on the process itself, so a
    server that dies is reported at once with its output. The output goes to a temporary file, not a pipe: a
    pipe nobody reads fills up and blocks a chatty server mid-request.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "hyprec.entrypoints.cli", "-q", "serve", *args, "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+t") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

        def output() -> str:
            log.seek(0)
            return log.read()

        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /health within {startup_timeout} s:\n{output()}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)  # poll interval, cut short if the server exits
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{output()}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
