"""``hyprec check``: will this model overflow in half precision? A report without any reference library.

Two kinds of evidence:

1. **Weights only**: the checkpoint dtype, the norm gains feeding attention, and a worst-case bound on q/k/v for
   any input (:mod:`hyprec.precision.attention_bounds`).
2. **Calibration**: one float32 pass over real text, recording per layer the largest |x| of the residual stream,
   the FFN intermediate, q/k/v as they reach the attention cast, and the attention logits ``q.k * scale``.

Each policy is judged on what it actually stores in half precision: whole-model float16/bfloat16 store everything
(residual stream, FFN, q/k/v); hybrid stores only q/k/v (the fused kernel keeps logits and softmax statistics in
float32). A value at or above the format's maximum *fails*; within ``margin`` of it is *at risk* (calibration text
is a sample, not the worst case); otherwise *safe*.

A model with non-finite weights, or whose float32 calibration pass produces NaN/inf, fails under every policy
(float32 included): the report names the tensors and layers, and ``hyprec check`` exits non-zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyprec.dtypes import BF16_MAX, FP16_MAX
from hyprec.engine.base import ModelEngine
from hyprec.errors import NonFiniteOutputError
from hyprec.layers.attention import Attention, AttentionMetadata
from hyprec.precision.attention_bounds import attention_input_bounds, norm_affine
from hyprec.tools.measure import open_model, token_ids

RISK_MARGIN = 8.0
LOGIT_ERROR_AT_RISK = 1.0  # estimated absolute logit error from rounding q/k
POLICIES = ("float16", "bfloat16", "hybrid-fp16", "hybrid-bf16")
MAX_LISTED = 10  # non-finite tensors listed in the text report
#: The reason whole-model bfloat16 is at risk for every language model (measured in docs/fp16-study.md).
WHOLE_BF16_DECODER = (
    "language model in whole-model bfloat16: every activation keeps 8 significant bits, and next-token choices "
    "drift from float32 (docs/fp16-study.md: top-1 agreement 0.983-0.996 on 57 trained decoder checkpoints, below "
    "0.99 on 24; Gemma-3-270M 0.979); hybrid-bf16 keeps float32 activations (0.995-1.000 on the same checkpoints)"
)


@dataclass
class LayerActivity:
    """Largest magnitudes seen in one layer during calibration, plus its weight-only facts."""

    layer: str
    residual: float = 0.0  # residual stream after the layer (the embedding output for the first row)
    ffn: float = 0.0  # FFN intermediate (input of the down projection)
    q: float = 0.0
    k: float = 0.0
    v: float = 0.0
    logits: float = 0.0  # max |q.k| * softmax scale
    qkv_bound: float | None = None  # weight-only worst case for q/k/v
    norm_gain: float | None = None  # max |gain| of the norm feeding q/k/v

    @property
    def attention_inputs(self) -> float:
        return _fold(_fold(self.q, self.k), self.v)


@dataclass
class NonFinite:
    """A weight or calibration statistic that is NaN or infinite."""

    layer: str  # "layer 3", "embeddings/head" (weights outside the layers), "output"
    tensor: str  # the weight's name, or the recorded quantity ("residual", "q", "logits", ...)
    detail: str  # "12 NaN, 0 inf of 147456 values", "max |x| nan on calibration text"

    def __str__(self) -> str:
        return f"{self.tensor} ({self.layer}): {self.detail}"


@dataclass
class Verdict:
    verdict: str  # safe | at-risk | fails
    reason: str
    layer: str | None = None
    quantity: str | None = None
    value: float | None = None
    limit: float | None = None


@dataclass
class CheckReport:
    model: str
    architecture: str
    checkpoint_dtype: str
    calibration_texts: int
    calibration_tokens: int
    layers: list[LayerActivity]
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    recommended: str = "float32"
    non_finite: list[NonFinite] = field(default_factory=list)  # non-empty: the model is broken in any precision

    def as_dict(self) -> dict[str, Any]:
        """The report as strict JSON-ready data: NaN/inf statistics become ``None`` (``non_finite`` says which)."""
        out = _finite_or_none(asdict(self))
        out["limits"] = {"float16": FP16_MAX, "bfloat16": BF16_MAX, "risk_margin": RISK_MARGIN}
        return out


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _amax(x: torch.Tensor) -> float:
    return float(x.detach().abs().max().float()) if x.numel() else 0.0


def _fold(a: float, b: float) -> float:
    """``max`` that keeps NaN: Python's ``max(0.0, nan)`` is 0.0, which would hide a NaN activation."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _logit_amax(q: torch.Tensor, k: torch.Tensor, meta: AttentionMetadata, scale: float) -> float:
    """Max |q.k| * scale within each sequence of a cache-less or single-pass prefill batch (causal if decoding)."""
    worst = 0.0
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(meta.queries.cu[:-1].tolist(), meta.queries.cu[1:].tolist(), strict=True):
        qs = q[start:end].float()
        ks = k[start:end].float().repeat_interleave(groups, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if meta.causal:
            s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), 0.0)
        worst = _fold(worst, _amax(s))
    return worst


