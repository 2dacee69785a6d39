"""Hybrid precision on a GPU: the path that motivated it, measured in one run.

Fused attention kernels on GPUs (FlashAttention-2, PyTorch's own flash kernel) have no float32 mode; hybrid
precision keeps weights and activations in float32 and hands only q/k/v to them in float16/bfloat16. This script
measures what that buys and costs on one CUDA device, in this order, each step only while ``--budget-s`` lasts:

1. ``pytest -m cuda`` on the CUDA test files (:data:`CUDA_TEST_FILES`): the GPU paths against the CPU.
2. The attention seam (``hyprec.layers.attention.Attention`` with the backend ``select_backend`` picks on CUDA) on
   one sequence of 512, 2,048, 8,192 and 32,768 tokens, 12 heads of 64: float32 (SDPA; the flash kernel refuses
   float32, which the run checks) against float16/bfloat16, milliseconds (median of interleaved rounds) and the
   extra GPU memory of one call.
3. Per model (MiniLM, Gemma-3-270M, MPNet): the five policies float32, hybrid-fp16, hybrid-bf16, float16,
   bfloat16 on CUDA, with sentence-transformers (embeddings) or transformers (Gemma, float32 from the same GGUF file)
   on the same GPU. Throughput (texts/s; Gemma: prefill and decode tokens/s at batch 16) as medians of interleaved
   rounds, as ratios to hyprec float32 and to the peer; fidelity against hyprec float32 on the CPU computed in the
   same run (embeddings: least cosine and top-10 neighbour overlap; Gemma: teacher-forced top-1 agreement and
   non-finite positions); GPU memory (``torch.cuda`` allocator: what the variant keeps resident after loading, and
   the extra peak of one pass).

Results go to ``--json`` and ``--markdown`` (``benchmarks/results/gpu.json`` / ``gpu.md``) after every step, so a
run cut short keeps what it measured. Without a CUDA device the script prints one line and exits with status 2.

Setting up a GPU machine: ``bash benchmarks/gpu_setup.sh`` (its header says which torch it installs and why).

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py --budget-s 540
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import NOT_MEASURED, log, markdown_table, min_cosine, neighbour_overlap
from machine import cpu_flags, cpu_model, load_average

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
#: Test files holding ``@pytest.mark.cuda`` tests (a CPU-side test keeps this list complete). Named explicitly:
#: collecting the whole suite would import test modules whose extras (Ray, the server) a GPU image may lack.
CUDA_TEST_FILES = ("tests/layers/test_cuda.py",)
#: Label -> ``LLM`` options. Named policies pin exact float32 GEMMs, as the CPU benchmarks do.
POLICIES: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32"},
    "hybrid-fp16": {"dtype": "hybrid", "attn_dtype": "float16"},
    "hybrid-bf16": {"dtype": "hybrid", "attn_dtype": "bfloat16"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
}
MODELS = {"minilm": "embed", "gemma": "generate", "mpnet": "embed"}  # in the order they run: most telling first
SEAM_TOKENS = (512, 2048, 8192, 32768)
SEAM_HEADS, SEAM_HEAD_DIM = 12, 64  # BERT-base / MPNet attention
#: Rough seconds per step on an H100 with 16 CPU cores (loading included); a step starts only if it fits.
ESTIMATES_S = {"tests": 120.0, "seam": 40.0, "minilm": 60.0, "gemma": 180.0, "mpnet": 140.0}
DEFAULT_BUDGET_S = 540.0  # leaves a 600-s command a minute for start-up and writing
NO_CUDA = (
    "gpu.py: no CUDA device here (torch {torch}, CUDA build {cuda}); "
    "run it on a GPU machine set up by benchmarks/gpu_setup.sh"
)


# ---------------------------------------------------------------------------------------------------------------
# The plan and the report: pure functions (tests/benchmarks/test_gpu.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of the run: ``kind`` is ``tests``, ``seam`` or ``model`` (``name`` the model alias)."""

    kind: str
    name: str
    estimate_s: float


