"""Embedding throughput per forward-pass token budget (``max_num_batched_tokens``) and float32 GEMM kernel.

Why it exists: an encoder pass's activations grow with its tokens, and on a CPU large ones cost twice (they fall out
of cache between ops, and glibc's malloc serves big blocks with fresh pages from the kernel on every allocation).
This measures where the default budget for CPU encoders (``hyprec.config.CPU_ENCODER_TOKEN_BUDGET``) should sit,
with the process's allocator as hyprec sets it (``hyprec.allocator``) or, with ``--system-malloc``, untouched.

Each (budget, matmul precision) pair is one engine in this process, all float32 policy (exact float32 GEMMs on the
library ``auto`` picks, or compensated bf16x3); every engine embeds the 200 evaluation texts once per round, in
interleaved rounds; the table shows the median seconds per pass and the ratio to the 16,384-token float32 row.

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/token_budget.py --model minilm mpnet \\
        --markdown benchmarks/results/token_budget.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from machine import cpu_flags, cpu_model, load_average, publish

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGETS = (16384, 4096, 2048, 1024, 512)
PRECISIONS = ("highest", "high")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["minilm", "mpnet"])
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc thresholds alone")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.system_malloc:
        os.environ["HYPREC_TUNE_MALLOC"] = "0"

    import torch

    from hyprec import LLM
    from hyprec.allocator import tune_malloc
    from hyprec.texts import evaluation_texts

    texts = evaluation_texts()[:200]
    lines = [
        "# Embedding throughput per forward-pass token budget",
        "",
        f"- CPU: {cpu_model()}; flags: {cpu_flags()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; allocator: {tune_malloc()}",
        f"- 200 texts (`hyprec.texts.evaluation_texts`), dtype float32; median of {args.repeats} interleaved rounds",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- load average (1/5/15 min) at start: {load_average()}",
        "",
        "| model | budget (tokens) | matmul | s/pass | range | vs 16384 float32 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for model in args.model:
        llms = {
            (budget, precision): LLM(model, dtype="float32", matmul_precision=precision, max_num_batched_tokens=budget)
            for budget in args.budgets
            for precision in PRECISIONS
        }
        for llm in llms.values():
            llm.embed(texts)  # warm-up
        times: dict[tuple[int, str], list[float]] = {key: [] for key in llms}
        for _ in range(args.repeats):
            for key, llm in llms.items():
                start = time.perf_counter()
                llm.embed(texts)
                times[key].append(time.perf_counter() - start)
        base = statistics.median(times[(max(args.budgets), "highest")])
        for (budget, precision), t in times.items():
            name = llms[(budget, precision)].policy.name
            median = statistics.median(t)
            lines.append(
                f"| {model} | {budget} | {precision} ({name}) | {median:.2f} | {min(t):.2f}–{max(t):.2f} | "
                f"{base / median:.2f}x |"
            )
            print(lines[-1], flush=True)
        del llms
    lines += ["", f"- load average at end: {load_average()}"]
    report = "\n".join(lines) + "\n"
    publish(report, args.markdown)


if __name__ == "__main__":
    main()
