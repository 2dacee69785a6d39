"""Load test of ``hyprec serve`` (embeddings) on loopback: 64 concurrent clients x 20 requests of mixed sizes.

Starts the real server in a subprocess, computes every request's expected result offline with ``LLM.embed`` (same
model and policy), then fires the requests. Reports failures, mismatches against the offline result, p50/p99
latency, throughput, and the server-side batching seen in /metrics (requests per engine call). Bounded: 1,280
requests, a 600 s overall limit.

"Identical" means the batch-invariance tolerance of the test suite (max abs diff <= 1e-5 or cosine >= 1 - 1e-6
per row): the server packs concurrent requests into shared forward passes, and a different padding layout inside
attention can move the last float32 bits.

Usage
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/server_load.py --markdown benchmarks/results/server_load.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The repository root, for the test suite's server launcher (tests/helpers.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    diff = np.abs(a - b).max(axis=1)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return bool(np.all((diff <= 1e-5) | (cos >= 1 - 1e-6)))


def _batch_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        for name in ("hyprec_batch_requests_sum", "hyprec_batch_requests_count", "hyprec_forward_passes_total"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[-1])
    return out


async def _client(http, url: str, requests: list[list[str]], expected: list[np.ndarray], latencies: list, errors: list):
    for texts, want in zip(requests, expected, strict=True):
        start = time.perf_counter()
        try:
            r = await http.post(f"{url}/v1/embeddings", json={"input": texts, "encoding_format": "float"})
        except Exception as exc:  # every failure is counted; none may happen
            errors.append(repr(exc))
            continue
        latencies.append(time.perf_counter() - start)
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:200]}")
            continue
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        if got.shape != want.shape or not _same(got, want):
            errors.append("mismatch against the offline result")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    import httpx

    from hyprec import LLM
    from hyprec.texts import evaluation_texts
    from tests.helpers import running_server

    offline = LLM(args.model)
    candidates = evaluation_texts(400)
    lengths = [len(ids) for ids in offline.engine.tokenize(candidates)]
    pool = [t for t, n in zip(candidates, lengths, strict=True) if n < 256]  # longer inputs are refused by design
    rng = random.Random(0)
    sizes = [1, 1, 2, 4, 8, 16]  # mixed: mostly small requests, some larger ones
    plan = [[rng.sample(pool, rng.choice(sizes)) for _ in range(args.requests)] for _ in range(args.clients)]
    expected = [[offline.embed(texts) for texts in client] for client in plan]
    total = args.clients * args.requests

    with running_server(args.model, "--max-concurrent-requests", str(4 * args.clients)) as url:
        before = _batch_metrics(httpx.get(f"{url}/metrics").text)
        latencies: list[float] = []
        errors: list[str] = []

        async def run() -> float:
            limits = httpx.Limits(max_connections=args.clients)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                start = time.perf_counter()
                await asyncio.wait_for(
                    asyncio.gather(
                        *(_client(http, url, p, e, latencies, errors) for p, e in zip(plan, expected, strict=True))
                    ),
                    timeout=600,
                )
                return time.perf_counter() - start

        seconds = asyncio.run(run())
        after = _batch_metrics(httpx.get(f"{url}/metrics").text)

    calls = after["hyprec_batch_requests_count"] - before.get("hyprec_batch_requests_count", 0)
    served = after["hyprec_batch_requests_sum"] - before.get("hyprec_batch_requests_sum", 0)
    texts = sum(len(t) for client in plan for t in client)
    lat = np.array(latencies) * 1000
    lines = [
        f"# Server load test: {args.model}, {args.clients} concurrent clients x {args.requests} requests",
        "",
        "| requests | failures or mismatches | texts | wall s | requests/s | texts/s | p50 ms | p99 ms | "
        "requests per engine call | forward passes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {total} | {len(errors)} | {texts} | {seconds:.1f} | {total / seconds:.1f} | {texts / seconds:.1f} | "
        f"{np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | {served / calls:.2f} | "
        f"{after['hyprec_forward_passes_total'] - before.get('hyprec_forward_passes_total', 0):.0f} |",
    ]
    if errors:
        lines += ["", "First errors:", *(f"- {e}" for e in errors[:5])]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