@contextmanager
def record_activity(model: nn.Module) -> Iterator[list[LayerActivity]]:
    """Hooks recording per-layer maxima while the block runs; yields the list they fill (embeddings first)."""
    blocks = model.blocks()
    rows = [LayerActivity("embeddings")] + [LayerActivity(f"layer {i}") for i in range(len(blocks))]
    handles = []

    def on_block_input(row: LayerActivity):
        return lambda _m, args: setattr(row, "residual", _fold(row.residual, _amax(args[0])))

    def on_block_output(row: LayerActivity):
        return lambda _m, _args, out: setattr(row, "residual", _fold(row.residual, _amax(out)))

    def on_ffn(row: LayerActivity):
        return lambda _m, args: setattr(row, "ffn", _fold(row.ffn, _amax(args[0])))

    def on_attention(row: LayerActivity, attn: Attention):
        def hook(_m, args):
            q, k, v, meta = args
            row.q, row.k, row.v = _fold(row.q, _amax(q)), _fold(row.k, _amax(k)), _fold(row.v, _amax(v))
            row.logits = _fold(row.logits, _logit_amax(q, k, meta, attn.scale))

        return hook

    handles.append(blocks[0].register_forward_pre_hook(on_block_input(rows[0])))
    for block, row in zip(blocks, rows[1:], strict=True):
        handles.append(block.register_forward_hook(on_block_output(row)))
        handles.append(model.ffn_down(block).register_forward_pre_hook(on_ffn(row)))
        attn = next(m for m in block.modules() if isinstance(m, Attention))
        handles.append(attn.register_forward_pre_hook(on_attention(row, attn)))
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def add_weight_facts(model: nn.Module, rows: list[LayerActivity]) -> None:
    """Each layer's weight-only facts on its calibration row: the q/k/v bound and the largest norm gain."""
    for row, bound, item in zip(rows[1:], attention_input_bounds(model), model.attention_inputs(), strict=True):
        row.qkv_bound = bound.bound
        row.norm_gain = float(norm_affine(item.norm)[0].abs().max())


@torch.no_grad()
def non_finite_weights(model: nn.Module) -> list[NonFinite]:
    """Every parameter and buffer of ``model`` holding NaN or inf, with the layer it belongs to."""
    layer_of = {
        id(t): f"layer {i}" for i, block in enumerate(model.blocks()) for t in [*block.parameters(), *block.buffers()]
    }
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        if nan or inf:
            detail = f"{nan} NaN, {inf} inf of {tensor.numel()} values"
            found.append(NonFinite(layer_of.get(id(tensor), "embeddings/head"), name, detail))
    return found


def non_finite_activity(rows: list[LayerActivity]) -> list[NonFinite]:
    """Calibration statistics that are NaN or inf (the float32 pass itself broke down)."""
    quantities = ("residual", "ffn", "q", "k", "v", "logits", "qkv_bound", "norm_gain")
    return [
        NonFinite(row.layer, name, f"max |x| {value} on calibration text" if name != "qkv_bound" else f"{value}")
        for row in rows
        for name in quantities
        if (value := getattr(row, name)) is not None and not math.isfinite(value)
    ]


