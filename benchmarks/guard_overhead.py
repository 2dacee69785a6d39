"""Cost of the run-time precision guard on hybrid runs, measured against the same engine without it.

For each workload the engine is loaded twice in one process (guard on / off), then timed in alternating rounds so
that machine noise hits both alike; the table shows median times and the overhead ratio (target: < 2%).

Workloads: Gemma-3-270M greedy decoding (batch 1 and 8, hybrid fp16) and all-MiniLM-L6-v2 embedding of the
200 evaluation texts (hybrid fp16).

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/guard_overhead.py --markdown benchmarks/results/guard_overhead.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_flags, cpu_model, load_average, publish

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rounds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def gemma_rows(repeats: int) -> list[tuple[str, float, float]]:
    from hyprec import LLM, SamplingParams
    from hyprec.texts import pydoc_topics

    engines = {
        g: LLM("gemma", dtype="hybrid", attn_dtype="float16", max_model_len=512, precision_guard=g)
        for g in (True, False)
    }
    tok = engines[True].engine.tokenizer
    pages = sorted(pydoc_topics().values(), key=len, reverse=True)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rows = []
    for batch in (1, 8):
        prompts = [tok.encode(p)[:64] for p in pages[:batch]]
        t = _rounds({str(g): (lambda g=g, p=prompts: engines[g].generate(p, params)) for g in engines}, repeats)
        rows.append((f"Gemma-3-270M decode, batch {batch}, 64+32 tokens", t["True"], t["False"]))
    return rows


def minilm_rows(repeats: int) -> list[tuple[str, float, float]]:
    from hyprec import LLM
    from hyprec.texts import evaluation_texts

    texts = evaluation_texts(200)
    engines = {g: LLM("minilm", dtype="hybrid", attn_dtype="float16", precision_guard=g) for g in (True, False)}
    t = _rounds({str(g): (lambda g=g: engines[g].embed(texts)) for g in engines}, repeats)
    return [("all-MiniLM-L6-v2 embed, 200 texts", t["True"], t["False"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    import torch

    load_start = load_average()
    rows = minilm_rows(args.repeats) + gemma_rows(args.repeats)
    lines = [
        f"Precision guard overhead (hybrid fp16), median of {args.repeats} alternating rounds",
        "",
        f"- CPU: {cpu_model()}; flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- load average (1/5/15 min) at start: {load_start}, at end: {load_average()}",
        "",
        "| workload | guard on s | guard off s | overhead |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {on:.3f} | {off:.3f} | {100 * (on / off - 1):+.1f}% |" for name, on, off in rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.markdown)


if __name__ == "__main__":
    main()
