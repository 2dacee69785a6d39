"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Request counts and latencies, tokens, batch sizes, queue depth, precision-guard events, the policy."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hyprec_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram(
            "hyprec_request_latency_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("hyprec_prompt_tokens", "Input tokens processed", registry=r)
        self.generation_tokens = Counter("hyprec_generation_tokens", "Tokens generated", registry=r)
        self.batch_requests = Histogram(
            "hyprec_batch_requests", "Requests served together by one engine call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_sequences = Histogram(
            "hyprec_batch_sequences", "Inputs/sequences in one engine call", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_passes = Counter("hyprec_forward_passes", "Forward passes run by the engine", registry=r)
        self.step_seconds = Histogram("hyprec_step_seconds", "Generation step time", buckets=LATENCY_BUCKETS,
                                      registry=r)  # fmt: skip
        self.queue_depth = Gauge("hyprec_queue_depth", "Jobs waiting for the engine loop", registry=r)
        self.in_flight = Gauge("hyprec_requests_in_flight", "Requests being served", registry=r)
        self.guard_events = Counter(
            "hyprec_precision_guard_events", "Precision guard events", ["policy", "quantity"], registry=r
        )
        self.model_info = Gauge(
            "hyprec_model_info",
            "The served model and its resolved dtype policy (value 1)",
            ["model", "policy", "compute_dtype", "attn_dtype", "kv_cache_dtype"],
            registry=r,
        )
        self._model = ""
        self._policy: Any = None

    def observe_batch(self, requests: int, sequences: int, passes: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_sequences.observe(sequences)
        self.forward_passes.inc(passes)

    def set_model(self, name: str, policy: Any) -> None:
        self._model = name
        self.set_policy(policy)

    def set_policy(self, policy: Any) -> None:
        """Label the model gauge with the current policy (it changes when the guard falls back)."""
        if policy is self._policy:
            return
        self._policy = policy
        self.model_info.clear()
        d = policy.as_dict()
        self.model_info.labels(self._model, d["policy"], d["compute_dtype"], d["attn_dtype"], d["kv_cache_dtype"]).set(
            1
        )
