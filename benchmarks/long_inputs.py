"""Long inputs: the attention seam and the encoder stack at 512, 2,048 and 8,192 tokens, per precision policy.

With short texts the linear layers dominate and the attention format barely shows; attention's share grows with the
square of the length, which is where half-precision attention pays (or, on hardware without a path for it, costs).

What it measures
    * ``attention``: the attention seam alone (``hyprec.layers.attention.Attention`` with the SDPA backend) on one
      sequence: float32 q/k/v ``[T, 12, 32]`` in, cast to the attention dtype, fused kernel, cast back.
    * ``encoder``: the whole encoder stack (embeddings and 6 layers) of a BERT with all-MiniLM-L6-v2's shape
      (hidden 384, 12 heads, FFN 1536) and random weights, with position embeddings for 8,192 tokens (no real
      MiniLM reaches past 512), on one sequence of T random token ids. ``max rel err`` is the largest
      ``|x - x_fp32| / max|x_fp32|`` of the last hidden states against the float32 policy.

Each policy is loaded once in this process; every length runs in interleaved rounds (one call of every policy per
round) and the table shows the median time of ``--repeats`` rounds and the speed-up over float32.

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/long_inputs.py --markdown benchmarks/results/long_inputs.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from machine import cpu_flags, cpu_model, load_average, publish

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LENGTHS = (512, 2048, 8192)
HEADS, HEAD_DIM = 12, 32
#: label -> LLM keyword arguments
POLICIES: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32", "matmul_precision": "highest"},
    "float32, bf16x3 GEMMs": {"dtype": "float32", "matmul_precision": "high"},
    "hybrid-fp16": {"dtype": "hybrid", "attn_dtype": "float16", "matmul_precision": "highest"},
    "hybrid-bf16": {"dtype": "hybrid", "attn_dtype": "bfloat16", "matmul_precision": "highest"},
    "hybrid-bf16, bf16x3 GEMMs": {"dtype": "hybrid", "attn_dtype": "bfloat16", "matmul_precision": "high"},
    "bfloat16 (whole model)": {"dtype": "bfloat16"},
}


def long_bert(directory: Path) -> Path:
    """A random-weight BERT with MiniLM's shape and 8,192 positions, saved once."""
    if not (directory / "config.json").exists():
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=HEADS,
            intermediate_size=1536,
            max_position_embeddings=max(LENGTHS),
        )
        BertModel(config).eval().save_pretrained(directory)
    return directory


def rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over interleaved rounds (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_call(policy, length: int) -> Callable[[], torch.Tensor]:
    from hyprec.layers.attention import Attention, AttentionMetadata
    from hyprec.layers.attention_backends import select_backend

    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(length, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    attention = Attention(HEADS, HEAD_DIM)
    attention.attn_dtype = policy.attn_dtype

    def call() -> torch.Tensor:
        meta = AttentionMetadata.for_sequences([length], backend=select_backend("cpu", policy.attn_dtype), device="cpu")
        return attention(q, k, v, meta)

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "hyprec" / "bench" / "long-bert", help="model dir"
    )
    args = parser.parse_args(argv)

    from hyprec import LLM

    load_start = load_average()
    model_dir = long_bert(args.cache)
    llms = {label: LLM(str(model_dir), **options) for label, options in POLICIES.items()}
    lines = [
        "# Long inputs: attention seam and encoder stack per policy",
        "",
        f"- CPU: {cpu_model()}; flags: {cpu_flags()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"- model: random-weight BERT, all-MiniLM-L6-v2's shape (hidden 384, 6 layers, 12 heads of {HEAD_DIM}), "
        f"{max(LENGTHS)} positions; one sequence per call; median of {args.repeats} interleaved rounds",
        f"- load average (1/5/15 min) at start: {load_start}",
        "",
        "| tokens | policy | attention ms | vs float32 | encoder ms | vs float32 | encoder tokens/s | max rel err |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for length in args.lengths:
        ids = torch.randint(1000, 30000, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        attention = rounds({k: attention_call(llm.policy, length) for k, llm in llms.items()}, args.repeats)
        encoder = rounds(
            {k: (lambda llm=llm, ids=ids: llm.engine.hidden_states([ids])) for k, llm in llms.items()},
            args.repeats,
        )
        reference = llms["float32"].engine.hidden_states([ids])[0]
        for label, llm in llms.items():
            out = llm.engine.hidden_states([ids])[0]
            err = float((out - reference).abs().max() / reference.abs().max())
            lines.append(
                f"| {length} | {llm.policy.name} | {attention[label] * 1e3:.1f} | "
                f"{attention['float32'] / attention[label]:.2f}x | {encoder[label] * 1e3:.0f} | "
                f"{encoder['float32'] / encoder[label]:.2f}x | {length / encoder[label]:.0f} | {err:.1e} |"
            )
        print("\n".join(lines[-len(llms) :]), flush=True)
    lines += ["", f"- load average at end: {load_average()}"]
    report = "\n".join(lines) + "\n"
    publish(report, args.markdown)


if __name__ == "__main__":
    main()
