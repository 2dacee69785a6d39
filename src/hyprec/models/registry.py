"""Which class implements which ``model_type``."""

from __future__ import annotations

from hyprec.config import ModelConfig
from hyprec.errors import UnsupportedArchitectureError
from hyprec.models.base import DecoderModel, EncoderModel
from hyprec.models.bert import BertModel
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


DECODERS: dict[str, type[DecoderModel]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted({**ENCODERS, **DECODERS})


def is_decoder(config: ModelConfig) -> bool:
    return config.model_type in DECODERS


def model_class(config: ModelConfig) -> type[EncoderModel] | type[DecoderModel]:
    """The model class for a config, or an error naming the architecture and the supported list."""
    try:
        return {**ENCODERS, **DECODERS}[config.model_type]
    except KeyError:
        names = ", ".join(config.architectures) or "none declared"
        raise UnsupportedArchitectureError(
            f"{config.file}: model_type={config.model_type!r} (architectures: {names}) is not "
            f"supported; supported model types: {', '.join(supported_architectures())}"
        ) from None
