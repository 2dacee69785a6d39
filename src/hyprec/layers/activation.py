"""Activation functions by their Hugging Face ``hidden_act`` names."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from hyprec.errors import ModelLoadError


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def get_activation(name: str, source: object = "config.json") -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name`` in the ``hidden_act`` field of ``source`` (named in errors)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ModelLoadError(
            f"{source}: hidden_act={name!r} is not supported; expected one of {', '.join(sorted(ACTIVATIONS))}"
        ) from None
