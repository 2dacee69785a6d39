"""``hyprec repair``: find a precision plan that runs as much of a model as possible in a fast half format while
staying within a tolerance against float32 on real text.

1. **Reference.** One float32 pass over calibration text records the reference outputs (next-token argmax and the
   targets' log-likelihood for decoders, embeddings for encoders) and the per-layer activity
   (:func:`hyprec.tools.check.record_activity`).
2. **Exact rescaling** (target float16 only; bfloat16 has float32's range). When the residual stream comes within
   ``RISK_MARGIN`` of 65504, it is multiplied by the power of two that brings it back; likewise each gated FFN
   intermediate (:mod:`hyprec.precision.rescale`). Float32 outputs are bit-for-bit unchanged.
3. **Search** (ONNX Runtime's ``auto_convert_mixed_precision``): the units are the embeddings/head and each layer.
   Try moving the largest undecided segment to the target format together with every segment already accepted;
   validate end to end on all calibration texts; accept it, or split it in halves and try each; a single unit
   that fails stays in the safe precision (float32 weights, hybrid attention). About (#bad units x log N)
   validations.
4. **Held-out check.** The final plan is measured on validation text the search never saw; the plan records
   both measurements and whether both meet the tolerance.

Candidates run the target format's arithmetic natively where the device has a hardware path for it, else emulated
in float32 (``half_arithmetic="auto"``, :mod:`hyprec.precision.emulation`): the same verdicts at float32 speed
instead of a float16 GEMM at ~0.2x of it. The plan records which (``search.arithmetic``: ``float16 emulated``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hyprec.dtypes import FP16_MAX
from hyprec.engine.base import ModelEngine
from hyprec.errors import InvalidInputError
from hyprec.precision.attention_bounds import fp16_attention_check
from hyprec.precision.casting import apply_plan
from hyprec.precision.emulation import describe_arithmetic, emulated_formats
from hyprec.precision.plan import PrecisionPlan, model_fingerprint, plan_layer
from hyprec.precision.policy import plan_policy
from hyprec.tools.check import RISK_MARGIN, default_calibration_texts, record_activity
from hyprec.tools.measure import open_model, row_cosines, token_ids

log = logging.getLogger("hyprec")
TARGETS = ("float16", "bfloat16")
DEFAULT_TOLERANCE = {"generation": 0.995, "embedding": 0.9999}
METRIC = {"generation": "top1_agreement", "embedding": "min_cosine"}
EDGES = "edges"  # the search unit holding the embeddings and the output head


# ------------------------------------------------------------------ reference and metrics


class _Reference:
    """Float32 reference outputs on fixed inputs (texts, or token-id lists), and the metric of the engine's
    current model on them."""

    def __init__(self, engine: ModelEngine, inputs: list[str] | list[list[int]], max_tokens: int):
        self.engine = engine
        self.texts = inputs if isinstance(inputs[0], str) else None
        if engine.generative:
            self.ids = [x for x in token_ids(engine, inputs, max_tokens) if len(x) >= 2]
            if not self.ids:
                raise InvalidInputError("repair: every calibration input is shorter than 2 tokens")
            self.scores = [engine.score(x, allow_nonfinite=True) for x in self.ids]
        else:
            self.ids = token_ids(engine, inputs)
            self.embeddings = self._embed()

    def _embed(self) -> np.ndarray:
        """The model's embeddings of the texts; for token-id inputs, mean-pooled last hidden states."""
        if self.texts is not None:
            return self.engine.embed(self.texts, allow_nonfinite=True)
        hidden = self.engine.hidden_states(self.ids)
        return torch.stack([h.mean(0) for h in hidden]).numpy()

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    def measure(self) -> dict[str, float]:
        """The current model against the reference."""
        if self.engine.generative:
            agree = total = bad = 0
            nll = ref_nll = 0.0
            for ids, ref in zip(self.ids, self.scores, strict=True):
                scores = self.engine.score(ids, allow_nonfinite=True)
                agree += int(((scores.argmax == ref.argmax) & scores.finite).sum())
                total += len(ref.argmax)
                bad += int((~scores.finite).sum())
                nll += scores.nll()
                ref_nll += ref.nll()
            ppl_ratio = math.exp((nll - ref_nll) / total) if not bad else float("nan")
            return {"top1_agreement": agree / total, "ppl_ratio": ppl_ratio, "non_finite": bad, "tokens": total}
        cos = row_cosines(self._embed(), self.embeddings)
        bad = int((~np.isfinite(cos)).sum())
        return {
            "min_cosine": float(np.nanmin(cos)) if not bad else float("nan"),
            "mean_cosine": float(np.nanmean(cos)),
            "non_finite": bad,
        }


