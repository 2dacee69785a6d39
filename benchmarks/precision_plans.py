"""Precision plans from ``hyprec repair`` on Gemma-3-270M: accuracy against float32 and speed against float32.

Makes a float16 plan and a bfloat16 plan (same tolerance), then loads float32, hybrid-fp16 and both plans in one
process and times them in alternating rounds (so machine noise hits all alike):

* prefill: teacher-forced scoring of the held-out pydoc pages (256 tokens each), tokens/s;
* decode: greedy generation, batch 8, 64-token prompts + 32 new tokens, tokens/s;
* accuracy: teacher-forced top-1 agreement with float32 on the same held-out pages.

Ratios are against float32 in the same run. Whether a half format is faster depends on the CPU: bfloat16 matmuls
are fast only with AMX (or AVX512-BF16 kernels that use it); the script prints the CPU's relevant flags.

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/precision_plans.py --markdown benchmarks/results/precision_plans.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    have = set(flags.split())
    return ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in wanted)


def _median_rounds(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Tokens per second of each function (median over alternating rounds, after one warm-up each)."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma")
    ap.add_argument("--tolerance", type=float, default=0.995)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    import torch

    from hyprec import LLM, SamplingParams
    from hyprec.dtypes import full_name
    from hyprec.tools.check import default_calibration_texts
    from hyprec.tools.repair import repair

    plans, plan_rows = {}, []
    for target in ("float16", "bfloat16"):
        plan = repair(args.model, target=target, tolerance=args.tolerance)
        plans[plan.name] = plan
        fast = sum(full_name(layer.compute) == target for layer in plan.layers)
        plan_rows.append(
            f"| {plan.name} | {fast}/{len(plan.layers)} | {plan.edges} | 2^{plan.residual_scale_log2} | "
            f"{', '.join(plan.search['kept_out']) or '-'} | {plan.search['validations']} | "
            f"{plan.search['seconds']} | {plan.measured['calibration']['top1_agreement']:.4f} | "
            f"{plan.measured['validation']['top1_agreement']:.4f} | "
            f"{'yes' if plan.measured['meets_tolerance'] else 'no'} |"
        )

    small = {"max_model_len": 512, "num_kv_blocks": 96}  # four engines in one process: a small KV cache each
    engines = {
        "float32": LLM(args.model, dtype="float32", **small),
        "hybrid-fp16": LLM(args.model, dtype="hybrid", attn_dtype="float16", **small),
        **{name: LLM(args.model, precision_plan=plan, **small) for name, plan in plans.items()},
    }
    tok = engines["float32"].engine.tokenizer
    held_out = [tok.encode(t)[:256] for t in default_calibration_texts(True, 16)[1::2]]  # what repair held out
    prompts = [tok.encode(t)[:64] for t in default_calibration_texts(True)[:8]]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    def prefill(llm: LLM) -> int:
        for ids in held_out:
            llm.engine.score(ids)
        return sum(len(ids) for ids in held_out)

    def decode(llm: LLM) -> int:
        llm.generate(prompts, params)
        return len(prompts) * params.max_tokens

    pre = _median_rounds({n: (lambda e=e: prefill(e)) for n, e in engines.items()}, args.repeats)
    dec = _median_rounds({n: (lambda e=e: decode(e)) for n, e in engines.items()}, args.repeats)
    ref_top = [engines["float32"].engine.score(ids)[0] for ids in held_out]

    rows = []
    for name, llm in engines.items():
        agree = sum(int((llm.engine.score(ids)[0] == r).sum()) for ids, r in zip(held_out, ref_top, strict=True))
        total = sum(len(ids) - 1 for ids in held_out)
        rows.append(
            f"| {name} | {agree / total:.4f} | {pre[name]:.0f} | {pre[name] / pre['float32']:.2f}x | "
            f"{dec[name]:.1f} | {dec[name] / dec['float32']:.2f}x |"
        )

    lines = [
        f"# Precision plans on {args.model} (tolerance: top-1 agreement >= {args.tolerance})",
        "",
        f"CPU: {_cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| plan | layers in target | embeddings/head | residual scale | kept out | validations | search s | "
        "top-1 search text | top-1 held out | meets tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *plan_rows,
        "",
        f"Held-out text: {len(held_out)} pydoc pages x 256 tokens; decode: batch {len(prompts)}, 64-token prompts "
        f"+ {params.max_tokens} tokens; median of {args.repeats} alternating rounds.",
        "",
        "| policy | top-1 vs float32 | prefill tok/s | vs float32 | decode tok/s | vs float32 |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
