"""``hyprec compare``: how far does each dtype policy drift from a reference, on real text?

Embedding models: mean/min cosine, max abs diff, top-k neighbour overlap and top-1 neighbour agreement against
sentence-transformers float32 or hyprec float32. Cross-encoders (one-label classifiers), on queries x documents:
max abs score difference, Kendall tau of each query's reranked order, top-k overlap and top-1 agreement of that
order, against sentence-transformers' ``CrossEncoder`` float32 or hyprec float32. Generative models: teacher-forced
top-1 agreement, mean KL divergence, perplexity ratio, non-finite logits, greedy identical-prefix lengths and
vLLM-style top-5 logprob closeness against transformers float32 or hyprec float32. Throughput (texts/s, pairs/s or
tokens/s) per policy.

Policies run with the precision guard off: the point is to see what each format does on its own. Half precision
is emulated in float32 where the device has no hardware path for it (``half_arithmetic="auto"``,
:mod:`hyprec.precision.emulation`: the same numbers to within a few units of roundoff, at float32 speed); each row
says which arithmetic it ran (``arithmetic``: native or emulated), and its speed is that arithmetic's.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hyprec.engine.base import ModelEngine
from hyprec.engine.classifier_engine import ClassifierEngine
from hyprec.engine.scoring import score_logits
from hyprec.errors import InvalidInputError
from hyprec.precision.emulation import arithmetic
from hyprec.sampling_params import SamplingParams
from hyprec.tools.measure import POLICY_ARGS, open_policy, row_cosines, token_ids

REFERENCES = ("float32", "sentence-transformers", "transformers")
TOP_K = 10
GREEDY_TOKENS = 48
TEXT_TOKENS = 256


#: The references each kind of model is compared against.
KIND_REFERENCES = {
    "embedding": ("float32", "sentence-transformers"),
    "cross-encoder": ("float32", "sentence-transformers"),
    "generation": ("float32", "transformers"),
}


@dataclass
class CompareReport:
    model: str
    kind: str  # embedding | cross-encoder | generation
    reference: str
    texts: int  # cross-encoders: the documents each query is scored against
    rows: list[dict[str, Any]] = field(default_factory=list)
    queries: int = 0  # cross-encoders

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "reference": self.reference,
            "texts": self.texts,
            **({"queries": self.queries} if self.queries else {}),
            "rows": self.rows,
        }

    def markdown(self) -> str:
        if not self.rows:
            return ""
        keys = list(self.rows[0])
        inputs = f"{self.queries} queries x {self.texts} documents" if self.queries else f"{self.texts} texts"
        lines = [
            f"{self.model}: {self.kind}, {inputs}, reference {self.reference}",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row[k]) for k in keys) + " |")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _row_start(engine: ModelEngine) -> dict[str, Any]:
    """The first columns of a policy's row: its name and the arithmetic it ran in."""
    return {"policy": engine.policy.name, "arithmetic": arithmetic(engine.model)}


def _policy_rows(
    load: Callable[[str], ModelEngine],
    policies: list[str],
    run: Callable[[ModelEngine], np.ndarray],
    metrics: Callable[[np.ndarray], dict[str, Any]],
    count: int,
    unit: str,
) -> list[dict[str, Any]]:
    """A row per policy: ``run`` on the engine ``load(policy)`` opens, the ``metrics`` of what it gave, and its
    throughput (``count`` ``unit`` over the seconds ``run`` took)."""
    rows = []
    for policy in policies:
        engine = load(policy)
        start = time.perf_counter()
        out = run(engine)
        seconds = time.perf_counter() - start
        rows.append({**_row_start(engine), **metrics(out), f"{unit}_per_s": count / seconds})
    return rows


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The mean over rows of the share of their first ``k`` entries two index arrays have in common."""
    return float(np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b, strict=True)]))


# ------------------------------------------------------------------ embeddings


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    x = x.astype(np.float64) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def embedding_metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    cos = row_cosines(a, b)
    k = min(TOP_K, len(a) - 1)
    na, nb = _neighbours(a, k), _neighbours(b, k)
    overlap = _overlap(na, nb, k) if k else 1.0
    return {
        "mean_cos": float(np.nanmean(cos)),
        "min_cos": float(np.nanmin(cos)) if np.isfinite(cos).any() else float("nan"),
        "max_abs_diff": float(np.abs(a - b).max()),
        f"top{k}_overlap": float(overlap),
        "top1_agreement": float((na[:, 0] == nb[:, 0]).mean()) if k else 1.0,
        "non_finite": int((~np.isfinite(a)).any(axis=1).sum()),
    }


def _compare_embeddings(load: Callable, ref_engine: ModelEngine, policies: list[str], reference: str, texts: list[str]):
    if reference == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(ref_engine.model_dir), device=str(ref_engine.device))
        ref = st.encode(texts, convert_to_numpy=True)
    else:
        ref = ref_engine.embed(texts)
    return _policy_rows(
        load,
        policies,
        lambda engine: engine.embed(texts, allow_nonfinite=True),  # refused to users; the report measures them
        lambda ours: embedding_metrics(ours, ref),
        len(texts),
        "texts",
    )


# ------------------------------------------------------------------ cross-encoders


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau (tau-a) of two rankings of the same items, ``a[i]`` and ``b[i]`` being item i's places: over
    all pairs of items, the mean of +1 where the rankings order them alike and -1 where they differ (O(n^2), for the
    few dozen documents of a query; scipy is no dependency of hyprec)."""
    if len(a) < 2:
        return 1.0
    agree = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    return float(agree[np.triu_indices(len(a), k=1)].mean())


