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
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from machine import cpu_flags, cpu_model, load_average

# Never touch the network, in this process and in the spawned ones (they inherit the environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOP_K = 10


@dataclass(frozen=True)
class Variant:
    label: str
    engine: str  # "st" or "hyprec"
    dtype: str = "float32"
    attn_dtype: str = "auto"
    deterministic: bool = False  # batch-invariant mode (hyprec only)


VARIANTS: tuple[Variant, ...] = (
    Variant("sentence-transformers float32", "st"),
    Variant("hyprec float32", "hyprec", "float32"),
    Variant("hyprec hybrid fp16 attn", "hyprec", "hybrid", "float16"),
    Variant("hyprec hybrid bf16 attn", "hyprec", "hybrid", "bfloat16"),
    Variant("hyprec bfloat16 (whole model)", "hyprec", "bfloat16"),
    Variant("hyprec float32 deterministic", "hyprec", "float32", deterministic=True),
    Variant("hyprec hybrid fp16 attn deterministic", "hyprec", "hybrid", "float16", deterministic=True),
)


@dataclass
class Measurement:
    """What one variant's process reports back."""

    variant: Variant
    seconds: list[float]  # wall-clock seconds of each timed pass
    cpu_seconds: list[float]  # process CPU seconds (all threads) of each timed pass
    n_texts: int
    embeddings: np.ndarray
    padding_fraction: float
    batches: int
    peak_rss_mib: float
    hwm_rss_mib: float  # VmHWM of the process's own address space, a cross-check of ru_maxrss
    policy: str
    torch_version: str
    torch_threads: int

    @property
    def texts_per_s(self) -> list[float]:
        return [self.n_texts / s for s in self.seconds]

    @property
    def median_texts_per_s(self) -> float:
        return statistics.median(self.texts_per_s)

    @property
    def median_cpu_seconds(self) -> float:
        return statistics.median(self.cpu_seconds)


# --------------------------------------------------------------------------------------------------------
# Inside a variant's process
# --------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mib() -> float:
    """``VmHWM`` from /proc/self/status in MiB, or NaN where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def st_padding(st, texts: Sequence[str], batch_size: int) -> tuple[float, int]:
    """Padding fraction and batch count of ``SentenceTransformer.encode`` on ``texts``.

    Mirrors its batching: texts sorted by character length (longest first, the same ``np.argsort`` call),
    cut into batches of ``batch_size``, each padded to its longest tokenised text. Token lengths come from
    ``st.preprocess`` (whitespace stripped, truncated at ``st.max_seq_length``).
    """
    lengths = st.preprocess(list(texts))["attention_mask"].sum(dim=1).tolist()
    order = np.argsort([-len(t) for t in texts])
    real = padded = batches = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += len(batch) * max(batch)
        batches += 1
    return 1.0 - real / padded, batches


class StRunner:
    """sentence-transformers float32, ``encode`` with the given batch size."""

    def __init__(self, model: str, texts: Sequence[str], batch_size: int):
        import torch
        from sentence_transformers import SentenceTransformer

        from hyprec.model_sources import resolve_model

        self.texts, self.batch_size = list(texts), batch_size
        self.st = SentenceTransformer(str(resolve_model(model)), device="cpu", model_kwargs={"dtype": torch.float32})
        attn = getattr(self.st[0].model.config, "_attn_implementation", "?")
        self.policy = f"{next(self.st.parameters()).dtype}, attention {attn}".replace("torch.", "")

    def embed(self) -> np.ndarray:
        return self.st.encode(self.texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)

    def padding(self) -> tuple[float, int]:
        return st_padding(self.st, self.texts, self.batch_size)


class HyprecRunner:
    """hyprec ``LLM.embed`` under the variant's dtype policy."""

    def __init__(self, model: str, variant: Variant, texts: Sequence[str]):
        from hyprec import LLM

        self.texts = list(texts)
        self.llm = LLM(model, dtype=variant.dtype, attn_dtype=variant.attn_dtype, deterministic=variant.deterministic)
        self.policy = self.llm.policy.name

    def embed(self) -> np.ndarray:
        return self.llm.embed(self.texts)

    def padding(self) -> tuple[float, int]:
        """Of the last ``embed`` call."""
        stats = self.llm.engine.last_stats
        return stats.padding_fraction, stats.batches


# One loaded variant per worker process. A ProcessPoolExecutor with one worker keeps that process (and this
# global) alive between submissions, so load, timed passes and the report are separate calls.
_runner: StRunner | HyprecRunner | None = None
_wall: list[float] = []
_cpu: list[float] = []
_last: np.ndarray | None = None


def worker_load(model: str, variant: Variant, n_texts: int, batch_size: int, threads: int) -> None:
    """Load the variant and run the warm-up pass (``threads`` > 0 sets torch's intra-op threads)."""
    global _runner
    import torch

    from hyprec.texts import evaluation_texts

    if threads > 0:
        torch.set_num_threads(threads)
    texts = evaluation_texts(n_texts)
    log(f"[{model}] {variant.label}: loading and warming up")
    _runner = StRunner(model, texts, batch_size) if variant.engine == "st" else HyprecRunner(model, variant, texts)
    _runner.embed()


def worker_pass() -> float:
    """One timed pass over all texts; returns its wall-clock seconds."""
    global _last
    assert _runner is not None
    wall, cpu = time.perf_counter(), time.process_time()
    _last = _runner.embed()
    _wall.append(time.perf_counter() - wall)
    _cpu.append(time.process_time() - cpu)
    return _wall[-1]


