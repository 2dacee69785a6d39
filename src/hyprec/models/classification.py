"""Sequence classification (cross-encoders, classifiers): an encoder with HF's classification head on its
first token (``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
``XLMRobertaForSequenceClassification``).

The head is float32 under every policy, like pooling: it reads one row per input, so it costs nothing, and a
reranker's order is decided by small score differences. Module and weight names mirror transformers'
``modeling_bert``/``modeling_roberta``; the encoder's weights keep their ``bert.``/``roberta.`` prefix in the
checkpoint, the head's (``bert.pooler``, ``classifier``) are loaded with them.
"""

from __future__ import annotations

import torch
from torch import nn

from hyprec.config import ModelConfig
from hyprec.layers.norm import Float32Params
from hyprec.models.bert import BertModel
from hyprec.models.roberta import RobertaModel, XLMRobertaModel


def num_labels(config: ModelConfig) -> int:
    """Labels of a classification config: ``id2label``'s size (HF writes it), else ``num_labels``, else 2."""
    id2label = config.get("id2label", {})
    return len(id2label) if id2label else int(config.get("num_labels", 2))


def labels(config: ModelConfig) -> list[str]:
    """Label names in class order (``id2label``; ``LABEL_i`` where the config names none)."""
    id2label = {int(k): str(v) for k, v in config.get("id2label", {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(num_labels(config))]


class _Float32Linear(nn.Linear, Float32Params):
    """A head projection kept and computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class BertPooler(nn.Module):
    """``tanh(dense(first token))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = _Float32Linear(config.get("hidden_size"), config.get("hidden_size"))

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first))


class RobertaClassificationHead(nn.Module):
    """``out_proj(tanh(dense(first token)))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.get("hidden_size")
        self.dense = _Float32Linear(hidden, hidden)
        self.out_proj = _Float32Linear(hidden, num_labels(config))

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(first)))


class BertForSequenceClassification(BertModel):
    """BERT with its pooler and a linear classifier; :meth:`classify` maps first-token hidden states to logits."""

    ignored_weights = ("embeddings.position_ids",)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.pooler = BertPooler(config)
        self.classifier = _Float32Linear(config.get("hidden_size"), num_labels(config))

    def classify(self, first: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, labels]`` of the inputs whose first-token hidden states are ``first``."""
        return self.classifier(self.pooler(first))

    def edge_modules(self) -> list[nn.Module]:
        return [self.embeddings, self.pooler, self.classifier]


class RobertaForSequenceClassification(RobertaModel):
    """RoBERTa with its classification head (no pooler)."""

    ignored_weights = ("embeddings.position_ids",)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.classifier = RobertaClassificationHead(config)

    def classify(self, first: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, labels]`` of the inputs whose first-token hidden states are ``first``."""
        return self.classifier(first)

    def edge_modules(self) -> list[nn.Module]:
        return [self.embeddings, self.classifier]


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    checkpoint_prefixes = XLMRobertaModel.checkpoint_prefixes
