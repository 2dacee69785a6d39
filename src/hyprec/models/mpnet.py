"""MPNet (``MPNetModel``): BERT-like post-norm encoder with a T5-style relative position bias shared by all
layers. The bias enters the fused attention kernel as an additive mask; it is computed in float32 from a
float32 table (positions are never half precision).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.layers.attention import Attention, AttentionMetadata
from hyprec.layers.linear import Linear
from hyprec.layers.norm import Float32Embedding, LayerNorm
from hyprec.models.base import AttentionInputs, EncoderModel, attention_heads
from hyprec.models.bert import BertEncoder, BertIntermediate, BertOutput

# transformers' MPNet hard-codes these in compute_position_bias / relative_position_bucket.
NUM_BUCKETS = 32
MAX_DISTANCE = 128
PADDING_IDX = 1


def relative_position_bucket(relative_position: torch.Tensor) -> torch.Tensor:
    """Bidirectional log-spaced buckets of ``key_pos - query_pos`` (as in transformers' MPNet)."""
    half = NUM_BUCKETS // 2
    n = -relative_position
    ret = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    large = (
        max_exact + (torch.log(n.float() / max_exact) / math.log(MAX_DISTANCE / max_exact) * (half - max_exact)).long()
    )
    large = large.clamp(max=half - 1)
    return ret + torch.where(n < max_exact, n, large)


class MPNetEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.get("hidden_size")
        self.word_embeddings = nn.Embedding(config.get("vocab_size"), hidden)
        self.position_embeddings = nn.Embedding(config.get("max_position_embeddings"), hidden)
        self.LayerNorm = LayerNorm(hidden, eps=config.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class MPNetSelfAttention(nn.Module):
    """transformers names these q/k/v/o where BERT says query/key/value/output.dense."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.get("hidden_size")
        self.num_heads, self.head_dim = attention_heads(config)
        self.q = Linear(hidden, hidden)
        self.k = Linear(hidden, hidden)
        self.v = Linear(hidden, hidden)
        self.o = Linear(hidden, hidden)
        self.attn = Attention(self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        return self.o(self.attn(self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape), meta))


class MPNetAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = MPNetSelfAttention(config)
        self.LayerNorm = LayerNorm(config.get("hidden_size"), eps=config.get("layer_norm_eps", 1e-12))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.LayerNorm(self.attn(x, meta) + x)


class MPNetLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = MPNetAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.intermediate(x), x)


class MPNetEncoder(BertEncoder):
    def __init__(self, config: ModelConfig):
        super().__init__(config, MPNetLayer)
        self.relative_attention_bias = Float32Embedding(
            config.get("relative_attention_num_buckets", NUM_BUCKETS), config.get("num_attention_heads")
        )

    def position_bias(self, length: int) -> torch.Tensor:
        """Float32 bias ``[1, heads, length, length]``; right padding leaves real tokens' entries unchanged."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).float()


class MPNetModel(EncoderModel):
    checkpoint_prefixes = ("mpnet.",)
    uses_attention_bias = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = MPNetEncoder(config)

    @property
    def max_positions(self) -> int:
        return super().max_positions - PADDING_IDX - 1

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        meta.bias = self.encoder.position_bias(meta.max_seqlen)
        return self.encoder(self.embeddings(input_ids, meta.position + PADDING_IDX + 1), meta)

    def attention_inputs(self) -> Iterator[AttentionInputs]:
        norm = self.embeddings.LayerNorm
        for i, layer in enumerate(self.encoder.layer):
            sa = layer.attention.attn
            yield AttentionInputs(f"encoder.layer.{i}", norm, [sa.q, sa.k, sa.v])
            norm = layer.output.LayerNorm