def ranking_metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Scores ``[queries, documents]`` against the reference's: the largest score difference, and how each query's
    reranked order (best first, ties in input order, NaN last) agrees with the reference's."""
    ranked, ref_ranked = (np.argsort(-x, axis=1, kind="stable") for x in (ours, ref))
    places, ref_places = np.argsort(ranked, axis=1), np.argsort(ref_ranked, axis=1)
    k = min(TOP_K, ours.shape[1])
    return {
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - ref).max()),
        "kendall_tau": float(np.mean([kendall_tau(a, b) for a, b in zip(places, ref_places, strict=True)])),
        f"top{k}_overlap": _overlap(ranked, ref_ranked, k),
        "top1_agreement": float((ranked[:, 0] == ref_ranked[:, 0]).mean()),
        "non_finite": int((~np.isfinite(ours)).sum()),
    }


def _compare_cross_encoder(
    load: Callable,
    ref_engine: ClassifierEngine,
    policies: list[str],
    reference: str,
    queries: list[str],
    docs: list[str],
) -> list[dict[str, Any]]:
    if len(ref_engine.labels) != 1:
        raise InvalidInputError(
            f"{ref_engine.model_dir.name} has {len(ref_engine.labels)} labels; compare ranks with cross-encoders "
            "(one label)"
        )
    pairs = [(q, d) for q in queries for d in docs]
    if reference == "sentence-transformers":
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(str(ref_engine.model_dir), device=str(ref_engine.device))
        ref = ce.predict(pairs, convert_to_numpy=True)
    else:
        ref = ref_engine.predict(pairs)
    shape = (len(queries), len(docs))
    return _policy_rows(
        load,
        policies,
        lambda engine: engine.predict(pairs, allow_nonfinite=True),
        lambda ours: ranking_metrics(ours.reshape(shape), ref.reshape(shape)),
        len(pairs),
        "pairs",
    )


# ------------------------------------------------------------------ generation


class TransformersReference:
    """transformers float32 on the same weights (HF directory or GGUF file)."""

    def __init__(self, path: Any):
        from transformers import AutoModelForCausalLM

        kwargs = {"gguf_file": path.name} if path.is_file() else {}
        root = path.parent if path.is_file() else path
        self.model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32, **kwargs).eval()

    @torch.inference_mode()
    def logits(self, ids: list[int], chunk: int = 256):
        full = self.model(torch.tensor([ids])).logits[0, :-1].float()
        for start in range(0, len(ids) - 1, chunk):
            yield start, full[start : start + chunk]

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
        out = self.model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(ids) :].tolist()
        tops = []
        for scores in out.scores:
            values, indices = torch.log_softmax(scores[0].float(), dim=-1).topk(5)
            tops.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
        return tokens, tops


class HyprecReference:
    """A hyprec engine (float32) as the reference."""

    def __init__(self, engine: ModelEngine):
        self.engine = engine

    def logits(self, ids: list[int], chunk: int = 256):
        yield from self.engine.logits(ids, chunk)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
        return _hyprec_greedy(self.engine, ids, n)


def _hyprec_greedy(engine: ModelEngine, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
    try:
        out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5))[0]
    except Exception:  # non-finite logits: nothing generated
        return [], []
    comp = out.outputs[0]
    return comp.token_ids, comp.logprobs or []


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _top5_close(a: tuple[list[int], list[dict]], b: tuple[list[int], list[dict]]) -> bool:
    """vLLM's check_logprobs_close: at the first differing token, each side's token is in the other's top-5."""
    (ta, la), (tb, lb) = a, b
    i = _prefix(ta, tb)
    if i == len(ta) == len(tb):
        return True
    if i >= len(la) or i >= len(lb):
        return False
    return ta[i] in lb[i] and tb[i] in la[i]


