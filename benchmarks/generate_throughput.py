"""Generation throughput of hyprec against transformers (float32) and llama.cpp on Gemma-3-270M (Q4_K_M GGUF), on CPU.

What it measures
    For batch sizes 1 and 16, each variant processes the same real prompts (pydoc pages, all cut to
    ``--prompt-tokens`` tokens so no padding is involved) and generates ``--new-tokens`` tokens greedily:

    * ``transformers float32``: ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` + ``generate``;
    * ``llama.cpp``: the same file through ``llama-cpp-python``'s C API (``llama_cpp_peer.py``; skipped with a message
      when the optional extra is not installed), all sequences of a batch in one ``llama_decode``;
    * ``hyprec float32``, ``hyprec hybrid fp16`` (attention + KV cache fp16), ``hyprec hybrid bf16``, all with the
      default ``weights="auto"`` (every weight kept in the file's blocks), and ``hyprec float32, float32 weights``
      (``weights="float32"``: dequantised at load), plus the batch-invariant mode.

    Prefill throughput = prompt tokens / time of a 1-token generation; decode throughput = generated tokens after
    the first / (time of the full generation - prefill time). Each variant runs in its own spawned process, so
    ``peak RSS`` (ru_maxrss, MiB) is its own. Medians over ``--repeats`` runs after one warm-up.

    ``weight MB`` is what one decode step reads from memory (every weight once; the tied table is the head);
    ``GB/s`` at batch 1 is that times the decode rate: the memory bandwidth the variant achieves, against the
    machine's, measured in the same run (``torch.sum`` over 1 GiB, and a 1 GiB copy counted as read + write).
    ``KV B/token`` is the KV cache of one token over all layers (hyprec: its allocated cache; transformers: its
    float32 DynamicCache; llama.cpp: its default float16 cache).

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generate_throughput.py --markdown benchmarks/results/generate.md
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from llama_cpp_peer import unavailable
from machine import cpu_flags, cpu_model, load_average

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = {
    "transformers float32": None,
    "llama.cpp": None,
    "hyprec float32": {"dtype": "float32"},
    # The same with the weights dequantised to float32 at load, as before they were kept stored.
    "hyprec float32, float32 weights": {"dtype": "float32", "weights": "float32"},
    "hyprec hybrid fp16": {"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "float16"},
    "hyprec hybrid bf16": {"dtype": "hybrid", "attn_dtype": "bfloat16", "kv_cache_dtype": "bfloat16"},
    # The batch-invariant mode, whose cost this measures against the rows above.
    "hyprec float32 deterministic": {"dtype": "float32", "deterministic": True},
    "hyprec hybrid fp16 deterministic": {
        "dtype": "hybrid",
        "attn_dtype": "float16",
        "kv_cache_dtype": "float16",
        "deterministic": True,
    },
}


def prompts(batch: int, tokens: int) -> list[list[int]]:
    from hyprec.loading.generation_tokenizer import GenerationTokenizer
    from hyprec.loading.gguf import GGUFCheckpoint
    from hyprec.model_sources import resolve_model
    from hyprec.texts import pydoc_topics

    tok = GenerationTokenizer.from_gguf(GGUFCheckpoint(resolve_model("gemma")), "gemma3_text", [])
    pages = [p for p in sorted(pydoc_topics().values(), key=len, reverse=True)]
    return [tok.encode(page)[:tokens] for page in pages[:batch]]


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_variant(name: str, batches: list[int], prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """In a fresh process: load, then time prefill and full generation for each batch size."""
    import torch

    result: dict = {"name": name, "batches": {}}
    from hyprec.model_sources import resolve_model

    gemma_path = resolve_model("gemma")
    if name == "transformers float32":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(gemma_path.parent), gguf_file=gemma_path.name, dtype=torch.float32
        ).eval()
        cfg = model.config
        result["kv_bytes_per_token"] = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
        result["weight_bytes"] = sum(p.nbytes for p in model.parameters())  # the tied table counted once

        def generate(ids: list[list[int]], n: int) -> None:
            with torch.inference_mode():
                model.generate(torch.tensor(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    elif name == "llama.cpp":
        import gguf

        from llama_cpp_peer import LlamaCpp

        peer = LlamaCpp(
            gemma_path, threads=torch.get_num_threads(), max_seqs=max(batches), seq_tokens=prompt_tokens + new_tokens
        )
        reader = gguf.GGUFReader(gemma_path)
        result["weight_bytes"] = sum(int(t.n_bytes) for t in reader.tensors)
        field = reader.fields

        def meta(key: str) -> int:
            return int(field[f"gemma3.{key}"].contents())

        head_dim = meta("attention.key_length")
        result["kv_bytes_per_token"] = 2 * meta("block_count") * meta("attention.head_count_kv") * head_dim * 2

        def generate(ids: list[list[int]], n: int) -> None:
            peer.generate(ids, n)
    else:
        from hyprec import LLM, SamplingParams

        llm = LLM(gemma_path, max_model_len=prompt_tokens + new_tokens + 16, **VARIANTS[name])
        info = llm.info()
        result["kv_bytes_per_token"] = info["kv_cache_bytes_per_token"]
        result["weight_bytes"] = info["weight_memory_mib"] * 2**20
        result["policy"] = f"{info['policy']['policy']}, weights {info['policy']['weights']}"

        def generate(ids: list[list[int]], n: int) -> None:
            llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    for batch in batches:
        ids = prompts(batch, prompt_tokens)
        prefill = _timed(lambda ids=ids: generate(ids, 1), repeats)
        full = _timed(lambda ids=ids: generate(ids, new_tokens), repeats)
        result["batches"][batch] = {
            "prefill_tok_s": batch * prompt_tokens / prefill,
            "decode_tok_s": batch * (new_tokens - 1) / max(full - prefill, 1e-9),
        }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def machine() -> str:
    import torch

    threads = torch.get_num_threads()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, flags {cpu_flags()}, torch {torch.__version__} ({threads} threads), "
        f"Python {platform.python_version()}"
    )


def memory_bandwidth(repeats: int = 7) -> dict[str, float]:
    """GB/s of this machine's memory at torch's thread count: a sum over 1 GiB (read) and a 1 GiB copy (read +
    write), medians of ``repeats``."""
    import torch

    x = torch.ones(1 << 28)
    y = torch.empty_like(x)
    read = _timed(lambda: x.sum(), repeats)
    copy = _timed(lambda: y.copy_(x), repeats)
    return {"read": x.nbytes / read / 1e9, "copy": 2 * x.nbytes / copy / 1e9}


def table(results: list[dict], batches: list[int], bandwidth: dict[str, float]) -> str:
    peer = results[0]
    lines = [
        "| variant | batch | prefill tok/s | vs peer | decode tok/s | vs peer | weight MB | GB/s (% of read) | "
        "peak RSS MiB | KV B/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for b in batches:
            m, p = r["batches"][b], peer["batches"][b]
            achieved = r["weight_bytes"] * m["decode_tok_s"] / 1e9
            speed = f"{achieved:.1f} ({100 * achieved / bandwidth['read']:.0f}%)" if b == 1 else ""
            lines.append(
                f"| {r['name']} | {b} | {m['prefill_tok_s']:.0f} | {m['prefill_tok_s'] / p['prefill_tok_s']:.2f} | "
                f"{m['decode_tok_s']:.1f} | {m['decode_tok_s'] / p['decode_tok_s']:.2f} | "
                f"{r['weight_bytes'] / 1e6:.0f} | {speed} | {r['peak_rss_mib']:.0f} | {r['kv_bytes_per_token']} |"
            )
    policies = [f"- {r['name']}: {r['policy']}" for r in results if "policy" in r]
    return "\n".join([*lines, "", "Resolved policies:", *policies])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    load_at_start = load_average()
    if "llama.cpp" in args.variants and unavailable() is not None:
        print(f"skipping llama.cpp: {unavailable()}", file=sys.stderr)
        args.variants.remove("llama.cpp")
    import torch

    bandwidth = memory_bandwidth()
    results = []
    ctx = multiprocessing.get_context("spawn")
    for name in args.variants:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results.append(
                pool.submit(run_variant, name, args.batches, args.prompt_tokens, args.new_tokens, args.repeats).result()
            )
    header = (
        f"Gemma-3-270M (GGUF Q4_K_M), prompts {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, greedy, median of {args.repeats}\nMachine: {machine()}\n"
        f"Load average (1/5/15 min) at start: {load_at_start}, at end: {load_average()}\n"
        f"Memory bandwidth ({torch.get_num_threads()} threads): read {bandwidth['read']:.1f} GB/s, "
        f"copy {bandwidth['copy']:.1f} GB/s\n"
    )
    text = header + "\n" + table(results, args.batches, bandwidth) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
