"""Open a model path as an engine: encoder directories -> EmbeddingEngine, classifier (cross-encoder) directories ->
ClassifierEngine, decoder directories and .gguf files -> LLMEngine."""

from __future__ import annotations

import functools
from pathlib import Path

from hyprec.config import EngineConfig, ModelConfig
from hyprec.engine.classifier_engine import ClassifierEngine
from hyprec.engine.embedding_engine import EmbeddingEngine
from hyprec.engine.llm_engine import LLMEngine
from hyprec.errors import ModelLoadError
from hyprec.loading.generation_tokenizer import GenerationTokenizer
from hyprec.loading.st_pipeline import read_pipeline
from hyprec.loading.weights import Checkpoint
from hyprec.models.registry import is_classifier, is_decoder


def _eos_ids(config: ModelConfig) -> list[int]:
    eos = config.get("eos_token_id", None)
    return eos if isinstance(eos, list) else [] if eos is None else [eos]


def _decoder_from_dir(path: Path, **kwargs) -> LLMEngine:
    config = ModelConfig.from_dir(path)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        tokenizer = GenerationTokenizer.from_dir(path, config.model_type, _eos_ids(config))
    return LLMEngine(path.name, config, Checkpoint.open(path), tokenizer, **kwargs)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: Path, mtime_ns: int, size: int):
    """Parsing a GGUF header (its 262k-entry vocabulary arrays) and building its tokenizer take ~15 s for Gemma;
    engines opened on the same unchanged file in one process share the reader (tensors are dequantised per load)."""
    try:
        from hyprec.loading.gguf import GGUFCheckpoint
    except ImportError as exc:
        raise ModelLoadError(f"{path}: reading GGUF files needs the 'gguf' extra ({exc})") from None
    return GGUFCheckpoint(path)


def _decoder_from_gguf(path: Path, **kwargs) -> LLMEngine:
    stat = path.stat()
    ckpt = _open_gguf(path, stat.st_mtime_ns, stat.st_size)
    config = ModelConfig(path=path.parent, raw=ckpt.config, source=path)
    tokenizer = GenerationTokenizer.from_gguf(ckpt, config.model_type, _eos_ids(config))
    return LLMEngine(path.name, config, ckpt, tokenizer, **kwargs)


def open_engine(
    path: Path, *, dtype: str, attn_dtype: str, kv_cache_dtype: str, engine_config: EngineConfig
) -> EmbeddingEngine | LLMEngine:
    """The engine for a resolved model path: a decoder (directory or GGUF file), a sequence classifier
    (cross-encoder; HF or sentence-transformers ``CrossEncoder`` directory) or an embedding model."""
    kwargs = {
        "dtype": dtype,
        "attn_dtype": attn_dtype,
        "kv_cache_dtype": kv_cache_dtype,
        "engine_config": engine_config,
    }
    if path.is_file():
        return _decoder_from_gguf(path, **kwargs)
    config_dir = path if (path / "config.json").exists() else read_pipeline(path).transformer_dir
    config = ModelConfig.from_dir(config_dir)
    if is_decoder(config):
        return _decoder_from_dir(path, **kwargs)
    if is_classifier(config):
        return ClassifierEngine(config_dir, **kwargs)
    return EmbeddingEngine(path, **kwargs)
