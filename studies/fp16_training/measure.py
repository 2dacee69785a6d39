"""What one checkpoint does in half precision, measured by hyprec's own ``check`` and ``compare``."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hyprec.dtypes import FP16_MAX
from hyprec.precision.emulation import arithmetic
from hyprec.tools.check import RISK_MARGIN, CheckReport, check
from hyprec.tools.compare import HyprecReference, compare_generation, embedding_metrics
from hyprec.tools.measure import open_model, open_policy, token_ids
from studies.fp16_training.grid import RunConfig

HALF_POLICIES = ("float16", "bfloat16", "hybrid-fp16", "hybrid-bf16")
#: What counts as damage (the field's thresholds, ``../shared/context/numerics.md``): any NaN/inf output; for an
#: embedding model a text whose cosine to float32 drops below 1 - 1e-3; for a language model a teacher-forced top-1
#: agreement with float32 below 99%.
MIN_COSINE = 1 - 1e-3
MIN_TOP1 = 0.99
#: Engine options for these small models: a 16 MiB KV cache (the 1 GiB default is zeroed at every open, and a study
#: opens five engines per checkpoint).
ENGINE_OPTIONS = {"kv_cache_memory": 2**24}
ACTIVITY = ("residual", "ffn", "attention_inputs", "logits")
LAYER_FIELDS = ("residual", "ffn", "q", "k", "v", "logits", "qkv_bound", "norm_gain")


def damaged(kind: str, row: dict[str, Any]) -> bool:
    """Whether a ``compare`` row (one policy) shows damage, by the thresholds above."""
    if kind == "decoder":
        return row["non_finite_logits"] > 0 or not row["top1_agreement"] >= MIN_TOP1
    return row["non_finite"] > 0 or not row["min_cos"] >= MIN_COSINE


def _compare_row(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    if kind == "decoder":
        keys = ("top1_agreement", "mean_kl", "ppl_ratio", "non_finite_logits", "arithmetic")
    else:
        keys = ("min_cos", "mean_cos", "top1_agreement", "non_finite", "arithmetic")
    return {k: row[k] for k in keys} | {"damaged": damaged(kind, row)}


def parameter_stats(directory: Path, norm_offset: float) -> dict[str, float]:
    """Statistics of the weights alone: the largest norm gain of any norm (Gemma stores ``gain - 1``:
    ``norm_offset``), the largest |w| of any matrix, and the largest embedding row norm."""
    state = load_file(str(directory / "model.safetensors"))
    gains = [t.float() + norm_offset for n, t in state.items() if "norm" in n.lower() and n.endswith("weight")]
    matrices = [t.float() for t in state.values() if t.ndim == 2]
    embedding = next(t.float() for n, t in state.items() if "embed_tokens" in n or "word_embeddings" in n)
    return {
        "norm_gain_max": max(float(g.abs().max()) for g in gains),
        "weight_max_abs": max(float(m.abs().max()) for m in matrices),
        "embedding_row_norm_max": float(embedding.norm(dim=1).max()),
    }


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _damage_rows(path: Path, kind: str, reference: Any, texts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """``compare``'s metrics for each half policy against the float32 ``reference`` engine: teacher-forced top-1,
    KL and perplexity for decoders (no greedy decoding: it adds nothing the teacher-forced pass does not show),
    cosines and neighbours of the pooled embeddings for encoders."""
    load = functools.partial(open_policy, path, **ENGINE_OPTIONS)
    if kind == "decoder":
        ids = token_ids(reference, texts, max_tokens)
        return compare_generation(HyprecReference(reference), load, list(HALF_POLICIES), ids, [])
    ref = reference.embed(texts)
    rows = []
    for policy in HALF_POLICIES:
        engine = load(policy)
        ours = engine.embed(texts, allow_nonfinite=True)  # the study measures what users are refused
        rows.append({"policy": policy, "arithmetic": arithmetic(engine.model), **embedding_metrics(ours, ref)})
    return rows


def _from_check(report: CheckReport) -> dict[str, Any]:
    """What a record keeps of ``check``'s report: per layer (the embedding output first) the largest |x| of each
    quantity and the weight facts, and the verdicts."""
    return {
        "layers": [{k: getattr(r, k) for k in ("layer", *LAYER_FIELDS)} for r in report.layers],
        "verdicts": {p: report.verdicts[p].verdict for p in HALF_POLICIES},
        "reasons": {p: report.verdicts[p].reason for p in HALF_POLICIES},
        "recommended": report.recommended,
    }


def _checked(directory: Path, cfg: RunConfig, calibration: list[str]) -> tuple[Any, CheckReport]:
    """The checkpoint's float32 engine and ``check``'s report on the first ``cfg.seq_len`` tokens of each text."""
    reference = open_model(directory, dtype="float32", precision_guard=False, **ENGINE_OPTIONS)
    return reference, check(reference, texts=token_ids(reference, calibration, cfg.seq_len))


@torch.no_grad()
def check_again(directory: Path, cfg: RunConfig, calibration: list[str]) -> dict[str, Any]:
    """``check``'s per-layer maxima and verdicts on a recorded checkpoint, as :func:`measure` records them (after
    check's rules change)."""
    return _from_check(_checked(directory, cfg, calibration)[1])


@torch.no_grad()
def measure(directory: Path, cfg: RunConfig, calibration: list[str], evaluation: list[str]) -> dict[str, Any]:
    """Activations, ``check``'s verdicts, half-precision damage and weight statistics of one checkpoint of ``cfg``.

    ``check`` runs a float32 pass over ``calibration`` (held-out text); ``compare``'s metrics compare each half
    policy of :data:`HALF_POLICIES` with float32 on ``evaluation``; both read each text's first ``cfg.seq_len``
    tokens (the model has no later positions)."""
    reference, report = _checked(directory, cfg, calibration)
    kind = cfg.kind
    layers = report.layers[1:]  # the first row is the embedding output
    bounds = [r.qkv_bound for r in layers if r.qkv_bound is not None]
    damage = _damage_rows(directory, kind, reference, evaluation, cfg.seq_len)
    return {
        "activity": {q: max(getattr(r, q) for r in report.layers) for q in ACTIVITY},
        "qkv_bound_max": max(bounds) if bounds else None,
        "weights_certified_fp16": bool(bounds) and max(bounds) < FP16_MAX / RISK_MARGIN,
        **_from_check(report),
        "damage": {p: _compare_row(kind, row) for p, row in zip(HALF_POLICIES, damage, strict=True)},
        "params": parameter_stats(directory, 1.0 if cfg.family == "gemma3" else 0.0)
        | {"norm_gain_attention_max": _finite(max(r.norm_gain or 0.0 for r in layers))},
    }