def worker_report(variant: Variant) -> Measurement:
    import torch

    assert _runner is not None and _last is not None
    padding, batches = _runner.padding()
    return Measurement(
        variant=variant,
        seconds=list(_wall),
        cpu_seconds=list(_cpu),
        n_texts=len(_runner.texts),
        embeddings=np.asarray(_last, dtype=np.float32),
        padding_fraction=float(padding),
        batches=int(batches),
        peak_rss_mib=peak_rss_mib(),
        hwm_rss_mib=vm_hwm_mib(),
        policy=_runner.policy,
        torch_version=str(torch.__version__),  # a plain str: unpickling TorchVersion would import torch here
        torch_threads=torch.get_num_threads(),
    )


def measure_model(model: str, n_texts: int, repeats: int, batch_size: int, threads: int) -> list[Measurement]:
    """All variants of one model, each in its own spawned process, timed in interleaved rounds.

    Every variant is loaded and warmed up first; then each round times one pass of every variant, the
    starting variant rotating from round to round. Load from other work on the machine thus spreads over
    all variants instead of landing on whichever ran while it lasted.

    A child's ``ru_maxrss`` starts at its parent's high-water mark (Linux carries it across fork and exec),
    so this process deliberately never imports torch, hyprec or sentence-transformers.
    """
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        pools = [stack.enter_context(ProcessPoolExecutor(1, mp_context=context)) for _ in VARIANTS]
        for pool, variant in zip(pools, VARIANTS, strict=True):
            pool.submit(worker_load, model, variant, n_texts, batch_size, threads).result()
        for r in range(repeats):
            for i in range(len(VARIANTS)):
                k = (i + r) % len(VARIANTS)
                seconds = pools[k].submit(worker_pass).result()
                log(f"[{model}] round {r + 1}/{repeats} {VARIANTS[k].label}: {seconds:.2f} s")
        return [pool.submit(worker_report, v).result() for pool, v in zip(pools, VARIANTS, strict=True)]


# --------------------------------------------------------------------------------------------------------
# Comparison against the sentence-transformers float32 embeddings
# --------------------------------------------------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(unit_rows(a) * unit_rows(b), axis=1)))


def nearest_neighbours(x: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices ``[n, k]`` of each row's ``k`` most cosine-similar other rows."""
    unit = unit_rows(x)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> float:
    """Mean share of each row's top-``k`` neighbours under ``a`` that are also its top-``k`` under ``b``."""
    na, nb = nearest_neighbours(a, k), nearest_neighbours(b, k)
    return float(np.mean([len(set(ra) & set(rb)) / k for ra, rb in zip(na, nb, strict=True)]))


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def machine_header(args: argparse.Namespace, first: Measurement, load_at_start: str) -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    python = platform.python_version()
    return [
        "# Embedding throughput: hyprec vs sentence-transformers",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable); flags: {cpu_flags()}",
        f"- torch {first.torch_version}, {first.torch_threads} intra-op threads; Python {python}",
        f"- {first.n_texts} texts (`hyprec.texts.evaluation_texts`); one warm-up pass, then the median of "
        f"{args.repeats} timed passes taken in interleaved rounds; sentence-transformers batch size {args.batch_size}",
        f"- load average (1/5/15 min) at start: {load_at_start}, at end: {load_average()}",
        f"- peak RSS floor inherited from the parent process: {peak_rss_mib():.0f} MiB",
    ]


COLUMNS = (
    "variant",
    "policy",
    "texts/s",
    "range",
    "vs ST",
    "CPU s/pass",
    "vs ST (CPU)",
    "padding",
    "batches",
    "peak RSS MiB",
    "min cos",
    "top-10",
)


def table_row(r: Measurement, ref: Measurement) -> list[str]:
    tps = r.texts_per_s
    return [
        r.variant.label,
        r.policy,
        f"{r.median_texts_per_s:.1f}",
        f"{min(tps):.1f}–{max(tps):.1f}",
        f"{r.median_texts_per_s / ref.median_texts_per_s:.2f}x",
        f"{r.median_cpu_seconds:.2f}",
        f"{ref.median_cpu_seconds / r.median_cpu_seconds:.2f}x",
        f"{r.padding_fraction:.3f}",
        str(r.batches),
        f"{r.peak_rss_mib:.0f}",
        f"{min_cosine(r.embeddings, ref.embeddings):.6f}",
        f"{neighbour_overlap(r.embeddings, ref.embeddings):.3f}",
    ]


def model_table(model: str, results: list[Measurement]) -> list[str]:
    """A markdown table; the first result (sentence-transformers float32) is the reference."""
    rows = [COLUMNS, ["---", "---"] + ["---:"] * (len(COLUMNS) - 2)]
    rows += [table_row(r, results[0]) for r in results]
    lines = ["", f"## {model}", ""] + ["| " + " | ".join(row) + " |" for row in rows]
    mismatched = [r.variant.label for r in results if abs(r.peak_rss_mib - r.hwm_rss_mib) > 0.05 * r.hwm_rss_mib]
    if mismatched:
        lines += ["", f"Note: ru_maxrss differs from VmHWM by more than 5% for: {', '.join(mismatched)}."]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["minilm"], help="aliases or model directories")
    parser.add_argument("--texts", type=int, default=200, help="number of evaluation texts (>= 40)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads in each variant (0: torch's default)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.texts < 40 or args.repeats < 1 or args.batch_size < 1 or args.threads < 0:
        parser.error("--texts must be >= 40, --repeats and --batch-size >= 1, --threads >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = load_average()
    tables: list[str] = []
    report = ""
    for model in args.model:
        results = measure_model(model, args.texts, args.repeats, args.batch_size, args.threads)
        tables += model_table(model, results)
        report = "\n".join(machine_header(args, results[0], load_at_start) + tables) + "\n"
        if args.markdown:  # after every model, so a long run that dies late keeps what it measured
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(report, encoding="utf-8")
            log(f"wrote {args.markdown}")
    print(report)


if __name__ == "__main__":
    main()
