"""The machinery the embedding benchmarks share (``embed_throughput.py``, ``peers.py``).

* Every variant runs in its own spawned process (a one-worker ``ProcessPoolExecutor`` that stays alive between
  calls): load, one warm-up pass, then timed passes. Nothing else is loaded in that process, so its peak RSS is
  its own. The parent never imports torch, hyprec or a runtime (a child's ``ru_maxrss`` starts at its parent's
  high-water mark: Linux carries it across fork and exec).
* The timed passes run in interleaved rounds, one pass of every variant per round, the starting variant
  rotating, so that load from other work on the machine hits all variants alike.
* A variant is a :class:`Job`: a label, a module-level loader function (run in the variant's process, it
  returns a :class:`Runner`) and its keyword arguments. A loader that cannot run its variant here (package not
  installed, execution provider missing) raises :class:`SkipVariant`; :func:`measure_model` reports it and goes
  on with the others.
* Fidelity is measured against a reference run (sentence-transformers float32): the worst per-text cosine and
  the overlap of each text's 10 nearest neighbours.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from machine import cpu_flags, cpu_model, load_average

# Never touch the network, in this process and in the spawned ones (they inherit the environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOP_K = 10


class SkipVariant(Exception):
    """Raised by a loader whose variant cannot run here; the message says why (one line)."""


class Runner(Protocol):
    texts: list[str]
    policy: str  # what actually runs: resolved dtype policy, precision, execution provider
    threads: int  # the intra-op thread count the runtime reports (or was given)
    versions: dict[str, str]  # package -> version, for the report header

    def embed(self) -> np.ndarray: ...

    def padding(self) -> tuple[float, int]:
        """Padding fraction and batch count of the last ``embed`` call."""
        ...


@dataclass(frozen=True)
class Job:
    """One variant: ``load(**kwargs)`` runs in the variant's own process and returns its :class:`Runner`."""

    label: str
    load: Callable[..., Runner]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HyprecPolicy:
    """A hyprec dtype policy to benchmark (``LLM(dtype=..., attn_dtype=..., matmul_precision=..., deterministic=...)``).
    Named policies pin ``matmul_precision`` (``highest``: exact float32 GEMMs) so that a row means the same on every
    machine; only ``hyprec default`` leaves everything to ``auto``."""

    label: str
    dtype: str
    attn_dtype: str = "auto"
    deterministic: bool = False
    matmul_precision: str = "highest"

    def job(self, model: str, texts: Sequence[str], threads: int) -> Job:
        options = {
            "dtype": self.dtype,
            "attn_dtype": self.attn_dtype,
            "deterministic": self.deterministic,
            "matmul_precision": self.matmul_precision,
        }
        return Job(self.label, load_hyprec, {"model": model, "texts": list(texts), "threads": threads, **options})


#: The hyprec policies every embedding benchmark runs; one line each, extend here.
HYPREC_POLICIES: tuple[HyprecPolicy, ...] = (
    HyprecPolicy("hyprec float32", "float32"),
    HyprecPolicy("hyprec float32, bf16x3 GEMMs", "float32", matmul_precision="high"),
    HyprecPolicy("hyprec hybrid fp16 attn", "hybrid", "float16"),
    HyprecPolicy("hyprec hybrid fp16 attn, bf16x3 GEMMs", "hybrid", "float16", matmul_precision="high"),
    HyprecPolicy("hyprec hybrid bf16 attn", "hybrid", "bfloat16"),
    HyprecPolicy("hyprec hybrid bf16 attn, bf16x3 GEMMs", "hybrid", "bfloat16", matmul_precision="high"),
    HyprecPolicy("hyprec bfloat16 (whole model)", "bfloat16"),
)