def _judge(rows: list[LayerActivity], quantities: tuple[str, ...], limit: float, label: str) -> Verdict:
    """The first layer reaching ``limit`` (fails), else the first within the risk margin, else safe."""

    def first(threshold: float) -> tuple[LayerActivity, str, float] | None:
        for row in rows:
            for name in quantities:
                value = getattr(row, name)
                if value >= threshold or not math.isfinite(value):
                    return row, name, value
        return None

    if hit := first(limit):
        row, name, value = hit
        peak_value, peak_layer = max((getattr(r, name), r.layer) for r in rows)
        return Verdict(
            "fails",
            f"{name} reaches {value:.4g} at {row.layer}, beyond the {label} maximum {limit:.6g} "
            f"(peak {peak_value:.4g} at {peak_layer})",
            row.layer,
            name,
            value,
            limit,
        )
    if hit := first(limit / RISK_MARGIN):
        row, name, value = hit
        return Verdict(
            "at-risk",
            f"{name} reaches {value:.4g} at {row.layer}, within {RISK_MARGIN:g}x of the {label} maximum {limit:.6g}",
            row.layer,
            name,
            value,
            limit,
        )
    worst = max((getattr(r, n), r.layer, n) for r in rows for n in quantities)
    return Verdict(
        "safe",
        f"largest {worst[2]} {worst[0]:.4g} ({worst[1]}) is below {label} maximum / {RISK_MARGIN:g}",
        worst[1],
        worst[2],
        worst[0],
        limit,
    )


def _logit_precision(rows: list[LayerActivity], unit_roundoff: float, label: str) -> Verdict | None:
    """Rounding q and k to a half format perturbs a logit ``q.k`` by about ``2 * u * |q.k|``; past ~1 the softmax
    weights are off by a factor e. Range is fine (the fused kernel forms logits in float32); precision is not."""
    worst, layer = max((r.logits, r.layer) for r in rows)
    error = 2 * unit_roundoff * worst
    if error <= LOGIT_ERROR_AT_RISK:
        return None
    return Verdict(
        "at-risk",
        f"attention logits reach {worst:.4g} at {layer}: rounding q/k to {label} shifts them by up to ~{error:.2g}",
        layer,
        "logits",
        worst,
        LOGIT_ERROR_AT_RISK / (2 * unit_roundoff),
    )


def judge(rows: list[LayerActivity], non_finite: list[NonFinite] | None = None) -> tuple[dict[str, Verdict], str]:
    """Verdict per policy, and the recommended policy (the first safe one of hybrid-fp16, hybrid-bf16).

    ``non_finite``: every NaN/inf finding (default: the non-finite statistics in ``rows``). Any fails every
    policy, and the recommendation is then ``none``: no dtype repairs NaN weights.
    """
    problems = non_finite_activity(rows) if non_finite is None else non_finite
    if problems:
        first = problems[0]
        more = f" (+{len(problems) - 1} more non-finite)" if len(problems) > 1 else ""
        reason = f"non-finite {first}{more}: every precision, float32 included, computes NaN/inf"
        return {p: Verdict("fails", reason, first.layer, first.tensor) for p in POLICIES}, "none"
    whole = ("q", "k", "v", "ffn", "residual")  # computation order within a layer: blame the first to overflow
    attn = ("q", "k", "v")
    verdicts = {
        "float16": _judge(rows, whole, FP16_MAX, "float16"),
        "bfloat16": _judge(rows, whole, BF16_MAX, "bfloat16"),
        "hybrid-fp16": _judge(rows, attn, FP16_MAX, "float16"),
        "hybrid-bf16": _judge(rows, attn, BF16_MAX, "bfloat16"),
    }
    bounds = [r.qkv_bound for r in rows if r.qkv_bound is not None]
    if bounds and max(bounds) < FP16_MAX / RISK_MARGIN and verdicts["hybrid-fp16"].verdict != "fails":
        verdicts["hybrid-fp16"] = Verdict(
            "safe",
            f"weights bound every q/k/v by {max(bounds):.4g} for any input (certified)",
            quantity="qkv_bound",
            value=max(bounds),
            limit=FP16_MAX,
        )
    for policy, (u, label) in {
        "float16": (2**-11, "float16"),
        "hybrid-fp16": (2**-11, "float16"),
        "bfloat16": (2**-8, "bfloat16"),
        "hybrid-bf16": (2**-8, "bfloat16"),
    }.items():
        precision = _logit_precision(rows, u, label)
        if precision is not None and verdicts[policy].verdict == "safe":
            verdicts[policy] = precision
    recommended = next((p for p in ("hybrid-fp16", "hybrid-bf16") if verdicts[p].verdict == "safe"), "float32")
    return verdicts, recommended