def plan(models: Sequence[str], *, tests: bool = True, seam: bool = True) -> list[Step]:
    """The steps in the order they run: CUDA tests, attention seam, then each model."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    steps = [Step("tests", "pytest -m cuda", ESTIMATES_S["tests"])] if tests else []
    steps += [Step("seam", "attention seam", ESTIMATES_S["seam"])] if seam else []
    return steps + [Step("model", m, ESTIMATES_S[m]) for m in models]


def fits(step: Step, elapsed_s: float, budget_s: float) -> bool:
    """Whether ``step`` is expected to end inside the budget (a step is never cut once started)."""
    return elapsed_s + step.estimate_s <= budget_s


def ratio(value: float | None, ref: float | None) -> str:
    """``value / ref`` as ``1.23x``, or :data:`NOT_MEASURED` where either is missing."""
    if value is None or ref is None or ref == 0:
        return NOT_MEASURED
    return f"{value / ref:.2f}x"


def _num(value: float | None, fmt: str) -> str:
    return NOT_MEASURED if value is None else format(value, fmt)


def _ref(rows: Sequence[dict], variant: str, key: str) -> float | None:
    row = next((r for r in rows if r["variant"] == variant), None)
    return None if row is None else row.get(key)


def embed_table(rows: Sequence[dict], peer: str) -> list[str]:
    """Markdown table of one embedding model; ratios against ``hyprec float32`` and ``peer``."""
    base, other = _ref(rows, "hyprec float32", "texts_per_s"), _ref(rows, peer, "texts_per_s")
    header = [
        "variant",
        "policy",
        "texts/s",
        "vs float32",
        f"vs {peer}",
        "min cos vs CPU fp32",
        "top-10",
        "resident MiB",
        "pass peak MiB",
    ]
    body = [
        [
            r["variant"],
            r["policy"],
            _num(r.get("texts_per_s"), ".1f"),
            ratio(r.get("texts_per_s"), base),
            ratio(r.get("texts_per_s"), other),
            _num(r.get("min_cos"), ".6f"),
            _num(r.get("top10"), ".3f"),
            _num(r.get("resident_mib"), ".0f"),
            _num(r.get("pass_peak_mib"), ".0f"),
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def generate_table(rows: Sequence[dict], peer: str) -> list[str]:
    """Markdown table of a generative model: prefill and decode throughput, teacher-forced top-1."""
    refs = {k: (_ref(rows, "hyprec float32", k), _ref(rows, peer, k)) for k in ("prefill_tok_s", "decode_tok_s")}
    header = ["variant", "policy", "prefill tok/s", "vs float32", f"vs {peer}", "decode tok/s", "vs float32"]
    header += [f"vs {peer}", "top-1 vs CPU fp32", "non-finite", "resident MiB", "pass peak MiB"]
    body = []
    for r in rows:
        cells = [r["variant"], r["policy"]]
        for key in ("prefill_tok_s", "decode_tok_s"):
            base, other = refs[key]
            cells += [_num(r.get(key), ".0f"), ratio(r.get(key), base), ratio(r.get(key), other)]
        cells += [_num(r.get("top1"), ".4f"), _num(r.get("non_finite"), "d")]
        cells += [_num(r.get("resident_mib"), ".0f"), _num(r.get("pass_peak_mib"), ".0f")]
        body.append(cells)
    return markdown_table(header, body)


def seam_table(rows: Sequence[dict]) -> list[str]:
    """Markdown table of the attention seam: milliseconds per dtype and half precision's speed-up."""
    header = ["tokens", "float32 ms", "float16 ms", "bfloat16 ms", "fp16 speed-up", "bf16 speed-up"]
    header += ["backend (half)", "fp32 extra MiB", "fp16 extra MiB"]
    body = []
    for r in rows:
        ms, mib = r["ms"], r["extra_mib"]
        body.append(
            [
                f"{r['tokens']:,}",
                _num(ms.get("float32"), ".3f"),
                _num(ms.get("float16"), ".3f"),
                _num(ms.get("bfloat16"), ".3f"),
                ratio(ms.get("float32"), ms.get("float16")),
                ratio(ms.get("float32"), ms.get("bfloat16")),
                r["backend"].get("float16", NOT_MEASURED),
                _num(mib.get("float32"), ".0f"),
                _num(mib.get("float16"), ".0f"),
            ]
        )
    return markdown_table(header, body, text_columns=1)