@dataclass
class Measurement:
    """What one variant's process reports back."""

    label: str
    seconds: list[float]  # wall-clock seconds of each timed pass
    cpu_seconds: list[float]  # process CPU seconds (all threads) of each timed pass
    n_texts: int
    embeddings: np.ndarray
    padding_fraction: float
    batches: int
    peak_rss_mib: float
    hwm_rss_mib: float  # VmHWM of the process's own address space, a cross-check of ru_maxrss
    policy: str
    threads: int
    versions: dict[str, str]

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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """The batches ``SentenceTransformer.encode`` forms: indices sorted by character length, longest first (the
    same ``np.argsort`` call), cut into runs of ``batch_size``."""
    order = np.argsort([-len(t) for t in texts])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padding_of(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> tuple[float, int]:
    """Padding fraction and batch count when each batch is padded to its longest member."""
    real = sum(int(lengths[i]) for batch in batches for i in batch)
    padded = sum(len(batch) * max(int(lengths[i]) for i in batch) for batch in batches)
    return 1.0 - real / padded, len(batches)


def set_torch_threads(threads: int):
    """Imports torch and sets its intra-op threads (``threads`` > 0); returns the module."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch


class StRunner:
    """sentence-transformers ``encode`` with the given batch size and weight dtype."""

    def __init__(self, model: str, texts: Sequence[str], batch_size: int, dtype: str, threads: int):
        torch = set_torch_threads(threads)
        try:
            import sentence_transformers
        except ImportError:
            raise SkipVariant("sentence-transformers is not installed (pip install 'hyprec[test]')") from None

        from hyprec.model_sources import resolve_model

        self.texts, self.batch_size = list(texts), batch_size
        self.st = sentence_transformers.SentenceTransformer(
            str(resolve_model(model)), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)}
        )
        attn = getattr(self.st[0].model.config, "_attn_implementation", "?")
        self.policy = f"{next(self.st.parameters()).dtype}, attention {attn}".replace("torch.", "")
        self.threads = torch.get_num_threads()
        # plain strs: unpickling TorchVersion in the parent would import torch there
        self.versions = {
            "torch": str(torch.__version__),
            "sentence-transformers": sentence_transformers.__version__,
            "transformers": importlib.metadata.version("transformers"),
        }

    def embed(self) -> np.ndarray:
        return self.st.encode(self.texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)

    def padding(self) -> tuple[float, int]:
        """Token lengths from ``st.preprocess`` (truncated at ``st.max_seq_length``), batches as ``encode``."""
        lengths = self.st.preprocess(self.texts)["attention_mask"].sum(dim=1).tolist()
        return padding_of(lengths, length_sorted_batches(self.texts, self.batch_size))


class HyprecRunner:
    """hyprec ``LLM.embed`` under a dtype policy."""

    def __init__(self, model: str, texts: Sequence[str], threads: int, **policy: Any):
        torch = set_torch_threads(threads)
        import hyprec

        self.texts = list(texts)
        self.llm = hyprec.LLM(model, **policy)
        self.policy = self.llm.policy.name
        self.threads = torch.get_num_threads()
        self.versions = {"torch": str(torch.__version__), "hyprec": hyprec.__version__}

    def embed(self) -> np.ndarray:
        return self.llm.embed(self.texts)

    def padding(self) -> tuple[float, int]:
        stats = self.llm.engine.last_stats
        return stats.padding_fraction, stats.batches


def load_st(model: str, texts: Sequence[str], threads: int, batch_size: int, dtype: str = "float32") -> StRunner:
    return StRunner(model, texts, batch_size, dtype, threads)


ST_REFERENCE = "sentence-transformers float32"


def st_job(model: str, texts: Sequence[str], threads: int, batch_size: int, dtype: str = "float32") -> Job:
    """sentence-transformers with weights in ``dtype``, labelled ``sentence-transformers <dtype>``."""
    options = {"model": model, "texts": list(texts), "threads": threads, "batch_size": batch_size, "dtype": dtype}
    return Job(f"sentence-transformers {dtype}", load_st, options)


def find(results: Sequence[Measurement], label: str) -> Measurement | None:
    """The measurement labelled ``label``, or None where that variant was skipped."""
    return next((r for r in results if r.label == label), None)


def load_hyprec(model: str, texts: Sequence[str], threads: int, **policy: Any) -> HyprecRunner:
    return HyprecRunner(model, texts, threads, **policy)


def evaluation_texts(n: int) -> list[str]:
    """``hyprec.texts.evaluation_texts(n)`` (run in a child process: importing hyprec imports torch)."""
    from hyprec.texts import evaluation_texts as texts

    return texts(n)


# One loaded variant per worker process. A ProcessPoolExecutor with one worker keeps that process (and this
# global) alive between submissions, so load, timed passes and the report are separate calls.
_runner: Runner | None = None
_wall: list[float] = []
_cpu: list[float] = []
_last: np.ndarray | None = None


def worker_load(model: str, job: Job) -> None:
    """Load the variant and run the warm-up pass."""
    global _runner
    log(f"[{model}] {job.label}: loading and warming up")
    _runner = job.load(**job.kwargs)
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


def worker_report(label: str) -> Measurement:
    assert _runner is not None and _last is not None
    padding, batches = _runner.padding()
    return Measurement(
        label=label,
        seconds=list(_wall),
        cpu_seconds=list(_cpu),
        n_texts=len(_runner.texts),
        embeddings=np.asarray(_last, dtype=np.float32),
        padding_fraction=float(padding),
        batches=int(batches),
        peak_rss_mib=peak_rss_mib(),
        hwm_rss_mib=vm_hwm_mib(),
        policy=_runner.policy,
        threads=int(_runner.threads),
        versions=dict(_runner.versions),
    )


# --------------------------------------------------------------------------------------------------------
# In the parent
# --------------------------------------------------------------------------------------------------------


def spawn_context():
    return multiprocessing.get_context("spawn")


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned process (keeps torch and hyprec out of this one)."""
    with ProcessPoolExecutor(1, mp_context=spawn_context()) as pool:
        return pool.submit(fn, *args).result()


def measure_model(model: str, jobs: Sequence[Job], repeats: int) -> tuple[list[Measurement], list[str]]:
    """All ``jobs`` of one model, each in its own spawned process, timed in interleaved rounds.

    Every variant is loaded and warmed up first; then each round times one pass of every variant, the
    starting variant rotating from round to round. Returns the measurements (in ``jobs`` order, skipped ones
    left out) and one line per skipped variant. A variant is skipped when its loader raises
    :class:`SkipVariant` or its process dies while loading; any other error propagates.
    """
    loaded: list[tuple[Job, ProcessPoolExecutor]] = []
    skipped: list[str] = []
    with ExitStack() as stack:
        for job in jobs:
            pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=spawn_context()))
            try:
                pool.submit(worker_load, model, job).result()
            except (SkipVariant, BrokenProcessPool) as exc:
                reason = str(exc) if isinstance(exc, SkipVariant) else f"its process died while loading ({exc})"
                skipped.append(f"{job.label}: skipped, {reason}")
                log(f"[{model}] {skipped[-1]}")
                continue
            loaded.append((job, pool))
        for r in range(repeats):
            for i in range(len(loaded)):
                job, pool = loaded[(i + r) % len(loaded)]
                seconds = pool.submit(worker_pass).result()
                log(f"[{model}] round {r + 1}/{repeats} {job.label}: {seconds:.2f} s")
        return [pool.submit(worker_report, job.label).result() for job, pool in loaded], skipped


