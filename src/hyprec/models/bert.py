"""BERT (``BertModel``): post-norm encoder with absolute position embeddings.

Module and weight names mirror ``transformers.models.bert.modeling_bert``. Hidden states are packed
``[num_tokens, hidden]``: every token-wise op (embeddings, projections, FFN, norms) runs on real tokens only;
padding exists only inside the attention backend, and only where the backend needs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.errors import UnsupportedArchitectureError
from hyprec.layers.activation import get_activation
from hyprec.layers.attention import Attention, AttentionMetadata
from hyprec.layers.linear import Linear
from hyprec.layers.norm import LayerNorm
from hyprec.models.base import AttentionInputs, EncoderModel, attention_heads


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.get("hidden_size")
        self.word_embeddings = nn.Embedding(config.get("vocab_size"), hidden)
        self.position_embeddings = nn.Embedding(config.get("max_position_embeddings"), hidden)
        self.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), hidden)
        self.LayerNorm = LayerNorm(hidden, eps=config.get("layer_norm_eps", 1e-12))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Single-segment inputs (embeddings): token type 0 everywhere, as sentence-transformers passes it; pairs
        # (cross-encoders) mark the second text with type 1.
        types = (
            self.token_type_embeddings.weight[0]
            if token_type_ids is None
            else self.token_type_embeddings(token_type_ids)
        )
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + types
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.get("hidden_size")
        self.num_heads, self.head_dim = attention_heads(config)
        self.query = Linear(hidden, hidden)
        self.key = Linear(hidden, hidden)
        self.value = Linear(hidden, hidden)
        self.attn = Attention(self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        return self.attn(self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape), meta)


class BertSelfOutput(nn.Module):
    """Projection, residual add and post-norm: shared by the attention and FFN halves of a layer."""

    def __init__(self, config: ModelConfig, in_features: int):
        super().__init__()
        hidden = config.get("hidden_size")
        self.dense = Linear(in_features, hidden)
        self.LayerNorm = LayerNorm(hidden, eps=config.get("layer_norm_eps", 1e-12))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.get("hidden_size"))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(x, meta), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        act = config.get("hidden_act", "gelu")
        get_activation(act, config.file)  # a clear error for an unknown name
        # The activation belongs to the projection, so a kernel that can fuses it into the GEMM (layers/onednn.py).
        self.dense = Linear(config.get("hidden_size"), config.get("intermediate_size"), activation=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class BertOutput(BertSelfOutput):
    def __init__(self, config: ModelConfig):
        super().__init__(config, config.get("intermediate_size"))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig, layer_cls: type[nn.Module] = BertLayer):
        super().__init__()
        self.layer = nn.ModuleList(layer_cls(config) for _ in range(config.get("num_hidden_layers")))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, meta)
        return x


class BertModel(EncoderModel):
    checkpoint_prefixes = ("bert.",)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedArchitectureError(
                f"{config.file}: position_embedding_type={position_type!r} is not supported (expected 'absolute')"
            )
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def positions(self, meta: AttentionMetadata) -> torch.Tensor:
        return meta.position

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, self.positions(meta), token_type_ids), meta)

    def attention_inputs(self) -> Iterator[AttentionInputs]:
        norm = self.embeddings.LayerNorm
        for i, layer in enumerate(self.encoder.layer):
            sa = layer.attention.self
            yield AttentionInputs(f"encoder.layer.{i}", norm, [sa.query, sa.key, sa.value])
            norm = layer.output.LayerNorm
