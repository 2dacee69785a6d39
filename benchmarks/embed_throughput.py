"""Embedding throughput and fidelity of hyprec against sentence-transformers, on CPU.

What it measures
    For each model, five variants embed the same real texts (``hyprec.texts.evaluation_texts``: long pydoc
    pages that get truncated, paragraphs, docstrings, short sentences):

    * ``sentence-transformers float32``: the peer, ``SentenceTransformer.encode`` with ``--batch-size``;
    * ``hyprec float32``: everything in float32;
    * ``hyprec hybrid fp16 attn`` / ``hyprec hybrid bf16 attn``: float32 weights and activations, attention in
      float16 / bfloat16;
    * ``hyprec bfloat16 (whole model)``: for context, what whole-model half precision gives;
    * ``... deterministic``: the batch-invariant mode (``deterministic=True``), whose cost this measures.

    Each variant runs in its own spawned process: load, one warm-up pass, then ``--repeats`` timed passes
    over all texts. Nothing else is loaded in that process, so its peak RSS is its own. The timed passes
    run in rounds, one pass of every variant per round, so that load from other work on the machine hits all
    variants alike rather than whichever happened to run at the time.

How to read the table
    * ``texts/s``: median over the timed passes; ``range`` is the slowest and fastest pass. On a shared,
      small machine absolute numbers drift; compare rows of one table (``vs ST``, a ratio) and trust only
      differences larger than the ranges.
    * ``CPU s/pass``: median process CPU time (all threads) of a pass; ``vs ST (CPU)`` is the throughput
      ratio in CPU time. Less sensitive than wall time to other processes taking the cores, though threads
      spinning at a barrier while a sibling is descheduled still count.
    * When other processes share the cores, every multi-threaded kernel waits for its slowest thread to be
      scheduled, so runs with many small kernels (casts, index copies) suffer most; ``--threads 1`` trades
      absolute speed for numbers that mostly reflect the work done.
    * ``padding``: share of padded positions in the attention batches. sentence-transformers pads every
      batch (of ``--batch-size`` texts sorted by character length) to its longest text, and runs the whole
      model on the padded tensor. hyprec runs projections and FFN on packed real tokens only; its padding
      costs only inside attention.
    * ``peak RSS``: ``ru_maxrss`` of the variant's process (model, runtime and activations), in MiB.
    * ``min cos``: the worst per-text cosine similarity to the sentence-transformers float32 embeddings.
    * ``top-10``: mean overlap of each text's 10 nearest neighbours (cosine, among the texts, self excluded)
      with the neighbours under sentence-transformers float32; 1.000 means retrieval ranks are unchanged.

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_throughput.py --model minilm mpnet --repeats 3 \\
        --markdown benchmarks/results/embed_throughput.md
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from harness import (
    HYPREC_POLICIES,
    ST_REFERENCE,
    HyprecPolicy,
    Job,
    Measurement,
    base_parser,
    cells,
    evaluation_texts,
    find,
    in_child,
    machine_header,
    markdown_table,
    measure_model,
    notes,
    parse,
    st_job,
    write_report,
)
from machine import load_average

DETERMINISTIC: tuple[HyprecPolicy, ...] = (
    HyprecPolicy("hyprec float32 deterministic", "float32", deterministic=True),
    HyprecPolicy("hyprec hybrid fp16 attn deterministic", "hybrid", "float16", deterministic=True),
)


def jobs(model: str, texts: Sequence[str], batch_size: int, threads: int) -> list[Job]:
    """sentence-transformers float32 (the reference, first), then every hyprec policy."""
    st = st_job(model, texts, threads, batch_size)
    return [st] + [policy.job(model, texts, threads) for policy in HYPREC_POLICIES + DETERMINISTIC]


COLUMNS = (
    "variant",
    "policy",
    "texts/s",
    "range",
    "vs ref",
    "CPU s/pass",
    "vs ref (CPU)",
    "padding",
    "batches",
    "peak RSS MiB",
    "min cos",
    "top-10",
)


def model_table(model: str, results: list[Measurement], skipped: list[str]) -> list[str]:
    """A markdown table; sentence-transformers float32 is the reference."""
    ref = find(results, ST_REFERENCE)
    rows = [[cells(r, ref)[column] for column in COLUMNS] for r in results]
    lines = ["", f"## {model}", "", *markdown_table([c.replace("ref", "ST") for c in COLUMNS], rows)]
    return lines + notes(results, skipped)


def header(args: argparse.Namespace, results: list[Measurement], load_at_start: str) -> list[str]:
    first = results[0]
    facts = [
        f"torch {first.versions['torch']}, {first.threads} intra-op threads",
        f"{first.n_texts} texts (`hyprec.texts.evaluation_texts`); one warm-up pass, then the median of "
        f"{args.repeats} timed passes taken in interleaved rounds; sentence-transformers batch size {args.batch_size}",
    ]
    return machine_header("Embedding throughput: hyprec vs sentence-transformers", facts, load_at_start)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, 0, "torch intra-op threads in each variant (0: torch's default)")
    return parse(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = load_average()
    texts = in_child(evaluation_texts, args.texts)
    tables: list[str] = []
    report = ""
    for model in args.model:
        results, skipped = measure_model(model, jobs(model, texts, args.batch_size, args.threads), args.repeats)
        tables += model_table(model, results, skipped)
        report = "\n".join(header(args, results, load_at_start) + tables) + "\n"
        write_report(args.markdown, report)
    print(report)


if __name__ == "__main__":
    main()
