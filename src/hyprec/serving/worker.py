"""The engine loop behind the server: one thread owns the engine; requests from the event loop are batched.

Engines are not thread-safe, so every engine call happens on one worker thread. Handlers submit jobs through a
queue and await an ``asyncio`` future (embeddings, scores, classes) or an ``asyncio.Queue`` of partial outputs
(generation).

* **Embeddings**: each turn the worker takes every queued embedding job (up to a token budget), groups them by
  their pooling options, and runs each group as one engine call; the engine packs all their inputs into
  token-budget forward passes. Concurrent requests therefore share forward passes.
* **Scores and classes** (a classifier's jobs: rerank, score, classify): likewise, every queued job of a turn in
  one engine call (up to the token budget); each job then gets its rows as scores or as labels and probabilities.
* **Generation**: new requests join the running batch between steps (the engine's continuous batching); after
  every step each request's new state goes to its queue.

A job that fails (bad input, non-finite output, any error of its own) fails alone: its error goes to its own
future or queue; other embedding or classifier jobs of the batch are recomputed without it, other generation
requests go on (the engine drops just the failed one). Only an error of the engine itself (not of one request)
stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hyprec.config import GENERATION_TOKEN_BUDGET
from hyprec.engine.batching import greedy_groups, prefix_sums
from hyprec.errors import HyprecError
from hyprec.outputs import ClassificationOutput, RequestOutput
from hyprec.sampling_params import SamplingParams
from hyprec.serving.metrics import ServerMetrics

log = logging.getLogger("hyprec")


class UnavailableError(HyprecError):
    """The server cannot serve the request now (answered with 503)."""


class EngineDeadError(UnavailableError):
    """The engine loop died (its error is in the server log); the server answers 503 from then on."""


class ShutdownError(UnavailableError):
    """The server is shutting down and its grace period for open requests is over."""


@dataclass
class EmbedJob:
    ids: list[list[int]]
    prompt_len: int
    normalize: bool | None
    dimensions: int | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def key(self) -> tuple:
        return self.prompt_len, self.normalize, self.dimensions

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


@dataclass
class ClassifyJob:
    """Inputs of a classifier, encoded by ``ClassifierEngine.encode``. The result is their scores
    (``ClassifierEngine.scores``) or, with ``classes``, their labels and probabilities
    (``ClassifierEngine.classes``)."""

    ids: list[list[int]]
    types: list[list[int]] | None
    classes: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


PooledJob = EmbedJob | ClassifyJob


@dataclass
class GenerateJob:
    request_id: str
    prompt: str | None
    ids: list[int]
    params: SamplingParams
    updates: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class AbortJob:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _FailAll:
    error: HyprecError


@dataclass
class EngineWorker:
    """Runs ``engine`` on a daemon thread; see the module docstring."""

    engine: Any
    metrics: ServerMetrics
    max_batch_tokens: int = GENERATION_TOKEN_BUDGET  # embedding tokens per engine call
    jobs: queue.Queue = field(default_factory=queue.Queue)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hyprec-engine", daemon=True)
        self._start_lock = threading.Lock()
        self._live: dict[str, GenerateJob] = {}
        self._guard_events = 0

    def start(self) -> None:
        """Start the loop (idempotent: the app's lifespan starts it, and so does the first job, for hosts such as
        Ray Serve that may not run lifespan events)."""
        with self._start_lock:
            if not self._thread.is_alive() and self._thread.ident is None:
                self._thread.start()

    def stop(self) -> None:
        self.jobs.put(_Stop())
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        """Running, or not started yet (it starts with the first job); False once the loop died."""
        return self.error is None and (self._thread.is_alive() or self._thread.ident is None)

    def submit(self, job: EmbedJob | ClassifyJob | GenerateJob | AbortJob) -> None:
        """Queue a job for the loop. Raises :class:`EngineDeadError` once the loop has died."""
        if self.error is not None:
            # The cause is in the server log; its text (paths, internals) is not for clients.
            raise EngineDeadError("the engine loop stopped (see the server log)")
        self.start()
        self.jobs.put(job)
        self.metrics.queue_depth.set(self.jobs.qsize())

    def abort(self, request_id: str) -> None:
        """Stop generating for a request whose client is gone or failed (a no-op once the loop has died)."""
        if self.error is None:
            self.submit(AbortJob(request_id))

    def fail_all(self, error: HyprecError) -> None:
        """Fail every request in the engine or queued now with ``error`` (the end of a shutdown's grace period);
        the loop itself goes on."""
        if self.error is None:
            self.submit(_FailAll(error))

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                busy = bool(self._live)
                try:
                    first = self.jobs.get(block=not busy, timeout=None)
                except queue.Empty:
                    first = None
                pending = [first] if first is not None else []
                while True:  # everything queued now joins this turn
                    try:
                        pending.append(self.jobs.get_nowait())
                    except queue.Empty:
                        break
                self.metrics.queue_depth.set(self.jobs.qsize())
                if any(isinstance(j, _Stop) for j in pending):
                    return
                self._turn(pending)
        except BaseException as exc:  # the engine itself broke: /health reports it, requests fail fast
            log.exception("hyprec: engine loop died")
            self.error = exc
            for job in list(self._live.values()):
                _push(job, exc)

    def _turn(self, pending: list) -> None:
        failing = next((j for j in pending if isinstance(j, _FailAll)), None)
        if failing is not None:
            self._fail(pending, failing.error)
            return
        embeds = [j for j in pending if isinstance(j, EmbedJob)]
        classifies = [j for j in pending if isinstance(j, ClassifyJob)]
        for job in pending:
            if isinstance(job, GenerateJob):
                self._add(job)
            elif isinstance(job, AbortJob) and job.request_id in self._live:
                self._live.pop(job.request_id)
                self.engine.abort(job.request_id)
        if embeds:
            self._embed(embeds)
        if classifies:
            self._pool_calls(classifies, self._classify_call)
        if self._live:
            self._step()
        self._count_guard_events()

    def _fail(self, pending: list, error: HyprecError) -> None:
        for job in pending:
            if isinstance(job, (EmbedJob, ClassifyJob)):
                _resolve(job, exception=error)
            elif isinstance(job, GenerateJob):
                _push(job, error)
        for rid, job in self._live.items():
            self.engine.abort(rid)
            _push(job, error)
        self._live.clear()

    # ------------------------------------------------------------------ embeddings, scores and classes

    def _embed(self, jobs: list[EmbedJob]) -> None:
        groups: dict[tuple, list[EmbedJob]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            self._pool_calls(group, self._embed_call)

    def _pool_calls(self, jobs: list[PooledJob], call: Callable[[list[PooledJob]], list[Any]]) -> None:
        """Run ``jobs`` through ``call`` (one engine call for many jobs, per-job results), split into several calls
        where they exceed the token budget of one turn."""
        sums = prefix_sums([job.tokens for job in jobs])
        fits = lambda first, i: sums[i + 1] - sums[first] <= self.max_batch_tokens  # noqa: E731
        for batch in greedy_groups(len(jobs), fits):
            self._pool_call([jobs[j] for j in batch], call)

    def _pool_call(self, jobs: list[PooledJob], call: Callable[[list[PooledJob]], list[Any]]) -> None:
        try:
            results = call(jobs)
        except Exception as exc:  # any failure stays with the job that caused it; the loop goes on
            if len(jobs) == 1:
                if not isinstance(exc, HyprecError):
                    log.exception("hyprec: %s batch failed", type(jobs[0]).__name__)
                _resolve(jobs[0], exception=exc)
                return
            for job in jobs:  # find the culprit: each job alone, so only it fails
                self._pool_call([job], call)
            return
        self.metrics.observe_batch(len(jobs), sum(len(job.ids) for job in jobs), self.engine.last_stats.batches)
        for job, result in zip(jobs, results, strict=True):
            _resolve(job, result=result)

    def _embed_call(self, jobs: list[EmbedJob]) -> list[np.ndarray]:
        """One engine call embedding every job's inputs (the jobs share their pooling options); per job its rows."""
        first = jobs[0]
        vectors = self.engine.embed_ids(
            [x for job in jobs for x in job.ids],
            prompt_len=first.prompt_len,
            normalize=first.normalize,
            dimensions=first.dimensions,
        )
        return _split(vectors, jobs)

    def _classify_call(self, jobs: list[ClassifyJob]) -> list[np.ndarray | list[ClassificationOutput]]:
        """One engine call for every job's inputs; per job its scores, or its labels and probabilities."""
        # Every job's types are None or every job's are lists: they come from the one engine's encode().
        types = None if jobs[0].types is None else [t for job in jobs for t in job.types]
        engine = self.engine
        logits = engine.logits_ids([x for job in jobs for x in job.ids], types)
        return [
            engine.classes(rows) if job.classes else engine.scores(rows)
            for job, rows in zip(jobs, _split(logits, jobs), strict=True)
        ]

    # ------------------------------------------------------------------ generation

    def _add(self, job: GenerateJob) -> None:
        try:
            self.engine.add_request(job.ids, job.params, prompt=job.prompt, request_id=job.request_id)
        except Exception as exc:  # whatever is wrong with this request, it fails alone
            _fail_request(job, exc)
            return
        self._live[job.request_id] = job

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except HyprecError as exc:  # e.g. the guard raised: every running request gets the error
            for rid, job in list(self._live.items()):
                self.engine.abort(rid)
                _push(job, exc)
            self._live.clear()
            return
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        if outputs:
            self.metrics.observe_batch(len(outputs), len(outputs), 1)
        for out in outputs:
            job = self._live.get(out.request_id)
            if job is None:
                continue
            if out.error is not None:  # the engine dropped this request alone; the others went on
                _fail_request(job, out.error)
                self._live.pop(out.request_id)
                continue
            _push(job, _snapshot(out))
            if out.finished:
                self._live.pop(out.request_id)

    def _count_guard_events(self) -> None:
        events = self.engine.guard_events
        for event in events[self._guard_events :]:
            self.metrics.guard_events.labels(policy=event.policy, quantity=event.quantity).inc()
        self._guard_events = len(events)
        self.metrics.set_policy(self.engine.policy)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the event loop can read while the engine keeps mutating its own objects."""
    return replace(out, outputs=[replace(o, token_ids=list(o.token_ids)) for o in out.outputs])


def _split(rows: np.ndarray, jobs: list[PooledJob]) -> list[np.ndarray]:
    """The rows of one engine call cut into each job's own, in job order."""
    ends = np.cumsum([len(job.ids) for job in jobs])[:-1]
    return np.split(rows, ends)


def _resolve(job: PooledJob, *, result: Any = None, exception: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():  # cancelled (client gone, timeout)
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(settle)


def _push(job: GenerateJob, item: RequestOutput | BaseException) -> None:
    job.loop.call_soon_threadsafe(job.updates.put_nowait, item)


def _fail_request(job: GenerateJob, exc: Exception) -> None:
    """Fail one generation request; an error that is not hyprec's own (a bug, not bad input) goes to the log with
    its traceback, since the client only gets a generic message for it."""
    if not isinstance(exc, HyprecError):
        log.error("hyprec: request %s failed", job.request_id, exc_info=exc)
    _push(job, exc)