# --------------------------------------------------------------------------------------------------------
# Comparison against the reference embeddings
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
# Command line and report
# --------------------------------------------------------------------------------------------------------


def base_parser(doc: str, threads_default: int, threads_help: str) -> argparse.ArgumentParser:
    """The options every embedding benchmark takes; the description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["minilm"], help="aliases or model directories")
    parser.add_argument("--texts", "--limit", type=int, default=200, help="number of evaluation texts (>= 40)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the peers that take one")
    parser.add_argument("--threads", type=int, default=threads_default, help=threads_help)
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, min_threads: int = 0) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.texts < 40 or args.repeats < 1 or args.batch_size < 1 or args.threads < min_threads:
        parser.error(f"--texts must be >= 40, --repeats and --batch-size >= 1, --threads >= {min_threads}")
    return args


NOT_MEASURED = "–"


def speed_ratio(r: Measurement, ref: Measurement | None) -> str:
    """Throughput of ``r`` relative to ``ref`` (wall time)."""
    return NOT_MEASURED if ref is None else f"{r.median_texts_per_s / ref.median_texts_per_s:.2f}x"


def cpu_ratio(r: Measurement, ref: Measurement | None) -> str:
    """Throughput of ``r`` relative to ``ref`` in process CPU time."""
    return NOT_MEASURED if ref is None else f"{ref.median_cpu_seconds / r.median_cpu_seconds:.2f}x"


def cells(r: Measurement, ref: Measurement | None) -> dict[str, str]:
    """Every column a benchmark table may show, keyed by name; ``ref`` is the fidelity and speed reference."""
    tps = r.texts_per_s
    return {
        "variant": r.label,
        "policy": r.policy,
        "texts/s": f"{r.median_texts_per_s:.1f}",
        "range": f"{min(tps):.1f}–{max(tps):.1f}",
        "vs ref": speed_ratio(r, ref),
        "CPU s/pass": f"{r.median_cpu_seconds:.2f}",
        "vs ref (CPU)": cpu_ratio(r, ref),
        "padding": f"{r.padding_fraction:.3f}",
        "batches": str(r.batches),
        "peak RSS MiB": f"{r.peak_rss_mib:.0f}",
        "min cos": NOT_MEASURED if ref is None else f"{min_cosine(r.embeddings, ref.embeddings):.6f}",
        "top-10": NOT_MEASURED if ref is None else f"{neighbour_overlap(r.embeddings, ref.embeddings):.3f}",
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2) -> list[str]:
    """Markdown lines; the first ``text_columns`` columns are left-aligned, the rest right-aligned."""
    rule = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(row) + " |" for row in [list(header), rule, *rows]]


def notes(results: Sequence[Measurement], skipped: Sequence[str]) -> list[str]:
    """Markdown lines under a table: variants whose two RSS readings disagree, and the skipped variants."""
    lines = []
    mismatched = [r.label for r in results if abs(r.peak_rss_mib - r.hwm_rss_mib) > 0.05 * r.hwm_rss_mib]
    if mismatched:
        lines += ["", f"Note: ru_maxrss differs from VmHWM by more than 5% for: {', '.join(mismatched)}."]
    if skipped:
        lines += ["", "Not measured:", "", *(f"- {line}" for line in skipped)]
    return lines


def machine_header(title: str, facts: Sequence[str], load_at_start: str) -> list[str]:
    """Title, CPU (model, cores, the half-precision flags), ``facts``, load average at start and now."""
    return [
        f"# {title}",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({usable_cores()} usable); flags: {cpu_flags()}",
        *(f"- {fact}" for fact in facts),
        f"- Python {platform.python_version()}; load average (1/5/15 min) at start: {load_at_start}, "
        f"at end: {load_average()}",
        f"- peak RSS floor inherited from the parent process: {peak_rss_mib():.0f} MiB",
    ]


def write_report(path: Path | None, report: str) -> None:
    """Write ``report`` to ``path`` (if given); called after every model, so a run that dies late keeps what it
    measured."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")
        log(f"wrote {path}")
