"""Llama-style decoders: Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm per head).

Pre-norm blocks, grouped-query attention with RoPE, SwiGLU MLP. Module and weight names mirror
``transformers.models.llama.modeling_llama`` (``model.layers.N.self_attn.q_proj`` ...). Hidden states are packed
``[num_tokens, hidden]`` across the sequences of a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.layers.activation import get_activation
from hyprec.layers.attention import Attention, AttentionMetadata
from hyprec.layers.linear import Linear, head_linear
from hyprec.layers.norm import RMSNorm
from hyprec.layers.quantized import StoredWeight
from hyprec.layers.rotary import RotaryEmbedding
from hyprec.models.base import AttentionInputs, DecoderModel, ResidualStream
from hyprec.models.decoder_config import layer_types, rope_parameters, sliding_window


@dataclass(frozen=True)
class DecoderVariant:
    """How one family differs from Llama."""

    qkv_bias: bool | None = None  # None: config.attention_bias
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + weight) norms
    activation_field: str = "hidden_act"


def head_dim(config: ModelConfig) -> int:
    return config.get("head_dim", None) or config.get("hidden_size") // config.get("num_attention_heads")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, variant: DecoderVariant, scale: float | None = None):
        super().__init__()
        hidden = config.get("hidden_size")
        self.num_heads = config.get("num_attention_heads")
        self.num_kv_heads = config.get("num_key_value_heads", self.num_heads)
        self.head_dim = head_dim(config)
        bias = variant.qkv_bias if variant.qkv_bias is not None else config.get("attention_bias", False)
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=config.get("attention_bias", False))
        if variant.qk_norm:
            eps = config.get("rms_norm_eps", 1e-6)
            self.q_norm = RMSNorm(self.head_dim, eps, variant.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, eps, variant.norm_offset)
        kind = layer_types(config)[layer_idx]
        self.rotary = RotaryEmbedding.shared(self.head_dim, *rope_parameters(config, kind))
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            scale,
            layer_idx=layer_idx,
            sliding_window=sliding_window(config, kind),
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, positions)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU for Llama, GeGLU for Gemma)."""

    def __init__(self, config: ModelConfig, variant: DecoderVariant):
        super().__init__()
        hidden, inter = config.get("hidden_size"), config.get("intermediate_size")
        bias = config.get("mlp_bias", False)
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)
        self.act = get_activation(config.get(variant.activation_field, "silu"), config.file)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, variant: DecoderVariant):
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, layer_idx, variant)
        self.mlp = LlamaMLP(config, variant)
        self.input_layernorm = RMSNorm(config.get("hidden_size"), eps, variant.norm_offset)
        self.post_attention_layernorm = RMSNorm(config.get("hidden_size"), eps, variant.norm_offset)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def residual_writers(self) -> list[nn.Module]:
        return [self.self_attn.o_proj, self.mlp.down_proj]

    def residual_readers(self) -> list[nn.Module]:
        return [self.input_layernorm, self.post_attention_layernorm]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, variant: DecoderVariant, layer_cls: type[nn.Module] = LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.get("vocab_size"), config.get("hidden_size"))
        self.layers = nn.ModuleList(layer_cls(config, i, variant) for i in range(config.get("num_hidden_layers")))
        self.norm = RMSNorm(config.get("hidden_size"), config.get("rms_norm_eps", 1e-6), variant.norm_offset)
        # Multiplies the embedding output: Gemma's sqrt(hidden), or a precision plan's power-of-two rescaling.
        self.embed_scale = 1.0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale == 1.0:
            return x
        # transformers multiplies by the scale cast to the embedding's dtype.
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, positions, meta)
        return self.norm(x)


class LlamaForCausalLM(DecoderModel):
    variant = DecoderVariant()
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = self.model_cls(config, self.variant)
        self.tied = bool(config.get("tie_word_embeddings", False))
        if self.tied:
            self.ignored_weights = (*self.ignored_weights, "lm_head.")
        else:
            self.lm_head = Linear(config.get("hidden_size"), config.get("vocab_size"), bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    @property
    def stored_head(self) -> StoredWeight | None:
        """The output head's weight as the checkpoint stores it, when the head (the embedding table when tied) was
        loaded that way; None: a float32 (or plan-cast) head."""
        return getattr(self.model.embed_tokens if self.tied else self.lm_head, "stored", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.stored_head is not None:
            return self.stored_head.linear(hidden.float(), invariant=self.batch_invariant)
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        # A precision plan may keep the head in another dtype than the last layer.
        return head_linear(hidden.to(weight.dtype), weight, invariant=self.batch_invariant).float()

    def edge_modules(self) -> list[nn.Module]:
        return [self.model.embed_tokens] + ([] if self.tied else [self.lm_head])

    def residual_stream(self) -> ResidualStream:
        layers = list(self.model.layers)
        return ResidualStream(
            embedding=self.model,
            table=None if self.tied else self.model.embed_tokens,
            writers=[m for layer in layers for m in layer.residual_writers()],
            readers=[m for layer in layers for m in layer.residual_readers()] + [self.model.norm],
        )

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def attention_inputs(self) -> Iterator[AttentionInputs]:
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            yield AttentionInputs(
                f"model.layers.{i}",
                layer.input_layernorm,
                [a.q_proj, a.k_proj, a.v_proj],
                head_dim=a.head_dim,
                qk_norms=(a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None,
                rotary=True,
            )


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window on every layer (``sliding_window`` in config.json)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    variant = DecoderVariant(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    variant = DecoderVariant(qk_norm=True)
