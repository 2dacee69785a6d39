"""``hyprec compare``: how far does each dtype policy drift from a reference, on real text?

Embedding models: mean/min cosine, max abs diff, top-k neighbour overlap and top-1 neighbour agreement against
sentence-transformers float32 or hyprec float32. Generative models: teacher-forced top-1 agreement, mean KL
divergence, perplexity ratio, non-finite logits, greedy identical-prefix lengths and vLLM-style top-5 logprob
closeness against transformers float32 or hyprec float32. Throughput (texts/s or tokens/s) per policy.

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

from hyprec.errors import InvalidInputError
from hyprec.precision.emulation import arithmetic

POLICY_ARGS: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32"},
    "hybrid-fp16": {"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "float16"},
    "hybrid-bf16": {"dtype": "hybrid", "attn_dtype": "bfloat16", "kv_cache_dtype": "bfloat16"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
}
REFERENCES = ("float32", "sentence-transformers", "transformers")
TOP_K = 10
GREEDY_TOKENS = 48
TEXT_TOKENS = 256


@dataclass
class CompareReport:
    model: str
    kind: str  # embedding | generation
    reference: str
    texts: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "reference": self.reference,
            "texts": self.texts,
            "rows": self.rows,
        }

    def markdown(self) -> str:
        if not self.rows:
            return ""
        keys = list(self.rows[0])
        lines = [
            f"{self.model}: {self.kind}, {self.texts} texts, reference {self.reference}",
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


def _load(model: Any, policy: str, device: str, plan: Any = None, half_arithmetic: str = "auto"):
    """The model under a named policy, or under ``plan`` (a precision plan file) when ``policy`` is ``plan``."""
    from hyprec.entrypoints.llm import LLM

    options = {"device": device, "precision_guard": False, "half_arithmetic": half_arithmetic}
    if policy == "plan":
        return LLM(model, precision_plan=plan, **options)
    if policy not in POLICY_ARGS:
        raise InvalidInputError(f"policy {policy!r}: expected one of {', '.join(POLICY_ARGS)}")
    return LLM(model, **options, **POLICY_ARGS[policy])


def _row_start(llm: Any) -> dict[str, Any]:
    """The first columns of a policy's row: its name and the arithmetic it ran in."""
    return {"policy": llm.policy.name, "arithmetic": arithmetic(llm.engine.model)}


# ------------------------------------------------------------------ embeddings


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    x = x.astype(np.float64) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def row_cosines(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``ours`` with the same row of ``ref``, computed in float64."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def embedding_metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    cos = row_cosines(a, b)
    k = min(TOP_K, len(a) - 1)
    na, nb = _neighbours(a, k), _neighbours(b, k)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb, strict=True)]) if k else 1.0
    return {
        "mean_cos": float(np.nanmean(cos)),
        "min_cos": float(np.nanmin(cos)) if np.isfinite(cos).any() else float("nan"),
        "max_abs_diff": float(np.abs(a - b).max()),
        f"top{k}_overlap": float(overlap),
        "top1_agreement": float((na[:, 0] == nb[:, 0]).mean()) if k else 1.0,
        "non_finite": int((~np.isfinite(a)).any(axis=1).sum()),
    }


def _compare_embeddings(
    load: Callable, llm_ref: Any, policies: list[str], reference: str, texts: list[str], device: str
):
    if reference == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        ref = SentenceTransformer(str(llm_ref.engine.model_dir), device=device).encode(texts, convert_to_numpy=True)
    else:
        ref = llm_ref.embed(texts)
    rows = []
    for policy in policies:
        llm = load(policy)
        start = time.perf_counter()
        try:
            ours = llm.embed(texts)
        except Exception:  # non-finite results are refused; measure them anyway for the report
            ours = _raw_embeddings(llm, texts)
        seconds = time.perf_counter() - start
        rows.append({**_row_start(llm), **embedding_metrics(ours, ref), "texts_per_s": len(texts) / seconds})
    return rows


def _raw_embeddings(llm: Any, texts: list[str]) -> np.ndarray:
    engine = llm.engine
    ids = engine.tokenize(texts)
    return np.stack([engine._run_batch([x], [0], None, None)[0].float().cpu().numpy() for x in ids])


