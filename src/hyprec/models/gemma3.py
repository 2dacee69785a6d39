"""Gemma 3 text decoder (``Gemma3ForCausalLM``).

Differences from Llama, all mirrored from ``transformers.models.gemma3.modeling_gemma3``: RMSNorms scale by
``1 + weight``; norms both before and after attention and MLP; q/k RMSNorm per head; interleaved local
(sliding-window) and global layers with their own RoPE bases; the embedding is multiplied by ``sqrt(hidden)``;
GeGLU MLP; softmax scale ``query_pre_attn_scalar ** -0.5``; tied embeddings; optional final logit soft-capping.

The residual stream of Gemma-3-270M reaches ~1e5, beyond float16's 65504: whole-model float16 turns every logit
into NaN, while hybrid precision keeps this stream in float32 and only q/k/v (which stay small) in half.
"""

from __future__ import annotations

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.errors import UnsupportedArchitectureError
from hyprec.layers.attention import AttentionMetadata
from hyprec.layers.norm import RMSNorm
from hyprec.models.llama import DecoderVariant, LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel

GEMMA = DecoderVariant(qk_norm=True, norm_offset=1.0, activation_field="hidden_activation")


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, variant: DecoderVariant):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        scale = config.get("query_pre_attn_scalar") ** -0.5
        self.self_attn = LlamaAttention(config, layer_idx, variant, scale=scale)
        self.mlp = LlamaMLP(config, variant)
        self.input_layernorm = RMSNorm(hidden, eps, variant.norm_offset)
        self.post_attention_layernorm = RMSNorm(hidden, eps, variant.norm_offset)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, variant.norm_offset)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, variant.norm_offset)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def residual_writers(self) -> list[nn.Module]:
        return [self.post_attention_layernorm, self.post_feedforward_layernorm]

    def residual_readers(self) -> list[nn.Module]:
        return [self.input_layernorm, self.pre_feedforward_layernorm]


class Gemma3TextModel(LlamaModel):
    def __init__(self, config: ModelConfig, variant: DecoderVariant):
        super().__init__(config, variant, Gemma3DecoderLayer)
        self.embed_scale = config.get("hidden_size") ** 0.5


class Gemma3ForCausalLM(LlamaForCausalLM):
    variant = GEMMA
    model_cls = Gemma3TextModel

    def __init__(self, config: ModelConfig):
        if config.get("attn_logit_softcapping", None) is not None:
            raise UnsupportedArchitectureError(
                f"{config.file}: attn_logit_softcapping is not supported (fused kernels have no soft-capping input)"
            )
        if config.get("use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(f"{config.file}: bidirectional Gemma 3 is not supported")
        super().__init__(config)
        self.final_logit_softcapping = config.get("final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_logit_softcapping is not None:
            cap = float(self.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return logits