PEERS = {"embed": "sentence-transformers float32", "generate": "transformers float32"}


def render(results: dict) -> str:
    """The Markdown report of a run's results (the JSON that :func:`main` writes)."""
    m = results["machine"]
    lines = [
        "# Hybrid precision on a GPU",
        "",
        f"- GPU: {m['gpu']} (compute capability {m['capability']}), {m['gpu_memory_gib']:.0f} GiB; driver "
        f"{m['driver']}; torch {m['torch']} (CUDA {m['cuda']}); flash-attn: {m['flash_attn']}",
        f"- CPU: {m['cpu']}, {m['cores']} cores; flags: {m['cpu_flags']}; Python {m['python']}",
        f"- packages: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- budget {results['budget_s']:.0f} s, used {results['elapsed_s']:.0f} s; load average at start "
        f"{results['load_at_start']}, at end {results.get('load_at_end', NOT_MEASURED)}",
    ]
    tests = results.get("tests")
    if tests:
        lines += ["", "## CUDA tests", "", f"`{tests['command']}`: exit status {tests['rc']}, {tests['summary']}"]
    if results.get("seam"):
        lines += ["", "## Attention seam, one sequence, 12 heads x 64", ""]
        lines += seam_table(results["seam"])
        accepts = results.get("flash_accepts", {})
        if accepts:
            lines += ["", "PyTorch's flash kernel alone (`sdpa_kernel(FLASH_ATTENTION)`) accepts: "]
            lines[-1] += ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in accepts.items())
    for model, res in results.get("models", {}).items():
        lines += ["", f"## {model}", "", res["workload"], ""]
        table = embed_table if res["kind"] == "embed" else generate_table
        lines += table(res["rows"], PEERS[res["kind"]])
        lines += [f"- {note}" for note in ["", *res.get("notes", [])][1:]]
    if results.get("skipped"):
        lines += ["", "Not run:", "", *(f"- {s}" for s in results["skipped"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Measuring (needs CUDA)
# ---------------------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def mib(n_bytes: int) -> float:
    return n_bytes / 2**20


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cuda") -> dict[str, float]:
    """Median milliseconds of each function in interleaved rounds, synchronised (``hyprec.hardware``)."""
    torch = _torch()
    from hyprec.hardware import interleaved_ms

    return interleaved_ms(fns, torch.device(device), repeats)


def on_gpu(device: str) -> bool:
    return _torch().device(device).type == "cuda"


def pass_peak_mib(fn: Callable[[], object], device: str = "cuda") -> float | None:
    """GPU memory one call of ``fn`` takes beyond what was allocated before it (None off the GPU)."""
    torch = _torch()
    if not on_gpu(device):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return mib(torch.cuda.max_memory_allocated() - base)


def loaded(load: Callable[[], object], device: str = "cuda") -> tuple[object, float | None]:
    """``load()`` and the GPU memory it left allocated (weights, caches), MiB (None off the GPU)."""
    torch = _torch()
    if not on_gpu(device):
        return load(), None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    obj = load()
    torch.cuda.synchronize()
    return obj, mib(torch.cuda.memory_allocated() - base)


def machine_facts() -> dict:
    import importlib.metadata
    import importlib.util

    torch = _torch()
    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        driver = smi.stdout.strip() or NOT_MEASURED
    except OSError:
        driver = NOT_MEASURED
    import hyprec

    versions = {"hyprec": hyprec.__version__}  # run from its source on an offline GPU machine: no metadata
    for dist in ("transformers", "sentence-transformers", "tokenizers", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": props.total_memory / 2**30,
        "driver": driver,
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda),
        "flash_attn": "installed" if importlib.util.find_spec("flash_attn") else "not installed (SDPA's own kernels)",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run_cuda_tests(timeout_s: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    shown = "pytest -q -m cuda " + " ".join(CUDA_TEST_FILES)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": shown, "rc": None, "summary": f"stopped after {timeout_s:.0f} s", "tail": ""}
    tail = (done.stdout + done.stderr).strip().splitlines()
    log("\n".join(tail[-30:]))
    return {"command": shown, "rc": done.returncode, "summary": tail[-1] if tail else "no output", "tail": tail[-30:]}


def flash_accepts() -> dict[str, bool]:
    """Whether PyTorch's flash kernel, forced alone, runs each dtype (float32 is the point: it does not)."""
    torch = _torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name in ("float32", "float16", "bfloat16"):
        q = torch.randn(1, SEAM_HEADS, 128, SEAM_HEAD_DIM, device="cuda", dtype=getattr(torch, name))
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out[name] = True
        except RuntimeError:
            out[name] = False
    return out


def seam_timings(tokens: Sequence[int], repeats: int, device: str = "cuda") -> list[dict]:
    """The attention seam per dtype on one sequence of each length (float32 q/k/v in, as the models hand them)."""
    torch = _torch()
    from hyprec.layers.attention import Attention, AttentionMetadata
    from hyprec.layers.attention_backends import select_backend

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for n in tokens:
        q, k, v = (torch.randn(n, SEAM_HEADS, SEAM_HEAD_DIM, device=device, generator=gen) for _ in range(3))
        fns, backends, extra = {}, {}, {}
        for name in ("float32", "float16", "bfloat16"):
            layer = Attention(SEAM_HEADS, SEAM_HEAD_DIM)
            layer.attn_dtype = getattr(torch, name)
            meta = AttentionMetadata.for_sequences([n], backend=select_backend(device, layer.attn_dtype), device=device)
            backends[name] = meta.backend.name

            def call(layer=layer, meta=meta, qkv=(q, k, v)):
                with torch.inference_mode():
                    return layer(*qkv, meta)

            try:
                extra[name] = pass_peak_mib(call, device)
                fns[name] = call
            except torch.OutOfMemoryError:
                extra[name] = None
                log(f"seam {n} tokens {name}: out of GPU memory")
        ms = timed(fns, repeats, device) if fns else {}
        rows.append({"tokens": n, "ms": ms, "backend": backends, "extra_mib": extra})
        log(f"seam {n:>6} tokens: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
        del fns
        if on_gpu(device):
            torch.cuda.empty_cache()
    return rows


def release(held: dict) -> None:
    """Drop the variants in ``held`` and give their GPU memory back before the next model loads."""
    import gc

    held.clear()
    gc.collect()
    if _torch().cuda.is_available():
        _torch().cuda.empty_cache()


def measure_embeddings(model: str, n_texts: int, repeats: int, batch_size: int, device: str = "cuda") -> dict:
    torch = _torch()
    from sentence_transformers import SentenceTransformer

    from hyprec import LLM
    from hyprec.model_sources import resolve_model
    from hyprec.texts import evaluation_texts

    path = resolve_model(model)
    texts = evaluation_texts(n_texts)
    log(f"[{model}] CPU float32 reference ({len(texts)} texts)")
    reference = LLM(path, dtype="float32", device="cpu").embed(texts)
    # label -> (the policy that ran, read after the run: the guard may move it; one pass; resident MiB)
    variants: dict[str, tuple[Callable[[], str], Callable[[], object], float | None]] = {}
    for label, options in POLICIES.items():
        llm, resident = loaded(lambda o=options: LLM(path, device=device, matmul_precision="highest", **o), device)
        variants[f"hyprec {label}"] = (lambda llm=llm: llm.policy.name, lambda llm=llm: llm.embed(texts), resident)
    for dtype in ("float32", "float16"):
        st, resident = loaded(
            lambda d=dtype: SentenceTransformer(str(path), device=device, model_kwargs={"dtype": getattr(torch, d)}),
            device,
        )
        attn = getattr(st[0].model.config, "_attn_implementation", "?")

        def encode(st=st):
            return st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

        variants[f"sentence-transformers {dtype}"] = (lambda d=dtype, a=attn: f"{d}, attention {a}", encode, resident)
    ms = timed({label: fn for label, (_, fn, _) in variants.items()}, repeats, device)
    rows = []
    for label, (policy, fn, resident) in variants.items():
        out = fn()
        rows.append(
            {
                "variant": label,
                "policy": policy(),
                "texts_per_s": len(texts) / (ms[label] / 1e3),
                "min_cos": min_cosine(out, reference),
                "top10": neighbour_overlap(out, reference),
                "resident_mib": resident,
                "pass_peak_mib": pass_peak_mib(fn, device),
            }
        )
    release(variants)
    workload = (
        f"{len(texts)} texts (`hyprec.texts.evaluation_texts`), median of {repeats} interleaved passes after two "
        f"warm-ups; sentence-transformers batch size {batch_size}; hyprec float32 GEMMs pinned to `highest`"
    )
    return {"kind": "embed", "workload": workload, "rows": rows}


def measure_generation(
    model: str, batch: int, prompt_tokens: int, new_tokens: int, repeats: int, device: str = "cuda"
) -> dict:
    torch = _torch()
    from transformers import AutoModelForCausalLM

    from generate_fidelity import texts as pydoc_ids
    from hyprec import LLM, SamplingParams
    from hyprec.model_sources import resolve_model

    path = resolve_model(model)
    ids = pydoc_ids(path, batch, prompt_tokens)
    log(f"[{model}] CPU float32 reference ({batch} x {prompt_tokens} tokens, teacher-forced)")
    cpu = LLM(path, dtype="float32", device="cpu", max_model_len=prompt_tokens + new_tokens + 16)
    reference = [cpu.engine.score(t).argmax for t in ids]
    del cpu

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    variants: dict[str, dict] = {}
    notes = []
    for label, options in POLICIES.items():
        # on_nonfinite="ignore": the guard still watches (its cost is in the timings) but does not move the model to a
        # safer policy, so each row is the policy it names; hyprec never returns NaN logits, so a policy that
        # overflows is scored but not timed.
        llm, resident = loaded(
            lambda o=options: LLM(
                path, device=device, max_model_len=prompt_tokens + new_tokens + 16, on_nonfinite="ignore", **o
            ),
            device,
        )
        scores = [llm.engine.score(t, allow_nonfinite=True) for t in ids]
        bad = sum(int((~s.finite).sum()) for s in scores)
        if bad:
            notes.append(
                f"hyprec {label}: {bad} of {sum(len(s.finite) for s in scores)} positions have non-finite logits; "
                "not timed (with the default guard it falls back to a hybrid policy and runs at that one's speed)"
            )
        variants[f"hyprec {label}"] = {
            "policy": llm.policy.name,
            "scores": [(s.argmax, s.finite) for s in scores],
            "run": None if bad else (lambda n, llm=llm: llm.generate(ids, greedy(n))),
            "resident": resident,
        }
    hf, resident = loaded(
        lambda: (
            AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            .to(device)
            .eval()
        ),
        device,
    )
    with torch.inference_mode():
        hf_scores = []
        for t in ids:
            logits = hf(torch.tensor([t], device=device)).logits[0, :-1].float()
            hf_scores.append((logits.argmax(-1).cpu(), torch.isfinite(logits).all(-1).cpu()))
    prompts = torch.tensor(ids, device=device)

    def hf_run(n: int, model=hf) -> None:
        with torch.inference_mode():
            model.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    attn = getattr(hf.config, "_attn_implementation", "?")
    variants["transformers float32"] = {
        "policy": f"float32, attention {attn}",
        "scores": hf_scores,
        "run": hf_run,
        "resident": resident,
    }
    fns = {}
    for label, v in variants.items():
        if v["run"] is not None:
            fns[f"{label}|prefill"] = lambda run=v["run"]: run(1)
            fns[f"{label}|full"] = lambda run=v["run"]: run(new_tokens)
    ms = timed(fns, repeats, device)
    rows = []
    for label, v in variants.items():
        speed = {"prefill_tok_s": None, "decode_tok_s": None, "pass_peak_mib": None}
        if v["run"] is not None:
            prefill_s, full_s = ms[f"{label}|prefill"] / 1e3, ms[f"{label}|full"] / 1e3
            speed = {
                "prefill_tok_s": batch * prompt_tokens / prefill_s,
                "decode_tok_s": batch * (new_tokens - 1) / max(full_s - prefill_s, 1e-9),
                "pass_peak_mib": pass_peak_mib(lambda run=v["run"]: run(new_tokens), device),
            }
        agree = total = non_finite = 0
        for (argmax, finite), ref in zip(v["scores"], reference, strict=True):
            agree += int(((argmax == ref) & finite).sum())
            total += len(ref)
            non_finite += int((~finite).sum())
        rows.append(
            {
                "variant": label,
                "policy": v["policy"],
                "top1": agree / total,
                "non_finite": non_finite,
                "resident_mib": v["resident"],
                **speed,
            }
        )
    fns.clear()
    release(variants)
    workload = (
        f"batch {batch} of pydoc pages cut to {prompt_tokens} tokens, {new_tokens} greedy tokens; prefill = a "
        f"1-token generation, decode = the rest; medians of {repeats} interleaved rounds after two warm-ups. "
        f"top-1: teacher-forced next-token agreement with hyprec float32 on the CPU over the same prompts"
    )
    return {"kind": "generate", "workload": workload, "rows": rows, "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop starting steps after this")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    parser.add_argument("--texts", type=int, default=480, help="evaluation texts per embedding pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--batch-size", type=int, default=64, help="sentence-transformers batch size")
    parser.add_argument("--batch", type=int, default=16, help="Gemma prompts per batch")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=RESULTS / "gpu.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "gpu.md")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.repeats < 1 or args.texts < 40 or args.new_tokens < 2:
        parser.error("--budget-s must be > 0, --repeats >= 1, --texts >= 40, --new-tokens >= 2")
    return args


def require_cuda() -> None:
    """Exit with status 2 and one line where torch sees no CUDA device."""
    torch = _torch()
    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        raise SystemExit(2)


def save(results: dict, args: argparse.Namespace) -> None:
    for path, text in ((args.json, json.dumps(results, indent=1)), (args.markdown, render(results))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda()
    start = time.perf_counter()
    results: dict = {
        "machine": machine_facts(),
        "budget_s": args.budget_s,
        "load_at_start": load_average(),
        "models": {},
        "skipped": [],
    }
    for step in plan(args.models, tests=not args.no_tests):
        elapsed = time.perf_counter() - start
        if not fits(step, elapsed, args.budget_s):
            results["skipped"].append(f"{step.name}: ~{step.estimate_s:.0f} s left no room in the budget")
            continue
        log(f"--- {step.name} (at {elapsed:.0f} s of {args.budget_s:.0f})")
        try:
            if step.kind == "tests":
                results["tests"] = run_cuda_tests(min(args.budget_s - elapsed, 2 * step.estimate_s))
            elif step.kind == "seam":
                results["flash_accepts"] = flash_accepts()
                results["seam"] = seam_timings(SEAM_TOKENS, args.repeats)
            elif MODELS[step.name] == "embed":
                results["models"][step.name] = measure_embeddings(step.name, args.texts, args.repeats, args.batch_size)
            else:
                results["models"][step.name] = measure_generation(
                    step.name, args.batch, args.prompt_tokens, args.new_tokens, args.repeats
                )
        except Exception as exc:  # one failing step must not lose the others' results
            first_line = (str(exc).splitlines() or [""])[0]
            results["skipped"].append(f"{step.name}: failed, {type(exc).__name__}: {first_line}")
            log(f"{step.name} failed: {exc!r}")
        results["elapsed_s"] = time.perf_counter() - start
        results["load_at_end"] = load_average()
        save(results, args)
    results["elapsed_s"] = time.perf_counter() - start
    save(results, args)
    print(render(results))


if __name__ == "__main__":
    main()