def _input_hash(inputs: list[str] | list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


# ------------------------------------------------------------------ scales


def _scale_log2(peak: float) -> int:
    """The power of two (<= 0) that brings ``peak`` below float16's maximum with the check's safety margin."""
    if not math.isfinite(peak) or peak * RISK_MARGIN < FP16_MAX:
        return 0
    return -math.ceil(math.log2(peak * RISK_MARGIN / FP16_MAX))


def choose_scales(model: torch.nn.Module, rows: list[Any], target: str) -> tuple[int, list[int]]:
    """Residual-stream and per-layer FFN power-of-two scales from float32 calibration activity."""
    layers = len(model.blocks())
    if target != "float16":
        return 0, [0] * layers  # bfloat16 has float32's range: nothing to rescale
    residual = _scale_log2(max(r.residual for r in rows)) if model.residual_stream() is not None else 0
    ffn = [
        _scale_log2(row.ffn) if model.ffn_up(block) is not None else 0
        for block, row in zip(model.blocks(), rows[1:], strict=True)
    ]
    return residual, ffn


# ------------------------------------------------------------------ search


@dataclass(frozen=True)
class _Base:
    """What every candidate plan of one search shares."""

    model: dict[str, str]  # name, architecture, fingerprint
    target: str  # the half format fast units move to
    residual: int  # residual-stream scale (log2)
    ffn: list[int]  # per-layer FFN scales (log2)
    num_layers: int
    safe_attention: str  # the attention format of units kept out of the target


@dataclass
class _Trial:
    units: list[str]
    metrics: dict[str, float]
    accepted: bool


class _Search:
    """Builds candidate plans over one float32 master model and validates them in the engine."""

    def __init__(
        self, engine: ModelEngine, master: torch.nn.Module, base: _Base, tolerance: float, metric: str, margin: float
    ):
        self.engine, self.master, self.base = engine, master, base
        self.tolerance, self.metric, self.margin = tolerance, metric, margin
        self.trials: list[_Trial] = []
        self.arithmetic: set[str] = set()  # how candidates ran each half format: "float16 emulated", ...

    def plan(self, fast: set[str]) -> PrecisionPlan:
        b = self.base
        safe = plan_layer("float32", b.safe_attention)
        # A fast layer attends in float16 whenever float16 is certified for q/k/v, even under a bfloat16 target:
        # the fused kernel is no faster in bfloat16, and float16 keeps 3 more mantissa bits of q, k and v.
        attention = "float16" if b.safe_attention == "float16" else b.target
        fast_layer = plan_layer(b.target, attention)
        layers = [fast_layer if str(i) in fast else safe for i in range(b.num_layers)]
        return PrecisionPlan(
            model=b.model,
            target=b.target,
            residual_scale_log2=b.residual,
            ffn_scale_log2=b.ffn,
            layers=layers,
            edges=b.target if EDGES in fast else "float32",
        )

    def install(self, plan: PrecisionPlan) -> None:
        """Run the engine on ``plan`` applied to a copy of the float32 master (a reload would read the weights again
        for every candidate)."""
        engine, policy = self.engine, plan_policy(plan)
        emulated = emulated_formats(engine.engine_config.half_arithmetic, policy, engine.device)
        self.arithmetic.update(describe_arithmetic(policy, emulated))
        engine.with_policy(policy, apply_plan(plan, copy.deepcopy(self.master), emulated=emulated))

    def passes(self, metrics: dict[str, float], margin: float = 0.0) -> bool:
        value = metrics[self.metric]
        return math.isfinite(value) and value >= self.tolerance + margin and not metrics.get("non_finite")

    def validate(self, fast: set[str], ref: _Reference, segment: list[str], bar: tqdm) -> bool:
        self.install(self.plan(fast))
        metrics = ref.measure()
        ok = self.passes(metrics, self.margin)
        self.trials.append(_Trial(segment, metrics, ok))
        bar.update(1)
        bar.set_postfix_str(f"{len(fast)} units fast, {self.metric} {metrics[self.metric]:.5f}")
        verdict = "accept" if ok else "reject"
        log.info("repair: %s %s -> %s %.6f", verdict, _label(segment), self.metric, metrics[self.metric])
        return ok

    def run(self, units: list[str], ref: _Reference, show_progress: bool) -> set[str]:
        """ONNX Runtime's greedy segment search: the largest undecided segment first; accept or bisect."""
        good: set[str] = set()
        queue = [units]
        with tqdm(desc="repair", unit="validation", disable=not show_progress) as bar:
            while queue:
                queue.sort(key=len)
                segment = queue.pop()
                if self.validate(good | set(segment), ref, segment, bar):
                    good |= set(segment)
                elif len(segment) > 1:
                    half = len(segment) // 2
                    queue += [segment[:half], segment[half:]]
        return good


def _label(units: list[str]) -> str:
    names = [f"layer {u}" if u.isdigit() else u for u in units]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]} ({len(names)} units)"