def default_calibration_texts(generative: bool, n: int = 8) -> list[str]:
    """Built-in real text: the ``n`` longest pydoc pages for decoders (activations grow with context), ``8 * n``
    texts of the evaluation mix (long, medium and very short) for encoders."""
    from hyprec.texts import evaluation_texts, pydoc_topics

    if generative:
        return sorted(pydoc_topics().values(), key=len, reverse=True)[:n]
    return evaluation_texts(8 * n)


@torch.no_grad()
def calibrate(
    engine: ModelEngine, texts: list[str], max_tokens: int = 256, *, errors: list[NonFinite] | None = None
) -> tuple[list[LayerActivity], int]:
    """Run ``texts`` through a loaded engine with recording hooks; returns the rows and the token count.

    A pass whose outputs are NaN/inf is recorded in ``errors`` (when given) and ends the calibration: the rows keep
    what the hooks saw up to it. Without ``errors`` it raises :class:`NonFiniteOutputError`.
    """
    with record_activity(engine.model) as rows:
        ids = token_ids(engine, texts, max_tokens if engine.generative else None)
        if engine.generative:
            passes = [functools.partial(engine.score, seq, allow_nonfinite=True) for seq in ids if len(seq) >= 2]
        else:
            passes = [functools.partial(engine.hidden_states, ids[s : s + 16]) for s in range(0, len(ids), 16)]
        for run in passes:
            result = run()
            # Decoders' logits are outputs a user would get; encoders' hidden states feed pooling, and their NaN/inf
            # show in the recorded activity.
            if not engine.generative or result.finite.all():
                continue
            first = int((~result.finite).nonzero()[0])
            message = f"non-finite logits at position {first} under policy {engine.policy.name}"
            if errors is None:
                raise NonFiniteOutputError(message)
            errors.append(NonFinite("output", "logits", message))
            break
    return rows, sum(len(s) for s in ids)


def check(model: Any = None, texts: list[str] | None = None, *, device: str = "cpu") -> CheckReport:
    """Precision risk report for ``model`` (a name/path as :class:`hyprec.LLM` takes, or a loaded float32 engine or
    LLM).

    The model runs in float32 for calibration, so the recorded magnitudes are the true ones.
    """
    # No run-time guard: calibration measures what float32 computes, NaN included, rather than falling back.
    engine = open_model(model, dtype="float32", device=device, precision_guard=False)
    texts = texts if texts is not None else default_calibration_texts(engine.generative)
    problems = non_finite_weights(engine.model)
    rows, tokens = calibrate(engine, texts, errors=problems)
    add_weight_facts(engine.model, rows)
    problems += non_finite_activity(rows)
    info = engine.info()
    report = CheckReport(
        model=str(info["model"]),
        architecture=str(info["architecture"]),
        checkpoint_dtype=str(info["checkpoint_dtype"]),
        calibration_texts=len(texts),
        calibration_tokens=tokens,
        layers=rows,
        non_finite=problems,
    )
    report.verdicts, report.recommended = judge(rows, problems)
    apply_model_rules(report.verdicts, report.checkpoint_dtype, engine.generative)
    return report


