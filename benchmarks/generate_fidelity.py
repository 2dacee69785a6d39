"""Teacher-forced fidelity of hyprec and llama.cpp against transformers float32, on Gemma-3-270M (Q4_K_M GGUF).

What it measures
    The ``--texts`` longest pydoc pages, cut to ``--tokens`` tokens each (as ``hyprec compare`` does), are scored
    teacher-forced: at every position each variant's next-token distribution is compared with transformers float32
    on the same file (dequantised to float32 by transformers' own GGUF loader):

    * ``top-1``: the share of positions where the most likely next token is the reference's;
    * ``mean KL``: KL(reference || variant) in nats, averaged over positions;
    * ``ppl ratio``: the variant's perplexity on the texts over the reference's.

    Variants: hyprec's default-weights float32 / hybrid fp16 / hybrid bf16 policies (blocks kept as stored),
    hyprec float32 with float32 weights, and llama.cpp (``llama_cpp_peer.py``; skipped with a message when the
    optional extra is not installed) with its defaults (float16 KV cache; activations rounded to 8 bits for its
    integer dot products).

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generate_fidelity.py --markdown benchmarks/results/fidelity.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llama_cpp_peer import LlamaCpp, unavailable
from machine import cpu_flags, cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HYPREC = {
    "hyprec float32": {"dtype": "float32"},
    "hyprec float32, float32 weights": {"dtype": "float32", "weights": "float32"},
    "hyprec hybrid fp16": {"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "float16"},
    "hyprec hybrid bf16": {"dtype": "hybrid", "attn_dtype": "bfloat16", "kv_cache_dtype": "bfloat16"},
}


def texts(path: Path, count: int, tokens: int) -> list[list[int]]:
    from hyprec.loading.generation_tokenizer import GenerationTokenizer
    from hyprec.loading.gguf import GGUFCheckpoint
    from hyprec.texts import pydoc_topics

    tok = GenerationTokenizer.from_gguf(GGUFCheckpoint(path), "gemma3_text", [])
    pages = sorted(pydoc_topics().values(), key=len, reverse=True)[:count]
    return [tok.encode(page)[:tokens] for page in pages]


@torch.inference_mode()
def reference_log_probs(path: Path, ids: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return [torch.log_softmax(model(torch.tensor([t])).logits[0, :-1].float(), dim=-1) for t in ids]


def score(name: str, logits_of: Callable[[list[int]], torch.Tensor], ids, refs) -> dict:
    agree = total = 0
    kl = nll = ref_nll = 0.0
    for t, ref in zip(ids, refs, strict=True):
        ours = torch.log_softmax(logits_of(t).float(), dim=-1)
        if not torch.isfinite(ours).all():
            raise SystemExit(f"{name}: non-finite log-probabilities")
        targets = torch.tensor(t[1:])[:, None]
        agree += int((ours.argmax(1) == ref.argmax(1)).sum())
        total += len(ref)
        kl += float((ref.exp() * (ref - ours)).sum(1).double().sum())
        nll -= float(ours.gather(1, targets).double().sum())
        ref_nll -= float(ref.gather(1, targets).double().sum())
    return {
        "name": name,
        "top1": agree / total,
        "kl": kl / total,
        "ppl_ratio": math.exp((nll - ref_nll) / total),
        "positions": total,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    from hyprec import LLM
    from hyprec.model_sources import resolve_model

    path = resolve_model("gemma")
    ids = texts(path, args.texts, args.tokens)
    print("transformers float32 reference ...", file=sys.stderr, flush=True)
    refs = reference_log_probs(path, ids)
    rows = []
    for name, policy in HYPREC.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        llm = LLM(path, max_model_len=args.tokens + 16, **policy)
        rows.append(score(name, lambda t, llm=llm: torch.cat([lg for _, lg in llm.engine.logits(t)]), ids, refs))
        del llm
    if unavailable() is None:
        print("llama.cpp ...", file=sys.stderr, flush=True)
        peer = LlamaCpp(path, threads=torch.get_num_threads(), max_seqs=1, seq_tokens=args.tokens)
        rows.append(score("llama.cpp", lambda t: torch.from_numpy(peer.teacher_forced(t)), ids, refs))
        peer.close()
    else:
        print(f"skipping llama.cpp: {unavailable()}", file=sys.stderr)
    lines = [
        f"Gemma-3-270M (GGUF Q4_K_M), teacher-forced on the {args.texts} longest pydoc pages x {args.tokens} tokens "
        f"({rows[0]['positions']} positions) against transformers float32 on the same file",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, flags {cpu_flags()}, torch {torch.__version__}",
        "",
        "| variant | top-1 agreement | mean KL (nats) | perplexity ratio |",
        "|---|---|---|---|",
        *(f"| {r['name']} | {r['top1']:.4f} | {r['kl']:.2e} | {r['ppl_ratio']:.5f} |" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
