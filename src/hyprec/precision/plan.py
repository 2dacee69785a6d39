"""Precision plans: per-layer dtype choices plus exact rescaling, saved as JSON and loaded with ``--precision-plan``.

A plan is what ``hyprec repair`` produces (:mod:`hyprec.tools.repair`). It says, for one specific model:

* ``residual_scale_log2``: the residual stream is multiplied by ``2**k`` (exact, see :mod:`.rescale`);
* ``ffn_scale_log2``: per layer, the gated FFN intermediate is multiplied by ``2**k`` (exact);
* ``layers``: per layer, the dtype of its weights and activations (``linear``; the residual add inside the layer
  happens in it too) and the dtype q/k/v enter the fused attention kernel in (``attention``; the KV cache of that
  layer stores it);
* ``edges``: the dtype of the embeddings and the output head.

Casts happen only at the declared plan points: a layer's input is cast to the layer's dtype as it enters, the
output head casts the final hidden state to its own dtype, and norms, softmax statistics, RoPE, pooling and
logits stay float32 as everywhere else. The plan also records how it was made (target, tolerance, a hash of the
calibration text, the measured error) and a fingerprint of the model's weights, so that loading it onto another
model fails clearly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyprec.dtypes import TORCH_DTYPES, LayerDtypes, dtype_name, full_name
from hyprec.errors import ConfigError
from hyprec.layers.quantized import StoredWeight

PLAN_FORMAT = "hyprec-precision-plan"
PLAN_VERSION = 1
PLAN_DTYPES = tuple(TORCH_DTYPES)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each field of a plan's records may hold: (test, what the error message says was expected). Measured
# metrics may be NaN (a candidate that produced NaN logits); bounds elsewhere are what `hyprec repair` writes.
_KINDS: dict[str, tuple[Any, str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "number": (_is_number, "a number"),
    "fraction": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seconds": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "metrics": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()),
        "an object of numbers",
    ),
    "trial": (
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("units"), str)
            and isinstance(v.get("accepted"), bool)
            and all(_is_number(x) for k, x in v.items() if k not in ("units", "accepted"))
        ),
        'an object {"units": string, "accepted": true/false, <metric>: number}',
    ),
}
# The records a plan carries besides what it runs: field -> key -> kind. Every key is optional.
_RECORDS: dict[str, dict[str, str]] = {
    "model": {"name": "text", "architecture": "text", "fingerprint": "text"},
    "tolerance": {"metric": "text", "min": "fraction", "search_margin": "number"},
    "calibration": {
        "sha256": "text",
        "texts": "count",
        "tokens": "count",
        "validation_sha256": "text",
        "validation_texts": "count",
        "validation_tokens": "count",
    },
    "measured": {"calibration": "metrics", "validation": "metrics", "meets_tolerance": "flag"},
    "search": {
        "method": "text",
        "validations": "count",
        "seconds": "seconds",
        "kept_out": "names",
        "arithmetic": "text",
        "safe_layers": "text",
        "peak_residual_float32": "number",
        "trials": "trial[]",
    },
}


def plan_layer(linear: str, attention: str) -> LayerDtypes:
    """The dtypes of a layer whose weights and activations (its residual add included) are ``linear`` and whose q/k/v
    enter the fused kernel in ``attention`` (its KV cache stores the same): a plan's ``layers`` entry."""
    return LayerDtypes(TORCH_DTYPES[linear], TORCH_DTYPES[attention], TORCH_DTYPES[attention])