def apply_model_rules(verdicts: dict[str, Verdict], checkpoint_dtype: str, generative: bool) -> None:
    """Rules from what the model is rather than from its activations, applied to verdicts still ``safe``:

    * a bfloat16 checkpoint was trained in bfloat16's range: float16 is at risk beyond the calibration text;
    * whole-model bfloat16 on a language model is at risk from precision, not range: rounding every activation to
      8 significant bits moves next-token choices although nothing approaches a limit. Evidence: the fp16 training
      study (``docs/fp16-study.md``), where it changed 0.4-1.7% of the top-1 choices of every trained decoder
      checkpoint, in every configuration, while the range and logit rules called 48 of the 54 measured before this
      rule safe; encoders' pooled embeddings kept cosines above 0.99998 to float32, so the rule leaves them alone.
    """
    if checkpoint_dtype == "bfloat16" and verdicts["float16"].verdict == "safe":
        verdicts["float16"] = Verdict(
            "at-risk",
            "bfloat16 checkpoint: trained in bfloat16's range; the calibration text stayed below the float16 limit",
        )
    if generative and verdicts["bfloat16"].verdict == "safe":
        verdicts["bfloat16"] = Verdict("at-risk", WHOLE_BF16_DECODER, quantity="precision")


def render(report: CheckReport) -> str:
    """The human-readable report: a per-layer table, then one verdict per policy."""

    def fmt(x: float | None) -> str:
        return "-" if x is None or x == 0 else f"{x:.4g}"

    lines = [
        f"model              {report.model} ({report.architecture}, checkpoint {report.checkpoint_dtype})",
        f"calibration        {report.calibration_texts} texts, {report.calibration_tokens} tokens (float32 pass)",
        f"limits             float16 {FP16_MAX:.6g}, bfloat16 {BF16_MAX:.4g}; at risk within {RISK_MARGIN:g}x",
        "",
        f"{'layer':<12}{'residual':>11}{'ffn':>11}{'q/k/v':>11}{'logits':>11}{'qkv bound':>11}{'norm gain':>11}",
    ]
    for r in report.layers:
        lines.append(
            f"{r.layer:<12}{fmt(r.residual):>11}{fmt(r.ffn):>11}{fmt(r.attention_inputs):>11}{fmt(r.logits):>11}"
            f"{fmt(r.qkv_bound):>11}{fmt(r.norm_gain):>11}"
        )
    lines.append("")
    if report.non_finite:
        lines.append(f"NON-FINITE   {len(report.non_finite)} weights or statistics are NaN or inf:")
        lines += [f"  {problem}" for problem in report.non_finite[:MAX_LISTED]]
        if len(report.non_finite) > MAX_LISTED:
            lines.append(f"  ... and {len(report.non_finite) - MAX_LISTED} more (--json lists all)")
        lines.append("")
    for policy in POLICIES:
        v = report.verdicts[policy]
        lines.append(f"{policy:<13}{v.verdict:<9}{v.reason}")
    lines.append(f"recommended  {report.recommended}")
    return "\n".join(lines)


def plot(report: CheckReport, path: str) -> None:
    """A per-layer chart of max |x| (log scale) against the float16 limit, written as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from hyprec.errors import InvalidInputError

        raise InvalidInputError("--plot needs matplotlib: pip install 'hyprec[plot]'") from None
    names = [r.layer for r in report.layers]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.45), 4))
    for field_name, label in (
        ("residual", "residual stream"),
        ("ffn", "FFN intermediate"),
        ("q", "q"),
        ("k", "k"),
        ("v", "v"),
    ):
        values = [getattr(r, field_name) or float("nan") for r in report.layers]  # not measured: no point
        ax.plot(range(len(names)), values, marker="o", markersize=3, label=label)
    ax.axhline(FP16_MAX, color="red", linestyle="--", label="float16 max (65504)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("max |x| on calibration text")
    ax.set_title(f"{Path(report.model).name}: recommended {report.recommended}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
