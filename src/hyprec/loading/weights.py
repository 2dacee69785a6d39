"""Checkpoint reading and loading into a model built on the meta device.

safetensors files are opened lazily (memory-mapped) one tensor at a time; ``pytorch_model.bin`` is the fallback,
read with ``torch.load(weights_only=True, mmap=True)`` so no pickled code runs. Every weight the model declares
must be present with the right shape; unexpected checkpoint entries are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hyprec.config import read_json
from hyprec.errors import ModelLoadError
from hyprec.layers.norm import Float32Params

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


@dataclass
class Checkpoint:
    """Lazy name -> tensor access over the weight files of one directory."""

    files: list[Path]
    _where: dict[str, Path] = field(default_factory=dict)
    _bin: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        if (directory / SAFETENSORS_INDEX).exists():
            index_file = directory / SAFETENSORS_INDEX
            weight_map = read_json(index_file, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{index_file}: expected a non-empty 'weight_map' object")
            files = sorted({directory / str(f) for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise ModelLoadError(f"weights file {f} listed in {index_file} does not exist")
        elif (directory / SAFETENSORS).exists():
            files = [directory / SAFETENSORS]
        elif (directory / TORCH_BIN).exists():
            return cls._open_bin(directory / TORCH_BIN)
        else:
            raise ModelLoadError(
                f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}"
            )
        ckpt = cls(files=files)
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    ckpt._where.update(dict.fromkeys(f.keys(), path))
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"cannot read weights file {path}: {exc} (corrupt or truncated?)") from None
        return ckpt

    @classmethod
    def _open_bin(cls, path: Path) -> Checkpoint:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for corrupt pickles/zips
            raise ModelLoadError(f"cannot read weights file {path}: {exc} (corrupt or truncated?)") from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path}: expected a state dict, got {type(state).__name__}")
        ckpt = cls(files=[path], _bin=state)
        ckpt._where = dict.fromkeys(state, path)
        return ckpt

    def names(self) -> list[str]:
        return list(self._where)

    def source(self, name: str) -> str:
        """The file a tensor comes from (for error messages)."""
        return str(self._where[name])

    def get(self, name: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[name]
        path = self._where[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read tensor {name!r} from {path}: {exc}") from None

    def floating_dtype(self) -> torch.dtype:
        """Storage dtype of the first floating-point tensor (the checkpoint's dtype), read from headers only."""
        if self._bin is not None:
            dtypes = [t.dtype for t in self._bin.values() if t.is_floating_point()]
            return dtypes[0] if dtypes else torch.float32
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                    if dtype is not None:
                        return dtype
        return torch.float32

    def storage(self) -> str | None:
        """safetensors/bin files store their floating dtype as is: nothing to add to :meth:`floating_dtype`."""
        return None


def _float32_param_names(model: nn.Module) -> set[str]:
    return {
        f"{mod_name}.{p}" if mod_name else p
        for mod_name, module in model.named_modules()
        if isinstance(module, Float32Params)
        for p, _ in module.named_parameters(recurse=False)
    }


def _checkpoint_names(ckpt: WeightSource, prefixes: tuple[str, ...], wanted: set[str]) -> Iterator[tuple[str, str]]:
    """(model name, checkpoint name) pairs, stripping a task-head prefix such as ``bert.`` where present."""
    for name in ckpt.names():
        local = name
        for prefix in prefixes:
            if name.startswith(prefix) and name[len(prefix) :] in wanted:
                local = name[len(prefix) :]
                break
        yield local, name


class WeightSource(Protocol):
    """What :func:`load_weights` needs from a checkpoint (safetensors/bin :class:`Checkpoint`, GGUF files)."""

    files: list[Path]

    def names(self) -> list[str]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def source(self, name: str) -> str: ...
    def floating_dtype(self) -> torch.dtype: ...
    def storage(self) -> str | None:
        """How the weights are stored when :meth:`floating_dtype` alone would mislead (a quantized file computes
        in float32: ``GGUF Q4_K_M checkpoint (a quantized float32 model)``), for logs; else None."""
        ...


def load_weights(
    model: nn.Module,
    ckpt: WeightSource,
    *,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    prefixes: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> list[str]:
    """Fill a meta-device ``model`` from ``ckpt`` in place and return the unexpected checkpoint names.

    Parameters of :class:`Float32Params` modules (norms, position biases) stay float32; all other floating
    parameters are cast to ``compute_dtype``.

    Raises:
        ModelLoadError: a declared weight is missing or has the wrong shape (names the weight and the file).
    """
    expected = dict(model.named_parameters())
    keep_fp32 = _float32_param_names(model)
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for local, name in _checkpoint_names(ckpt, prefixes, set(expected)):
        if local not in expected:
            bare = next((name[len(p) :] for p in prefixes if name.startswith(p)), name)
            if not any(bare.startswith(i) for i in ignored):
                unexpected.append(name)
            continue
        tensor = ckpt.get(name)
        want = expected[local]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ModelLoadError(
                f"weight {name!r} in {ckpt.source(name)} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(want.shape)} from config.json"
            )
        dtype = torch.float32 if local in keep_fp32 else compute_dtype
        state[local] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ModelLoadError(f"weights missing from {', '.join(map(str, ckpt.files))}: {shown}")
    model.load_state_dict(state, assign=True, strict=True)
    if unexpected:
        log.warning("ignoring %d unexpected weights in the checkpoint: %s", len(unexpected), ", ".join(unexpected[:8]))
    return unexpected
