"""Model configuration (config.json) and engine configuration, both validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hyprec.dtypes import (
    FLOAT32_GEMMS,
    HALF_ARITHMETIC,
    MATMUL_PRECISIONS,
    ON_NONFINITE,
    TORCH_DTYPES,
    WEIGHTS,
    check_choice,
)
from hyprec.errors import ConfigError, ModelLoadError

_MISSING = object()
# Types of required fields, checked on access (fields with a default are checked against the default's type).
_FIELD_TYPES: dict[str, type] = {
    name: int
    for name in (
        "hidden_size",
        "num_attention_heads",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "num_key_value_heads",
        "head_dim",
    )
}


def read_json(path: Path, what: str, expected: type = dict) -> Any:
    """Read a JSON file holding an ``expected`` container (dict or list); a missing, malformed or wrongly
    shaped file raises a ModelLoadError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(value, expected):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expected, expected.__name__)
        raise ModelLoadError(f"{what} {path}: expected {kind}, got {type(value).__name__}")
    return value


@dataclass
class ModelConfig:
    """The Hugging Face ``config.json`` of a model directory, with typed access to its fields."""

    path: Path
    raw: dict[str, Any]
    source: Path | None = None  # the file the fields came from (config.json, or a .gguf file)

    @property
    def file(self) -> Path:
        return self.source or self.path / "config.json"

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        return cls(path=path, raw=read_json(path / "config.json", "model config"))

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
        return TORCH_DTYPES.get(str(name)) if name else None

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A config field; a missing required field, or a value whose type differs from the default's (ints for
        sizes, floats for epsilons ...), raises an error naming the file and the field."""
        if key in self.raw and self.raw[key] is not None:
            value = self.raw[key]
        elif default is _MISSING:
            raise ModelLoadError(f"{self.file}: required field {key!r} is missing")
        else:
            return default
        want = type(default) if default is not _MISSING and default is not None else _FIELD_TYPES.get(key)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise ModelLoadError(f"{self.file}: field {key!r} = {value!r}: expected {want.__name__}")
        return value


#: Default token budget of a forward pass: decoders (scheduler step) and encoders off the CPU.
GENERATION_TOKEN_BUDGET = 16384
#: Default token budget of an encoder's forward pass on a CPU (see :meth:`EngineConfig.with_token_budget`).
CPU_ENCODER_TOKEN_BUDGET = 2048


@dataclass
class EngineConfig:
    """Run-time options of the engine, shared by every entry point."""

    device: str = "cpu"
    # Token budget of one forward pass; None: the engine's default (token_budget()).
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256  # most sequences in one forward pass
    # Decoders only.
    block_size: int = 16  # tokens per KV cache block
    max_model_len: int | None = None  # context window; default: the model's, capped at 8192 on CPU
    num_kv_blocks: int | None = None  # KV cache blocks per cache group; default: from kv_cache_memory
    kv_cache_memory: int = 2**30  # bytes for the KV cache when num_kv_blocks is not given
    # Run-time precision guard (hyprec.precision.guard).
    precision_guard: bool = True
    on_nonfinite: str = "fallback"  # fallback | raise | ignore
    # A precision plan from `hyprec repair` (path or PrecisionPlan); it sets every dtype per layer.
    precision_plan: Any = None
    # Batch invariance: an input's result is bit-identical whatever it is batched with (fixed-size GEMM row tiles,
    # attention per group of equal-length sequences, position-aligned prefill chunks). Costs speed; see README.
    deterministic: bool = False
    # native | emulated | auto (hyprec.dtypes.HALF_ARITHMETIC). Serving runs the real half kernels (native, the
    # default: emulation keeps float32 weights, twice a float16 model's memory); compare/repair use auto, fast on any
    # hardware.
    half_arithmetic: str = "native"
    # How float32 linear layers multiply (hyprec.precision.policy.resolve_matmul): auto | highest (float32 GEMMs) | high
    # (three bfloat16 products, float32-grade) | medium (one bfloat16 product).
    matmul_precision: str = "auto"
    # Library of float32 GEMMs (hyprec.dtypes.FLOAT32_GEMMS): auto | torch (F.linear) | onednn (prepacked).
    float32_gemm: str = "auto"
    # Weights kept in the checkpoint's stored format (hyprec.dtypes.WEIGHTS): auto | stored | float32.
    weights: str = "auto"

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        for name in ("max_num_seqs", "block_size", "kv_cache_memory"):
            _check_positive(name, getattr(self, name))
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"deterministic={self.deterministic!r}: expected True or False")
        for name, valid in (
            ("on_nonfinite", ON_NONFINITE),
            ("matmul_precision", MATMUL_PRECISIONS),
            ("float32_gemm", FLOAT32_GEMMS),
            ("weights", WEIGHTS),
            ("half_arithmetic", HALF_ARITHMETIC),
        ):
            check_choice(name, getattr(self, name), valid)
        for name in ("max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))

    def with_token_budget(self, generative: bool) -> EngineConfig:
        """This config with ``max_num_batched_tokens`` resolved: the user's value, else the default of the engine kind.

        Decoders: :data:`GENERATION_TOKEN_BUDGET` (the scheduler's budget per step, shared by prefill chunks and
        decode rows). Encoders on a CPU: :data:`CPU_ENCODER_TOKEN_BUDGET`: a pass's activations grow with its tokens
        (MPNet's FFN intermediate is 200 MB at 16,384 tokens, 25 MB at 2,048) and fall out of cache between the ops
        that read them, while GEMM efficiency has saturated long before 2,048 rows. Measured with torch 2.13 on 2
        cores (Xeon with AMX, 200 texts, ``benchmarks/results/token_budget.md``, with the allocator as
        :mod:`hyprec.allocator` sets it): MPNet float32 1.01x and bf16x3 1.04x at 2,048 against 16,384 tokens,
        1,024 and 512 tokens slower (0.97x, 0.93x); MiniLM 1.02-1.06x at 1,024-2,048 (with glibc's default
        thresholds the gap is wider: ``token_budget_system_malloc.md``). Encoders on CUDA keep
        :data:`GENERATION_TOKEN_BUDGET`.
        """
        if self.max_num_batched_tokens is not None:
            return self
        cpu_encoder = not generative and torch.device(self.device).type == "cpu"
        budget = CPU_ENCODER_TOKEN_BUDGET if cpu_encoder else GENERATION_TOKEN_BUDGET
        return replace(self, max_num_batched_tokens=budget)


def _check_positive(name: str, value: object) -> None:
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
