"""Which class implements which ``model_type``."""

from __future__ import annotations

from hyprec.config import ModelConfig
from hyprec.errors import UnsupportedArchitectureError
from hyprec.models.base import DecoderModel, EncoderModel
from hyprec.models.bert import BertModel
from hyprec.models.classification import (
    BertForSequenceClassification,
    RobertaForSequenceClassification,
    XLMRobertaForSequenceClassification,
)
from hyprec.models.gemma3 import Gemma3ForCausalLM
from hyprec.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from hyprec.models.mpnet import MPNetModel
from hyprec.models.roberta import RobertaModel, XLMRobertaModel

ENCODERS: dict[str, type[EncoderModel]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "xlm-roberta": XLMRobertaModel,
    "mpnet": MPNetModel,
}


#: Sequence classifiers (cross-encoders), by the architecture their config declares.
CLASSIFIERS: dict[str, type[EncoderModel]] = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": RobertaForSequenceClassification,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
}


DECODERS: dict[str, type[DecoderModel]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted({**ENCODERS, **DECODERS, **CLASSIFIERS})


def is_decoder(config: ModelConfig) -> bool:
    return config.model_type in DECODERS


def is_classifier(config: ModelConfig) -> bool:
    """A sequence-classification model (its config declares one of :data:`CLASSIFIERS`)."""
    return any(name in CLASSIFIERS for name in config.architectures)


def model_class(config: ModelConfig) -> type[EncoderModel] | type[DecoderModel]:
    """The model class for a config, or an error naming the architecture and the supported list."""
    classifier = next((CLASSIFIERS[name] for name in config.architectures if name in CLASSIFIERS), None)
    if classifier is not None:
        return classifier
    if any(name.endswith("ForSequenceClassification") for name in config.architectures):
        raise UnsupportedArchitectureError(
            f"{config.file}: architectures {', '.join(config.architectures)} is not supported; supported "
            f"classifiers: {', '.join(CLASSIFIERS)}"
        )
    try:
        return {**ENCODERS, **DECODERS}[config.model_type]
    except KeyError:
        names = ", ".join(config.architectures) or "none declared"
        raise UnsupportedArchitectureError(
            f"{config.file}: model_type={config.model_type!r} (architectures: {names}) is not "
            f"supported; supported model types: {', '.join(supported_architectures())}"
        ) from None