@dataclass
class PrecisionPlan:
    """A per-layer precision plan for one model (see the module docstring).

    Attributes:
        model: ``{"name", "architecture", "fingerprint"}`` of the model it was made for.
        target: the half format the plan moves layers to (``float16`` or ``bfloat16``).
        residual_scale_log2: the residual stream is multiplied by ``2**residual_scale_log2``.
        ffn_scale_log2: per layer, the gated FFN intermediate is multiplied by ``2**k``.
        layers: per layer dtypes.
        edges: dtype of the embeddings and output head.
        tolerance: ``{"metric", "min"}`` the plan was validated against.
        calibration: ``{"sha256", "texts", "tokens"}`` of the text the search validated on.
        measured: the metric on the calibration text and on held-out validation text.
        search: how the plan was found (validations, seconds, layers kept out of the target format).
        path: the file the plan was loaded from (not saved).
    """

    model: dict[str, str]
    target: str
    residual_scale_log2: int
    ffn_scale_log2: list[int]
    layers: list[LayerDtypes]
    edges: str
    tolerance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    # ------------------------------------------------------------------ what it runs

    @property
    def name(self) -> str:
        """Policy label, such as ``plan-fp16``."""
        return f"plan-{dtype_name(TORCH_DTYPES[self.target])}"

    @property
    def edges_dtype(self) -> torch.dtype:
        """The dtype of the embeddings and the output head."""
        return TORCH_DTYPES[self.edges]

    @property
    def widest_attention(self) -> torch.dtype:
        """float32 if any layer attends in float32, else the target half format (picks the attention backend)."""
        dts = {layer.attn for layer in self.layers}
        return torch.float32 if torch.float32 in dts else TORCH_DTYPES[self.target]

    def summary(self) -> str:
        fast = sum(layer.compute == TORCH_DTYPES[self.target] for layer in self.layers)
        text = f"precision plan: {fast}/{len(self.layers)} layers and "
        text += f"{'the' if self.edges == self.target else 'not the'} embeddings/head in {self.target}"
        if self.residual_scale_log2:
            text += f", residual stream x 2^{self.residual_scale_log2}"
        scaled = [i for i, k in enumerate(self.ffn_scale_log2) if k]
        if scaled:
            text += f", FFN rescaled in layers {scaled}"
        return text + (f" ({self.path})" if self.path else "")

    # ------------------------------------------------------------------ files

    def as_dict(self) -> dict[str, Any]:
        out = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        out.pop("path")
        out["layers"] = [{"linear": full_name(x.compute), "attention": full_name(x.attn)} for x in self.layers]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrecisionPlan:
        """Read and validate a plan file; errors name the file and the field."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"precision plan not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"precision plan {path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "precision plan") -> PrecisionPlan:
        """A plan from its JSON form; every field is checked, and errors name ``where`` and the field."""

        def fail(what: str) -> ConfigError:
            return ConfigError(f"{where}: {what}")

        if not isinstance(raw, dict):
            raise fail(f"expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != PLAN_FORMAT or raw.get("version") != PLAN_VERSION:
            raise fail(
                f"format={raw.get('format')!r} version={raw.get('version')!r}: expected {PLAN_FORMAT!r} version "
                f"{PLAN_VERSION} (a file written by `hyprec repair`)"
            )
        known = ["format", "version", *(f.name for f in fields(cls) if f.name != "path")]
        if unknown := sorted(set(raw) - set(known)):
            raise fail(f"unknown field(s) {', '.join(map(repr, unknown))}; a plan has {', '.join(known)}")

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in raw:
                raise fail(f"missing field {key!r}")
            value = raw[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise fail(f"field {key!r} = {value!r:.60}: expected {getattr(kind, '__name__', kind)}")
            return value

        def dtype(value: Any, key: str) -> str:
            if value not in PLAN_DTYPES:
                raise fail(f"{key} = {value!r}: expected one of {', '.join(PLAN_DTYPES)}")
            return value

        def record(key: str) -> dict[str, Any]:
            """An object of known keys, each of its kind (``kind[]``: a list of them); missing or null: empty."""
            value = raw.get(key)
            if value is None:
                return {}
            schema = _RECORDS[key]
            if not isinstance(value, dict):
                raise fail(f"field {key!r} = {value!r:.60}: expected an object with keys {', '.join(schema)}")
            for name, item in value.items():
                if name not in schema:
                    raise fail(f"field '{key}.{name}': unknown; expected keys {', '.join(schema)}")
                kind = schema[name]
                test, expected = _KINDS[kind.removesuffix("[]")]
                if not kind.endswith("[]"):
                    if not test(item):
                        raise fail(f"field '{key}.{name}' = {item!r:.60}: expected {expected}")
                    continue
                if not isinstance(item, list):
                    raise fail(f"field '{key}.{name}' = {item!r:.60}: expected a list of {expected}")
                for i, element in enumerate(item):
                    if not test(element):
                        raise fail(f"field '{key}.{name}[{i}]' = {element!r:.60}: expected {expected}")
            return dict(value)

        model = record("model") if "model" in raw else need("model", dict)
        if "fingerprint" not in model:
            raise fail("field 'model.fingerprint' is missing")
        target = dtype(need("target", str), "target")
        layers = []
        for i, layer in enumerate(need("layers", list)):
            if not isinstance(layer, dict) or set(layer) != {"linear", "attention"}:
                raise fail(f"layers[{i}] = {layer!r:.60}: expected an object with 'linear' and 'attention'")
            layers.append(
                plan_layer(
                    dtype(layer.get("linear"), f"layers[{i}].linear"),
                    dtype(layer.get("attention"), f"layers[{i}].attention"),
                )
            )
        ffn = need("ffn_scale_log2", list)
        if len(ffn) != len(layers) or not all(isinstance(k, int) and not isinstance(k, bool) for k in ffn):
            raise fail(f"ffn_scale_log2: expected {len(layers)} integers (one per layer), got {ffn!r:.80}")
        scale = need("residual_scale_log2", int)
        if not all(-64 <= k <= 64 for k in [scale, *ffn]):
            raise fail("scales must lie in [-64, 64] (powers of two)")
        return cls(
            model=model,
            target=target,
            residual_scale_log2=scale,
            ffn_scale_log2=list(ffn),
            layers=layers,
            edges=dtype(need("edges", str), "edges"),
            tolerance=record("tolerance"),
            calibration=record("calibration"),
            measured=record("measured"),
            search=record("search"),
            path=where if where != "precision plan" else None,
        )

    # ------------------------------------------------------------------ applying it

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` unless this plan was made for ``model`` (a float32 build, before the plan)."""
        where = self.path or "precision plan"
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model.get("fingerprint"):
            raise ConfigError(
                f"{where} was made for {self.model.get('name', '?')} ({self.model.get('architecture', '?')}, "
                f"fingerprint {self.model.get('fingerprint', '?')[:12]}), not for this model ("
                f"{type(model).__name__}, fingerprint {fingerprint[:12]}); run `hyprec repair` on this model"
            )
        if len(self.layers) != len(model.blocks()):
            raise ConfigError(f"{where} has {len(self.layers)} layers; the model has {len(model.blocks())}")