# ------------------------------------------------------------------ generation


class _TransformersReference:
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


class _HyprecReference:
    def __init__(self, llm: Any):
        self.llm = llm

    def logits(self, ids: list[int], chunk: int = 256):
        yield from self.llm.engine.logits(ids, chunk)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
        return _hyprec_greedy(self.llm, ids, n)


def _hyprec_greedy(llm: Any, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
    from hyprec.sampling_params import SamplingParams

    try:
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5))[0]
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


def _compare_generation(llm_ref_obj, load: Callable, policies, texts_ids, prompts_ids):
    ref_greedy = [llm_ref_obj.greedy(p, GREEDY_TOKENS) for p in prompts_ids]
    rows = []
    for policy in policies:
        llm = load(policy)
        agree = total = non_finite = 0
        kl = nll = ref_nll = 0.0
        start_t = time.perf_counter()
        for ids in texts_ids:
            targets = torch.tensor(ids[1:])
            for (start, ours), (_, ref) in zip(llm.engine.logits(ids), llm_ref_obj.logits(ids), strict=True):
                ref_lp = torch.log_softmax(ref.float(), dim=1)
                ours_lp = torch.log_softmax(ours.float().to(ref.device), dim=1)
                finite = torch.isfinite(ours_lp).all(dim=1)
                non_finite += int((~finite).sum())
                rows_t = targets[start : start + len(ref), None]
                agree += int((ours_lp.argmax(1) == ref_lp.argmax(1))[finite].sum())
                total += len(ref)
                kl += float((ref_lp.exp() * (ref_lp - ours_lp)).sum(1)[finite].sum())
                nll -= float(ours_lp.gather(1, rows_t)[:, 0][finite].double().sum())
                ref_nll -= float(ref_lp.gather(1, rows_t)[:, 0].double().sum())
        seconds = time.perf_counter() - start_t
        finite_total = total - non_finite
        greedy = [_hyprec_greedy(llm, p, GREEDY_TOKENS) for p in prompts_ids]
        ppl = math.exp(nll / finite_total) if finite_total else float("nan")
        rows.append(
            {
                **_row_start(llm),
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
    texts: list[str] | None = None,
    prompts: list[str] | None = None,
    device: str = "cpu",
    precision_plan: Any = None,
    half_arithmetic: str = "auto",
) -> CompareReport:
    """Run ``policies`` against ``reference`` on real texts (built-in defaults) and return the report.

    ``precision_plan`` (a plan file from ``hyprec repair``) adds a row for the plan. ``half_arithmetic``: ``auto``
    (emulate half formats the device has no hardware path for), ``native`` or ``emulated``."""
    from hyprec.model_sources import resolve_model
    from hyprec.texts import evaluation_texts, pydoc_topics

    policies = list(policies or POLICY_ARGS) + (["plan"] if precision_plan is not None else [])
    if reference not in REFERENCES:
        raise InvalidInputError(f"reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    path = resolve_model(model)
    load = functools.partial(_load, path, device=device, plan=precision_plan, half_arithmetic=half_arithmetic)
    llm_ref = load("float32")
    if not llm_ref.is_generative:
        if reference == "transformers":
            raise InvalidInputError("embedding models compare against 'sentence-transformers' or 'float32'")
        texts = texts or evaluation_texts(200)
        rows = _compare_embeddings(load, llm_ref, policies, reference, texts, device)
        return CompareReport(str(model or path.name), "embedding", reference, len(texts), rows)
    if reference == "sentence-transformers":
        raise InvalidInputError("generative models compare against 'transformers' or 'float32'")
    tok = llm_ref.engine.tokenizer
    texts = texts or sorted(pydoc_topics().values(), key=len, reverse=True)[:8]
    prompts = prompts or [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colours are",
        "Water boils at a temperature of",
    ]
    texts_ids = [tok.encode(t)[:TEXT_TOKENS] for t in texts]
    prompts_ids = [tok.encode(p) for p in prompts]
    ref_obj = _TransformersReference(path) if reference == "transformers" else _HyprecReference(llm_ref)
    rows = _compare_generation(ref_obj, load, policies, texts_ids, prompts_ids)
    return CompareReport(str(model or path.name), "generation", reference, len(texts_ids), rows)
