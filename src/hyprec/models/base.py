"""What every model family provides to the engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.errors import UnsupportedArchitectureError
from hyprec.layers.attention import AttentionMetadata
from hyprec.layers.quantized import StoredWeight


def attention_heads(config: ModelConfig) -> tuple[int, int]:
    """(num_attention_heads, head_dim), checking that the hidden size splits evenly into heads."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if heads < 1 or hidden % heads:
        raise UnsupportedArchitectureError(
            f"{config.file}: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
        )
    return heads, hidden // heads


@dataclass
class AttentionInputs:
    """The norm whose output feeds a layer's q/k/v projections, those projections (q, k, v), and what happens to
    q and k between projection and attention (per-head RMSNorm, RoPE) (for weight bounds)."""

    layer: str
    norm: nn.Module
    projections: list[nn.Linear]
    head_dim: int | None = None
    qk_norms: tuple[nn.Module, nn.Module] | None = None
    rotary: bool = False


@dataclass
class ResidualStream:
    """Who writes to and who reads a pre-norm residual stream (used for exact power-of-two rescaling).

    Attributes:
        embedding: the module whose float ``embed_scale`` multiplies the embedding output (the stream's start).
        table: the embedding table when it only feeds the stream (untied); rescaling folds into it, so a table too
            large for float16 shrinks with the stream. None when tied to the output head.
        writers: modules whose output is added to the stream: a projection, or a post-norm (Gemma's sandwich norms).
        readers: norms that read the stream; their output is scale-invariant up to ``eps``.
    """

    embedding: nn.Module
    table: nn.Embedding | None
    writers: list[nn.Module]
    readers: list[nn.Module]


class EncoderModel(nn.Module):
    """A bidirectional encoder over packed token ids, returning packed last hidden states.

    Subclasses set the class attributes and implement ``forward`` and ``attention_inputs``.
    """

    #: prefixes a checkpoint may carry in front of our weight names (``bert.`` in ``BertForMaskedLM``).
    checkpoint_prefixes: tuple[str, ...] = ()
    #: checkpoint weights that are expected but unused (pooler heads, saved position-id buffers).
    ignored_weights: tuple[str, ...] = ("pooler.", "embeddings.position_ids", "lm_head.", "cls.")
    #: whether attention needs an additive bias (rules out kernels without a bias input).
    uses_attention_bias: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    @property
    def hidden_size(self) -> int:
        return int(self.config.get("hidden_size"))

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings can address."""
        return int(self.config.get("max_position_embeddings"))

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids ``[N]`` (packed), and for text pairs their segment ids ``[N]`` -> hidden states ``[N, hidden]``
        in the compute dtype."""
        raise NotImplementedError

    def attention_inputs(self) -> Iterator[AttentionInputs]:
        """Per layer: the norm feeding q/k/v and the q/k/v projections."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The transformer layers, in order (``encoder.layer.N``)."""
        return list(self.encoder.layer)

    def ffn_down(self, block: nn.Module) -> nn.Linear:
        """The projection whose input is the block's FFN intermediate activation."""
        return block.output.dense

    def ffn_up(self, block: nn.Module) -> nn.Linear | None:
        """A projection the FFN intermediate depends on linearly (a gated MLP's up projection), or None."""
        return None

    def edge_modules(self) -> list[nn.Module]:
        """Modules outside the transformer layers that hold weights (embeddings, output head)."""
        return [self.embeddings]

    def residual_stream(self) -> ResidualStream | None:
        """The pre-norm residual stream, or None (BERT-style post-norm encoders normalise after every add)."""
        return None


class DecoderModel(nn.Module):
    """A causal language model over packed tokens with a paged KV cache.

    ``forward`` returns packed hidden states; ``compute_logits`` turns the rows that need a next token into float32
    logits. Subclasses mirror the Hugging Face ``XxxForCausalLM`` weight names.
    """

    checkpoint_prefixes: tuple[str, ...] = ()
    ignored_weights: tuple[str, ...] = ("model.rotary_emb.", "rotary_emb.")
    #: compute the output head in row tiles (see :mod:`hyprec.layers.linear`); set by ``set_batch_invariant``.
    batch_invariant: bool = False
    #: the output head as the checkpoint stores it (:class:`~hyprec.layers.quantized.StoredWeight`), when the policy
    #: keeps it so (``weights``); None: the float32 head. Families derive it from their head module.
    stored_head: StoredWeight | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings"))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_layers(self) -> list[nn.Module]:
        """The :class:`~hyprec.layers.attention.Attention` module of every layer, in order."""
        raise NotImplementedError

    def attention_inputs(self) -> Iterator[AttentionInputs]:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The transformer layers, in order (``model.layers.N``)."""
        return list(self.model.layers)

    def ffn_down(self, block: nn.Module) -> nn.Linear:
        """The projection whose input is the block's FFN intermediate activation."""
        return block.mlp.down_proj

    def ffn_up(self, block: nn.Module) -> nn.Linear | None:
        """A projection the FFN intermediate depends on linearly (a gated MLP's up projection), or None."""
        return block.mlp.up_proj

    def edge_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def residual_stream(self) -> ResidualStream | None:
        raise NotImplementedError
