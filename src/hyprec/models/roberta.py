"""RoBERTa and XLM-RoBERTa: BERT's layers; positions start at ``padding_idx + 1`` (fairseq convention)."""

from __future__ import annotations

import torch

from hyprec.layers.attention import AttentionMetadata
from hyprec.models.bert import BertModel


class RobertaModel(BertModel):
    checkpoint_prefixes = ("roberta.",)

    def positions(self, meta: AttentionMetadata) -> torch.Tensor:
        # transformers: cumsum(input_ids != pad) + pad, i.e. padding_idx + 1 + index for real tokens.
        return meta.position + int(self.config.get("pad_token_id", 1)) + 1

    @property
    def max_positions(self) -> int:
        return super().max_positions - int(self.config.get("pad_token_id", 1)) - 1


class XLMRobertaModel(RobertaModel):
    checkpoint_prefixes = ("roberta.", "xlm_roberta.")