def compare_generation(
    reference: TransformersReference | HyprecReference,
    load: Callable[[str], ModelEngine],
    policies: list[str],
    texts_ids: list[list[int]],
    prompts_ids: list[list[int]],
) -> list[dict[str, Any]]:
    """One row per policy (``load(policy)`` opens the model under it): teacher-forced metrics on ``texts_ids``
    against ``reference``'s logits, and greedy continuations of ``prompts_ids`` against the reference's."""
    ref_greedy = [reference.greedy(p, GREEDY_TOKENS) for p in prompts_ids]
    rows = []
    for policy in policies:
        engine = load(policy)
        agree = total = non_finite = 0
        kl = nll = ref_nll = 0.0
        start_t = time.perf_counter()
        for ids in texts_ids:
            targets = torch.tensor(ids[1:])
            for (start, ours), (_, ref) in zip(engine.logits(ids), reference.logits(ids), strict=True):
                rows_t = targets[start : start + len(ref)]
                ref_lp, ref_scores = score_logits(ref, rows_t)
                ours_lp, scores = score_logits(ours.to(ref.device), rows_t)
                finite = scores.finite
                non_finite += int((~finite).sum())
                agree += int(((scores.argmax == ref_scores.argmax) & finite).sum())
                total += len(ref)
                kl += float((ref_lp.exp() * (ref_lp - ours_lp)).sum(1)[finite.to(ref_lp.device)].sum())
                nll += scores.nll()
                ref_nll += ref_scores.nll()
        seconds = time.perf_counter() - start_t
        finite_total = total - non_finite
        greedy = [_hyprec_greedy(engine, p, GREEDY_TOKENS) for p in prompts_ids]
        ppl = math.exp(nll / finite_total) if finite_total else float("nan")
        rows.append(
            {
                **_row_start(engine),
                "top1_agreement": agree / total,
                "mean_kl": kl / finite_total if finite_total else float("nan"),
                "perplexity": ppl,
                "ppl_ratio": ppl / math.exp(ref_nll / total),
                "non_finite_logits": non_finite,
                "greedy_identical_prefix": [_prefix(g[0], r[0]) for g, r in zip(greedy, ref_greedy, strict=True)],
                "top5_close": sum(_top5_close(g, r) for g, r in zip(greedy, ref_greedy, strict=True)),
                "tokens_per_s": total / seconds,
            }
        )
    return rows


# ------------------------------------------------------------------ entry point


def compare(
    model: Any = None,
    *,
    policies: list[str] | None = None,
    reference: str = "float32",
    texts: list[str] | list[list[int]] | None = None,
    prompts: list[str] | list[list[int]] | None = None,
    queries: list[str] | None = None,
    device: str = "cpu",
    precision_plan: Any = None,
    half_arithmetic: str = "auto",
) -> CompareReport:
    """Run ``policies`` against ``reference`` on real texts (built-in defaults) and return the report.

    A cross-encoder scores each of ``queries`` against each of ``texts`` (its documents). ``texts`` and
    ``prompts`` may be token-id lists (a model without a tokenizer). ``precision_plan`` (a plan file
    from ``hyprec repair``) adds a row for the plan. ``half_arithmetic``: ``auto`` (emulate half formats the device
    has no hardware path for), ``native`` or ``emulated``."""
    from hyprec.model_sources import resolve_model
    from hyprec.texts import evaluation_texts, pydoc_topics, ranking_texts

    policies = list(policies or POLICY_ARGS) + (["plan"] if precision_plan is not None else [])
    if reference not in REFERENCES:
        raise InvalidInputError(f"reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    path = resolve_model(model)
    name = str(model or path.name)
    load = functools.partial(open_policy, path, device=device, plan=precision_plan, half_arithmetic=half_arithmetic)
    ref_engine = load("float32")
    kind = "generation" if ref_engine.generative else "embedding"
    if isinstance(ref_engine, ClassifierEngine):
        kind = "cross-encoder"
    if reference not in KIND_REFERENCES[kind]:
        raise InvalidInputError(f"{kind} models compare against {' or '.join(map(repr, KIND_REFERENCES[kind]))}")
    if kind == "cross-encoder":
        default_queries, default_docs = ranking_texts()
        queries, texts = queries or default_queries, texts or default_docs
        rows = _compare_cross_encoder(load, ref_engine, policies, reference, queries, texts)
        return CompareReport(name, kind, reference, len(texts), rows, queries=len(queries))
    if kind == "embedding":
        texts = texts or evaluation_texts(200)
        rows = _compare_embeddings(load, ref_engine, policies, reference, texts)
        return CompareReport(name, kind, reference, len(texts), rows)
    texts = texts or sorted(pydoc_topics().values(), key=len, reverse=True)[:8]
    prompts = prompts or [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colours are",
        "Water boils at a temperature of",
    ]
    texts_ids = token_ids(ref_engine, texts, TEXT_TOKENS)
    prompts_ids = token_ids(ref_engine, prompts)
    ref = TransformersReference(path) if reference == "transformers" else HyprecReference(ref_engine)
    rows = compare_generation(ref, load, policies, texts_ids, prompts_ids)
    return CompareReport(name, kind, reference, len(texts_ids), rows)
