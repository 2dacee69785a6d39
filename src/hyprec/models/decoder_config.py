"""Reading the decoder-specific parts of a config.json: layer types, sliding windows and RoPE parameters, across
the field layouts transformers has used (``rope_parameters`` per layer type, or ``rope_theta``/``rope_scaling``)."""

from __future__ import annotations

from typing import Any

from hyprec.config import ModelConfig

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types(config: ModelConfig) -> list[str]:
    """``sliding_attention`` or ``full_attention`` for each layer."""
    n = config.get("num_hidden_layers")
    types = config.get("layer_types", None)
    if types is not None:
        return list(types)
    window = config.get("sliding_window", None)
    pattern = config.get("sliding_window_pattern", None)
    if window and pattern:  # older Gemma 3 configs: every pattern-th layer is global
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    if window and config.get("use_sliding_window", True):  # Mistral: every layer slides
        return [SLIDING] * n
    return [FULL] * n


def sliding_window(config: ModelConfig, layer_type: str) -> int | None:
    return config.get("sliding_window") if layer_type == SLIDING else None


def rope_parameters(config: ModelConfig, layer_type: str) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, scaling parameters)`` for a layer of the given type."""
    params = config.get("rope_parameters", None)
    if params is not None:
        if layer_type in params:
            params = params[layer_type]
        return float(params["rope_theta"]), dict(params)
    if layer_type == SLIDING and config.get("rope_local_base_freq", None) is not None:
        return float(config.get("rope_local_base_freq")), {}
    return float(config.get("rope_theta", 10000.0)), dict(config.get("rope_scaling", None) or {})