# ------------------------------------------------------------------ entry point


def repair(
    model: Any = None,
    *,
    target: str = "float16",
    tolerance: float | None = None,
    texts: list[str] | list[list[int]] | None = None,
    validation_texts: list[str] | list[list[int]] | None = None,
    max_tokens: int = 256,
    search_margin: float | None = None,
    device: str = "cpu",
    show_progress: bool = False,
    half_arithmetic: str = "auto",
) -> PrecisionPlan:
    """Search a precision plan for ``model`` (a name/path as :class:`hyprec.LLM` takes).

    Args:
        target: the half format to move layers to: ``float16`` or ``bfloat16``.
        tolerance: the least acceptable teacher-forced top-1 agreement with float32 (decoders, default 0.995) or
            the least cosine similarity of any embedding to its float32 value (encoders, default 0.9999).
        texts: calibration texts the search validates on (default: built-in real text), or token-id lists.
        validation_texts: held-out texts for the final measurement (default: built-in text disjoint from the
            built-in calibration text; the calibration texts themselves when only ``texts`` is given).
        max_tokens: tokens per calibration text (decoders).
        search_margin: the search accepts a candidate only at ``tolerance + search_margin`` (default: one standard
            error of the top-1 rate over the search text for decoders, 0 for encoders); the final plan is judged
            against ``tolerance`` itself, on the search text and on held-out text.
        half_arithmetic: how candidates compute in half precision: ``auto`` (emulated in float32 where the device
            has no hardware path for a format, else native), ``native`` or ``emulated``.
    """
    if target not in TARGETS:
        raise InvalidInputError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    start_time = time.perf_counter()
    # Just enough KV cache for one calibration text: candidates rebuild it at every validation. Float32 GEMMs: the
    # reference is float32 itself, and candidates (deep copies of this model) must compute from their own weights,
    # not from bfloat16 parts of the float32 ones.
    engine = open_model(
        model,
        dtype="float32",
        matmul_precision="highest",
        device=device,
        precision_guard=False,
        max_model_len=max_tokens,
        num_kv_blocks=-(-max_tokens // 16) + 1,
        half_arithmetic=half_arithmetic,
    )
    kind = "generation" if engine.generative else "embedding"
    metric = METRIC[kind]
    tolerance = DEFAULT_TOLERANCE[kind] if tolerance is None else float(tolerance)
    if not 0 < tolerance <= 1:
        raise InvalidInputError(f"tolerance={tolerance!r}: expected a {metric} in (0, 1]")
    texts, validation_texts = _split_texts(engine.generative, texts, validation_texts)

    master = engine.model
    with record_activity(master) as rows:
        calibration = _Reference(engine, texts, max_tokens)
    validation = _Reference(engine, validation_texts, max_tokens)
    residual, ffn = choose_scales(master, rows, target)
    safe, why = fp16_attention_check(master)
    info = engine.info()
    base = _Base(
        model={
            "name": str(info["model"]),
            "architecture": str(info["architecture"]),
            "fingerprint": model_fingerprint(master),
        },
        target=target,
        residual=residual,
        ffn=ffn,
        num_layers=len(master.blocks()),
        safe_attention="float16" if safe else "bfloat16",
    )
    if search_margin is None:
        # One standard error of an agreement rate near the tolerance over the search text's predictions: a plan
        # that just scrapes past the tolerance on the search text tends to miss it on unseen text.
        positions = calibration.tokens - len(calibration.ids)
        search_margin = math.sqrt(tolerance * (1 - tolerance) / positions) if engine.generative else 0.0
    search = _Search(engine, master, base, tolerance, metric, float(search_margin))
    with tqdm(desc="repair: baseline", unit="validation", disable=not show_progress) as bar:
        if not search.validate(set(), calibration, ["no layer (hybrid baseline)"], bar):
            # hybrid itself misses the tolerance: safe layers go all-float32
            search.base = replace(base, safe_attention="float32")
            why = "hybrid attention misses the tolerance"
    units = [EDGES] + [str(i) for i in range(base.num_layers)]
    fast = search.run(units, calibration, show_progress)

    plan = search.plan(fast)
    search.install(plan)
    measured_cal, measured_val = calibration.measure(), validation.measure()
    plan.tolerance = {"metric": metric, "min": tolerance, "search_margin": round(search.margin, 6)}
    plan.calibration = {
        "sha256": _input_hash(texts),
        "texts": len(texts),
        "tokens": calibration.tokens,
        "validation_sha256": _input_hash(validation_texts),
        "validation_texts": len(validation_texts),
        "validation_tokens": validation.tokens,
    }
    plan.measured = {
        "calibration": measured_cal,
        "validation": measured_val,
        "meets_tolerance": search.passes(measured_cal) and search.passes(measured_val),
    }
    plan.search = {
        "method": "greedy segment search with bisection, validated end to end (ONNX Runtime AMP style)",
        "validations": len(search.trials),
        "seconds": round(time.perf_counter() - start_time, 1),
        "kept_out": [u for u in units if u not in fast],
        "safe_layers": f"float32 weights, {search.base.safe_attention} attention ({why})",
        "peak_residual_float32": max(r.residual for r in rows),
        "arithmetic": ", ".join(sorted(search.arithmetic)) or "float32 only",
        "trials": [
            {"units": _label(t.units), "accepted": t.accepted, metric: t.metrics[metric]} for t in search.trials
        ],
    }
    return plan


def _split_texts(generative: bool, texts: list | None, validation_texts: list | None) -> tuple[list, list]:
    """Calibration and held-out inputs: alternate items of the built-in text unless the caller gives them."""
    if texts is None:
        # 16 pages (8 to search on, 8 held out): top-1 agreement over ~2,000 tokens has a standard error of ~0.0016
        # near 0.995, small enough for the default tolerance's budget.
        pool = default_calibration_texts(generative, 16)
        texts, held_out = pool[0::2], pool[1::2]
        validation_texts = validation_texts if validation_texts is not None else held_out
    if validation_texts is None:
        validation_texts = texts
    for name, group in (("texts", texts), ("validation_texts", validation_texts)):
        ok = (
            isinstance(group, list)
            and group
            and (
                all(isinstance(t, str) for t in group)
                or all(isinstance(t, list) and t and all(isinstance(i, int) for i in t) for t in group)
            )
        )
        if not ok:
            raise InvalidInputError(f"repair: {name} must be a non-empty list of strings or of token-id lists")
    return list(texts), list(validation_texts)


def render(plan: PrecisionPlan) -> str:
    """Human-readable summary: what moved, the search's trials, and the measured error."""
    metric = plan.tolerance["metric"]
    lines = [
        f"model        {plan.model['name']} ({plan.model['architecture']})",
        f"plan         {plan.summary()}",
        f"tolerance    {metric} >= {plan.tolerance['min']} (search: + {plan.tolerance.get('search_margin', 0):.4g})",
        f"kept out     {', '.join(plan.search['kept_out']) or 'nothing'} ({plan.search['safe_layers']})",
        f"search       {plan.search['validations']} validations in {plan.search['seconds']} s"
        + (f" (half precision: {plan.search['arithmetic']})" if "arithmetic" in plan.search else ""),
    ]
    for trial in plan.search["trials"]:
        lines.append(f"  {'accept' if trial['accepted'] else 'reject'}  {trial['units']:<36} {trial[metric]:.5f}")
    for split in ("calibration", "validation"):
        values = ", ".join(f"{k} {v:.6g}" for k, v in plan.measured[split].items())
        lines.append(f"{split:<13}{values}")
    lines.append(f"meets tolerance on both: {'yes' if plan.measured['meets_tolerance'] else 'NO'}")
    return "\n".join(lines)
