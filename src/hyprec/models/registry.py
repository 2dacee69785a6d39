"""Which class implements which ``model_type``."""

from __future__ import annotations

from hyprec.config import ModelConfig
from hyprec.errors import UnsupportedArchitectureError
from hyprec.models.base import EncoderModel
from hyprec.models.bert import BertModel
from hyprec.models.mpnet import MPNetModel
from hyprec.models.roberta import RobertaModel, XLMRobertaModel

ENCODERS: dict[str, type[EncoderModel]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "xlm-roberta": XLMRobertaModel,
    "mpnet": MPNetModel,
}


def supported_architectures() -> list[str]:
    return sorted(ENCODERS)


def model_class(config: ModelConfig) -> type[EncoderModel]:
    """The encoder class for a config, or an error naming the architecture and the supported list."""
    try:
        return ENCODERS[config.model_type]
    except KeyError:
        names = ", ".join(config.architectures) or "none declared"
        raise UnsupportedArchitectureError(
            f"{config.path / 'config.json'}: model_type={config.model_type!r} (architectures: {names}) is not "
            f"supported; supported model types: {', '.join(supported_architectures())}"
        ) from None
