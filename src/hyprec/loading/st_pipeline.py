"""The sentence-transformers on-disk pipeline: modules.json -> Transformer -> Pooling -> Dense* -> Normalize.

A plain Hugging Face model directory (no modules.json) gets sentence-transformers' own default: mean pooling,
no normalisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hyprec.config import read_json
from hyprec.errors import ModelLoadError

log = logging.getLogger(__name__)

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# ST's config keys for each mode, in the order ST concatenates them.
_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


@dataclass
class PoolingSpec:
    modes: list[str]
    include_prompt: bool = True


@dataclass
class DenseSpec:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # one of _ACTIVATIONS
    residual: bool = False  # ST's use_residual: out = act(linear(x)) + x (or + residual(x) if sizes differ)


@dataclass
class PipelineSpec:
    """Everything sentence-transformers would do around the transformer, read from the model directory."""

    transformer_dir: Path
    max_seq_length: int | None = None
    do_lower_case: bool = False
    pooling: PoolingSpec = field(default_factory=lambda: PoolingSpec(["mean"]))
    dense: list[DenseSpec] = field(default_factory=list)
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    def describe(self) -> str:
        steps = [
            f"Transformer(max_seq_length={self.max_seq_length})",
            f"Pooling({'+'.join(self.pooling.modes)})",
        ]
        steps += [f"Dense({d.in_features}->{d.out_features}, {d.activation})" for d in self.dense]
        if self.normalize:
            steps.append("Normalize")
        return " -> ".join(steps)


def _module_kind(entry: dict, modules_file: Path) -> str:
    kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
    if kind not in ("Transformer", "Pooling", "Dense", "Normalize"):
        raise ModelLoadError(
            f"{modules_file}: module type {entry.get('type')!r} is not supported; "
            "expected Transformer, Pooling, Dense or Normalize"
        )
    return kind


def _read_pooling(directory: Path) -> PoolingSpec:
    cfg = read_json(directory / "config.json", "pooling config")
    if "pooling_mode" in cfg:  # ST >= 6 names the modes, in concatenation order
        mode = cfg["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [m for m in POOLING_MODES if cfg.get(_POOLING_KEYS[m])]
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ModelLoadError(
            f"{directory / 'config.json'}: pooling mode {bad or 'none'} is not valid; "
            f"expected one or more of {', '.join(POOLING_MODES)}"
        )
    return PoolingSpec(modes=modes, include_prompt=bool(cfg.get("include_prompt", True)))


def _read_dense(directory: Path) -> DenseSpec:
    cfg = read_json(directory / "config.json", "Dense config")
    activation = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise ModelLoadError(
            f"{directory / 'config.json'}: activation_function {cfg.get('activation_function')!r} is not "
            f"supported; expected one of {', '.join(_ACTIVATIONS)}"
        )
    if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ModelLoadError(
            f"{directory / 'config.json'}: module_input_name={cfg['module_input_name']!r} is not supported; "
            "hyprec applies Dense modules to the pooled sentence_embedding"
        )
    try:
        return DenseSpec(
            path=directory,
            in_features=int(cfg["in_features"]),
            out_features=int(cfg["out_features"]),
            bias=bool(cfg.get("bias", True)),
            activation=activation,
            residual=bool(cfg.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{directory / 'config.json'}: bad or missing field {exc}") from None


def read_pipeline(model_dir: Path) -> PipelineSpec:
    """Parse a model directory's sentence-transformers files (all optional)."""
    modules_file = model_dir / "modules.json"
    spec = PipelineSpec(transformer_dir=model_dir)
    if modules_file.exists():
        modules = read_json(modules_file, "modules list", expected=list)
        if not all(isinstance(m, dict) for m in modules):
            raise ModelLoadError(f"{modules_file}: expected a list of module objects")
        kinds = [(_module_kind(m, modules_file), model_dir / str(m.get("path", ""))) for m in modules]
        if not kinds or kinds[0][0] != "Transformer":
            raise ModelLoadError(f"{modules_file}: the first module must be a Transformer")
        spec.transformer_dir = kinds[0][1]
        spec.pooling = PoolingSpec(modes=[])
        for kind, path in kinds[1:]:
            if kind == "Pooling":
                spec.pooling = _read_pooling(path)
            elif kind == "Dense":
                spec.dense.append(_read_dense(path))
            elif kind == "Normalize":
                spec.normalize = True
        if not spec.pooling.modes:
            raise ModelLoadError(f"{modules_file}: no Pooling module; hyprec needs one to produce embeddings")
    else:
        log.warning("%s has no modules.json: using mean pooling without normalisation", model_dir)

    for folder in dict.fromkeys((spec.transformer_dir, model_dir)):
        bert_cfg = folder / "sentence_bert_config.json"
        if bert_cfg.exists():
            cfg = read_json(bert_cfg, "sentence-transformers config")
            spec.max_seq_length = cfg.get("max_seq_length")
            spec.do_lower_case = bool(cfg.get("do_lower_case", False))
            break

    st_cfg = model_dir / "config_sentence_transformers.json"
    if st_cfg.exists():
        cfg = read_json(st_cfg, "sentence-transformers config")
        prompts = cfg.get("prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise ModelLoadError(f"{st_cfg}: 'prompts' must map prompt names to strings")
        spec.prompts = prompts
        spec.default_prompt_name = cfg.get("default_prompt_name")
        if spec.default_prompt_name and spec.default_prompt_name not in spec.prompts:
            raise ModelLoadError(
                f"{st_cfg}: default_prompt_name {spec.default_prompt_name!r} is not among the prompts "
                f"{sorted(spec.prompts)}"
            )
    return spec