def load_plan(plan: str | os.PathLike | PrecisionPlan | None) -> PrecisionPlan | None:
    """A plan object from a path (or the object itself); None stays None."""
    if plan is None or isinstance(plan, PrecisionPlan):
        return plan
    return PrecisionPlan.load(plan)


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class, every weight's name and shape, and a strided sample of its values.

    Computed on the float32 build before any plan is applied, so it identifies the checkpoint, not the plan. Weights
    kept in a stored block format (:class:`~hyprec.layers.quantized.StoredWeight`) count as the float32 weights they
    dequantise to (exactly), so a model loaded either way has one fingerprint.
    """
    samples = {name: _sample(tensor.detach()) for name, tensor in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "stored", None), StoredWeight):
            samples[f"{name}.weight"] = _stored_sample(module.stored)
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, (shape, sample) in sorted(samples.items()):
        digest.update(f"{name}:{shape}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


_SAMPLES = 256


def _sample(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    flat = tensor.flatten()
    return tuple(tensor.shape), flat[:: max(1, flat.numel() // _SAMPLES)][:_SAMPLES].float().cpu().contiguous()


def _stored_sample(weight: StoredWeight) -> tuple[tuple[int, ...], torch.Tensor]:
    """:func:`_sample` of the dequantised weight, dequantising only the rows it reads."""
    out, k = weight.shape
    flat = torch.arange(0, out * k, max(1, out * k // _SAMPLES))[:_SAMPLES]
    rows = weight.dequantize(flat // k)
    return (out, k), rows[torch.arange(len(flat)), flat % k].contiguous()
