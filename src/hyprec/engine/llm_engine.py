"""The generation engine: requests -> scheduler -> model runner -> sampler -> detokenised, stop-checked outputs.

``step()`` runs one forward pass over whatever the scheduler picked (prefill chunks and decode tokens together),
so requests added between steps join the running batch (continuous batching).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hyprec.config import EngineConfig, ModelConfig
from hyprec.engine.base import ModelEngine
from hyprec.engine.batching import greedy_groups, prefix_sums
from hyprec.engine.block_manager import BlockManager
from hyprec.engine.detokenizer import IncrementalDetokenizer, find_stop
from hyprec.engine.kv_cache import KVCache, cache_groups
from hyprec.engine.model_loading import PolicyRequest
from hyprec.engine.model_runner import ModelRunner
from hyprec.engine.scheduler import ScheduledSeq, Scheduler
from hyprec.engine.scoring import TokenScores, score_logits
from hyprec.engine.sequence import Sequence
from hyprec.errors import ConfigError, InvalidInputError, NonFiniteOutputError
from hyprec.finite import finite_rows
from hyprec.layers.attention_backends import select_backend
from hyprec.layers.linear import set_batch_invariant
from hyprec.loading.generation_tokenizer import GenerationTokenizer
from hyprec.loading.weights import WeightSource
from hyprec.outputs import CompletionOutput, RequestOutput
from hyprec.precision.emulation import kernel_dtype
from hyprec.sampling.sampler import make_generator
from hyprec.sampling_params import SamplingParams

log = logging.getLogger("hyprec")
CPU_MAX_MODEL_LEN = 8192


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]


class LLMEngine(ModelEngine):
    """Owns one decoder model, its KV cache and scheduler."""

    generative = True

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        checkpoint: WeightSource,
        tokenizer: GenerationTokenizer | None,
        *,
        dtype: str = "auto",
        attn_dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        engine_config: EngineConfig | None = None,
    ):
        self.name = name
        self.tokenizer = tokenizer
        self.engine_config = ec = (engine_config or EngineConfig()).with_token_budget(generative=True)
        self.scheduler = Scheduler(None, ec.max_num_seqs, ec.max_num_batched_tokens, deterministic=ec.deterministic)
        self.requests: dict[str, Request] = {}
        self._next_id = 0
        self._open(config, checkpoint, PolicyRequest(dtype, attn_dtype, kv_cache_dtype))

    def _rebuild(self) -> None:
        """KV cache, block manager, backend and runner for the current model and policy; sequences in flight
        restart from their tokens."""
        ec, model = self.engine_config, self.model
        set_batch_invariant(model, ec.deterministic)
        self.max_model_len = self._max_model_len()
        layers = self.model.attention_layers()
        kv_dtypes = [d.kv_cache for d in self.policy.layer_dtypes(len(layers))]
        per_token = sum(2 * a.num_kv_heads * a.head_dim * dt.itemsize for a, dt in zip(layers, kv_dtypes, strict=True))
        num_blocks = ec.num_kv_blocks or max(1, ec.kv_cache_memory // (per_token * ec.block_size))
        if num_blocks * ec.block_size < self.max_model_len:
            raise ConfigError(
                f"KV cache of {num_blocks} blocks x {ec.block_size} tokens cannot hold one sequence of "
                f"max_model_len={self.max_model_len}; raise num_kv_blocks/kv_cache_memory or lower max_model_len"
            )
        groups = cache_groups(layers, num_blocks, ec.block_size, ec.max_num_seqs, ec.max_num_batched_tokens)
        self.kv_cache = None  # free the old cache before allocating the new one
        self.kv_cache = KVCache(layers, groups, ec.block_size, kv_dtypes, self.device)
        self.block_manager = BlockManager(groups, ec.block_size)
        self.scheduler.restart(self.block_manager)
        self.backend = select_backend(self.device, kernel_dtype(model, self.policy), batch_invariant=ec.deterministic)
        self.runner = ModelRunner(
            model, self.kv_cache, self.block_manager, self.backend, self.policy, self.device, ec.deterministic
        )
        log.info("hyprec: %s: policy %s, attention backend %s", self.name, self.policy, self.backend.name)

    def _max_model_len(self) -> int:
        limit = self.model.max_positions
        if self.engine_config.max_model_len is not None:
            if self.engine_config.max_model_len > limit:
                raise ConfigError(f"max_model_len={self.engine_config.max_model_len} exceeds the model's {limit}")
            return self.engine_config.max_model_len
        return min(limit, CPU_MAX_MODEL_LEN) if self.device.type == "cpu" else limit

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Its sequences join the running batch at the next step."""
        self.validate_request(prompt_token_ids, params)
        rid = request_id if request_id is not None else str(self._next_id)
        self._next_id += 1
        if rid in self.requests:
            raise InvalidInputError(f"request_id {rid!r} is already in use")
        seqs = [
            Sequence(
                request_id=rid,
                index=i,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                generator=None if params.seed is None else make_generator(params.seed, i, self.device),
            )
            for i in range(params.n)
        ]
        self.requests[rid] = Request(rid, prompt, list(prompt_token_ids), params, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
        return rid

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams, where: str = "prompt") -> None:
        """Raise InvalidInputError (naming ``where``) for a request the engine cannot run."""
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(
                f"sampling params for {where}: expected SamplingParams, got {type(params).__name__}"
            )
        vocab = self.model_config.get("vocab_size")
        if not prompt_token_ids:
            raise InvalidInputError(f"{where}: empty (no tokens)")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidInputError(f"{where}: token ids must be integers in [0, {vocab}); got {bad[0]!r}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidInputError(
                f"{where}: {len(prompt_token_ids)} tokens do not fit the context window "
                f"(max_model_len={self.max_model_len}, which must also leave room for one generated token)"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidInputError(f"{where}: stop strings need a tokenizer, and this model has none")

    def _one_pass(self, ids: list[int], what: str) -> None:
        """Check that ``ids`` can run as a single prefill pass (embed/score do not chunk)."""
        limit = min(self.max_model_len, self.engine_config.max_num_batched_tokens)
        if not 1 <= len(ids) <= limit:
            raise InvalidInputError(
                f"{what}: {len(ids)} tokens; expected 1..{limit} (max_model_len and max_num_batched_tokens)"
            )

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """One forward pass; returns the current state of every request that advanced (finished ones removed).

        A request that fails on its own (its logits cannot be sampled, or detokenising it raises) is dropped and
        returned with ``error`` set; the other requests of the batch go on as if it had never been there.
        """
        scheduled = self.scheduler.schedule().scheduled
        if not scheduled:
            return []
        self.state.begin()
        logits = self.runner.forward(scheduled)
        if self.state.check(logits):
            return []  # the engine fell back to a safer policy; the scheduled work is recomputed from the next step
        sampled = self.runner.sample(logits, scheduled)
        sampling = [item.seq for item in scheduled if item.samples]
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        failed: dict[str, Exception] = {}  # request id -> why it failed; the other requests go on
        if sampled is not None:
            for i, seq in enumerate(sampling):
                if seq.request_id in failed:
                    continue
                error = sampled.failures.get(i)
                if error is None:
                    try:
                        self._append(seq, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i])
                    except Exception as exc:  # detokenising or stop checks of one request: it fails alone
                        error = exc
                if error is not None:
                    failed[seq.request_id] = error
        touched = dict.fromkeys(item.seq.request_id for item in scheduled)
        outputs = []
        for rid in touched:
            request = self.requests[rid]
            if rid in failed:
                self.abort(rid)  # frees its cache blocks; its completions end with "abort"
            outputs.append(self._request_output(request, failed.get(rid)))
            if outputs[-1].finished:
                self.requests.pop(rid, None)
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.cumulative_logprob += logprob
        if p.logprobs is not None:
            seq.output_top_logprobs.append(top or [])
        new_chars = 0
        if self.tokenizer is not None:
            if seq.detokenizer is None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer.tokenizer, p.skip_special_tokens)
            new_chars = len(seq.detokenizer.append(token))
            seq.text = seq.detokenizer.text
        if token in p.stop_token_ids:
            return self._finish(seq, "stop", token)
        if not p.ignore_eos and self.tokenizer is not None and token in self.tokenizer.eos_token_ids:
            return self._finish(seq, "stop", None)
        found = find_stop(seq.text, new_chars, p.stop) if p.stop else None
        if found is not None:
            stop, at = found
            seq.text = seq.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
            return self.scheduler.finish_with(seq, "stop", stop)
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", None)
        return None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | None) -> None:
        """Finish ``seq``. The incremental text holds back the bytes of a character the last tokens did not complete,
        which a full decode shows (as U+FFFD): the full decode is the final text when it extends what was streamed
        (the streamed text must stay a prefix of the final one; around invalid byte runs the two decoders differ,
        and the streamed text stands)."""
        if self.tokenizer is not None:
            full = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)
            if full.startswith(seq.text):
                seq.text = full
        self.scheduler.finish_with(seq, reason, stop_reason)

    @staticmethod
    def _request_output(req: Request, error: Exception | None = None) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            logprobs = None
            if req.params.logprobs is not None:
                # Extended by the entries of new tokens only: rebuilding them every step is quadratic in length.
                done = len(seq.logprob_entries)
                seq.logprob_entries += [
                    {**dict(top), tok: lp}
                    for tok, lp, top in zip(
                        seq.output_token_ids[done:],
                        seq.output_logprobs[done:],
                        seq.output_top_logprobs[done:],
                        strict=True,
                    )
                ]
                logprobs = list(seq.logprob_entries)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=logprobs,
                    cumulative_logprob=seq.cumulative_logprob,
                )
            )
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, error)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as generation encodes a prompt."""
        if self.tokenizer is None:
            raise InvalidInputError("this model has no tokenizer; pass token-id lists")
        return [self.tokenizer.encode(t) for t in texts]

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, progress: bool = False
    ) -> list[RequestOutput]:
        """Run token-id ``prompts`` to completion together (continuous batching); one output per prompt, in order.
        Every prompt is validated before any is queued."""
        for i, ids in enumerate(prompts):
            self.validate_request(ids, params, where=f"prompts[{i}]")
        return self.run_to_completion([self.add_request(ids, params) for ids in prompts], progress=progress)

    def run_to_completion(self, request_ids: list[str], *, progress: bool = False) -> list[RequestOutput]:
        """Step until the queued ``request_ids`` finish; their final outputs in order. A request that fails raises
        its error, and every one of them is aborted (so is everything on any other exception)."""
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(request_ids), desc="generate", unit="req", disable=not progress) as bar:
                while len(done) < len(request_ids):
                    for out in self.step():
                        if out.error is not None and out.request_id in request_ids:
                            raise out.error  # this request failed on its own; the others are aborted below
                        if out.finished and out.request_id in request_ids:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for rid in request_ids:
                self.abort(rid)
            raise
        return [done[rid] for rid in request_ids]

    # ------------------------------------------------------------------ prefill-only passes

    def _prefill(self, seqs: list[Sequence], run: Callable[[list[ScheduledSeq]], torch.Tensor]) -> torch.Tensor:
        """One prefill-only pass of whole sequences outside the scheduler (scoring, embedding), under the guard:
        their cache blocks are allocated, ``run`` computes the pass, the blocks are freed, and a pass that made the
        guard fall back is recomputed under the safer policy."""
        if self.scheduler.has_unfinished():
            raise InvalidInputError("prefill-only passes need an idle engine; finish or abort running generations")

        def forward() -> torch.Tensor:
            try:
                for seq in seqs:
                    if not self.block_manager.can_grow(seq.seq_id, seq.num_tokens, 0):
                        tokens = f"sequence {seq.index} ({seq.num_tokens} tokens)"
                        raise InvalidInputError(f"{seq.request_id}: {tokens} does not fit the KV cache")
                    self.block_manager.grow(seq.seq_id, seq.num_tokens, 0)
                return run([ScheduledSeq(seq, seq.num_tokens) for seq in seqs])
            finally:
                for seq in seqs:
                    self.block_manager.free(seq.seq_id)

        return self.state.run(forward)

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk: int = 256, *, allow_nonfinite: bool = False) -> TokenScores:
        """Teacher-forced scores of one token sequence (perplexity, agreement): at every position ``i < len - 1``,
        the most likely next token, the log-probability of the actual next token ``token_ids[i + 1]``, and whether
        the logits were finite. Non-finite logits raise unless ``allow_nonfinite`` (the tools measure them)."""
        targets = torch.tensor(token_ids[1:])
        parts = []
        for start, logits in self.logits(token_ids, chunk):
            part = score_logits(logits, targets[start : start + len(logits)])[1]
            if not allow_nonfinite and not part.finite.all():
                raise NonFiniteOutputError(
                    f"non-finite logits at positions >= {start} under policy {self.policy.name}; the activations "
                    "overflowed. Use dtype='hybrid' or dtype='float32'"
                )
            parts.append(part)
        return TokenScores.cat(parts)

    @torch.inference_mode()
    def logits(self, token_ids: list[int], chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
        """Teacher-forced float32 logits predicting positions ``1 .. len-1``, as ``(start, [rows, vocab])`` chunks,
        so a 262k vocabulary never materialises for the whole sequence. The prefill runs under the precision
        guard; the logits are returned as computed (finite or not: callers decide)."""
        if len(token_ids) < 2:
            raise InvalidInputError(f"score: {len(token_ids)} tokens; expected at least 2")
        self._one_pass(token_ids, "score")
        self.validate_request(token_ids[:-1], SamplingParams(), where="score")
        seq = Sequence(request_id="score", index=0, prompt_token_ids=list(token_ids), params=SamplingParams())
        hidden = self._prefill([seq], lambda batch: self.runner.run(batch)[0])
        for start in range(0, len(token_ids) - 1, chunk):
            yield start, self.model.compute_logits(hidden[start : min(start + chunk, len(token_ids) - 1)])

    @torch.inference_mode()
    def embed_ids(self, token_ids: list[list[int]], *, normalize: bool = True) -> torch.Tensor:
        """Last-token pooled float32 embeddings (Qwen3-Embedding style) of token-id lists, ``[n, hidden]``.

        Runs prefill-only passes through the same KV cache path as generation, longest first, as many sequences a
        pass as the token budget, ``max_num_seqs`` and the free cache blocks allow; the engine must be idle (no
        generation in flight) so the cache is free.
        """
        for i, ids in enumerate(token_ids):
            self._one_pass(ids, f"embed: text {i}")
        ec = self.engine_config
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        tokens = prefix_sums([len(token_ids[i]) for i in order])
        blocks = prefix_sums([-(-len(token_ids[i]) // ec.block_size) for i in order])
        free = min(self.block_manager.num_free_blocks().values())

        def fits(first: int, i: int) -> bool:
            within_budget = tokens[i + 1] - tokens[first] <= ec.max_num_batched_tokens
            return i - first < ec.max_num_seqs and within_budget and blocks[i + 1] - blocks[first] <= free

        out = torch.empty(len(token_ids), self.model_config.get("hidden_size"))
        params = SamplingParams(max_tokens=1)
        for group in greedy_groups(len(order), fits):
            batch = [order[j] for j in group]
            seqs = [Sequence(request_id="embed", index=i, prompt_token_ids=token_ids[i], params=params) for i in batch]
            out[batch] = self._prefill(seqs, lambda scheduled: self.runner.last_hidden(scheduled).float()).cpu()
        if not finite_rows(out).all():
            raise NonFiniteOutputError(f"non-finite embeddings under policy {self.policy.name}")
        return torch.nn.functional.normalize(out, dim=1) if normalize else out

    def info(self) -> dict[str, Any]:
        cfg = self.model_config
        return self._info(
            {
                "num_kv_heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
                "max_model_len": self.max_model_len,
                "kv_cache_groups": {n: (g.window, g.num_blocks) for n, g in self.kv_cache.groups.items()},
                "kv_cache_bytes": self.kv_cache.nbytes,
                "kv_cache_bytes_per_token": self.kv_cache.bytes_per_token(),
            }
        )
