"""A zoo of small models that fail in half precision in known ways, next to clean ones.

Each entry is built with transformers' own classes (random init, fixed seed), saved, and then has specific weights
scaled so that one known failure appears; ``expected`` says which policies must be flagged and for what.
Used by the tests of ``hyprec check`` (and later the runtime guard and repair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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


def _bert(path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    BertModel(cfg).eval().save_pretrained(path)


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
    ZooModel("clean-llama", clean_llama, dict.fromkeys(("float16", "bfloat16", "hybrid-fp16", "hybrid-bf16"), SAFE)),
    ZooModel("clean-bert", clean_bert, dict.fromkeys(("float16", "bfloat16", "hybrid-fp16", "hybrid-bf16"), SAFE)),
]
