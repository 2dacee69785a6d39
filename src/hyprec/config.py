"""Model configuration (config.json) and engine configuration, both validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyprec.errors import ConfigError, ModelLoadError

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MISSING = object()


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into a ModelLoadError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{what} {path} is not valid JSON: {exc}") from None


@dataclass
class ModelConfig:
    """The Hugging Face ``config.json`` of a model directory, with typed access to its fields."""

    path: Path
    raw: dict[str, Any]

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        raw = read_json(path / "config.json", "model config")
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path / 'config.json'}: expected a JSON object, got {type(raw).__name__}")
        return cls(path=path, raw=raw)

    @property
    def model_type(self) -> str:
        return str(self.raw.get("model_type", ""))

    @property
    def architectures(self) -> list[str]:
        return list(self.raw.get("architectures") or [])

    @property
    def declared_dtype(self) -> torch.dtype | None:
        """The dtype the checkpoint says it was saved in (``dtype``/``torch_dtype``), if any."""
        name = self.raw.get("dtype") or self.raw.get("torch_dtype")
        return _TORCH_DTYPES.get(str(name)) if name else None

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A config field; a missing required field raises an error naming the file and the field."""
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is _MISSING:
            raise ModelLoadError(f"{self.path / 'config.json'}: required field {key!r} is missing")
        return default


@dataclass
class EngineConfig:
    """Run-time options of the engine, shared by every entry point."""

    device: str = "cpu"
    max_num_batched_tokens: int = 16384  # token budget of one forward pass
    max_num_seqs: int = 256  # most sequences in one forward pass
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")


def resolve_device(device: str | torch.device) -> str:
    """Validate a device name; CUDA is accepted only where a CUDA device is present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: no CUDA device is available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ConfigError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return str(dev)
