"""Runs one scheduled step: packs the sequences' new tokens, builds attention metadata, runs the decoder and
samples the next token of every sequence whose known tokens are now all computed."""

from __future__ import annotations

import torch

from hyprec.engine.block_manager import BlockManager
from hyprec.engine.kv_cache import KVCache
from hyprec.engine.scheduler import ScheduledSeq
from hyprec.errors import NonFiniteOutputError
from hyprec.finite import finite_rows
from hyprec.layers.attention import AttentionBackend, AttentionMetadata, CacheGroupSlots, Packing
from hyprec.layers.linear import leading_decode_rows
from hyprec.models.base import DecoderModel
from hyprec.precision.policy import DtypePolicy
from hyprec.sampling.sampler import Sampler, SamplerOutput, SequenceSamplingState


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv_cache: KVCache,
        block_manager: BlockManager,
        backend: AttentionBackend,
        policy: DtypePolicy,
        device: torch.device,
        batch_invariant: bool = False,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.backend = backend
        self.policy = policy
        self.device = device
        self.batch_invariant = batch_invariant
        self.sampler = Sampler()

    def _group_slots(self, batch: list[ScheduledSeq]) -> dict[str, CacheGroupSlots]:
        groups = {}
        for name, spec in self.kv_cache.groups.items():
            write, read, key_lens, key_start = [], [], [], []
            for item in batch:
                seq, start = item.seq, item.seq.num_computed_tokens
                end = start + item.num_new_tokens
                first_key = 0 if spec.window is None else max(0, start - spec.window + 1)
                write.append(self.block_manager.slots(seq.seq_id, name, start, end))
                read.append(self.block_manager.slots(seq.seq_id, name, first_key, end))
                key_lens.append(end - first_key)
                key_start.append(first_key)
            groups[name] = CacheGroupSlots(
                write_slots=torch.cat(write).to(self.device),
                read_slots=torch.cat(read).to(self.device),
                keys=Packing.of(key_lens, self.device),
                key_start=torch.tensor(key_start, device=self.device),
                window=spec.window,
            )
        return groups

    @torch.inference_mode()
    def last_hidden(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Final-norm hidden state of each sequence's last new token ``[batch, hidden]`` (last-token pooling)."""
        hidden, last_rows = self.run(batch)
        return hidden[last_rows]

    @torch.inference_mode()
    def forward(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run the model on the batch's new tokens; returns float32 logits of the rows that sample, in batch order."""
        hidden, last_rows = self.run(batch)
        sampling = torch.tensor([item.samples for item in batch], device=self.device)
        return self.model.compute_logits(hidden[last_rows[sampling]])

    def run(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed hidden states of the batch's new tokens, and the row of each sequence's last new token (in the
        order of ``batch``).

        Batch-invariant runs pack decode rows (a generated token computed alone) first: linear layers compute
        them in their own, smaller tiles (:func:`hyprec.layers.linear.leading_decode_rows`)."""
        order = list(range(len(batch)))
        if self.batch_invariant:
            order.sort(key=lambda i: not _is_decode(batch[i]))
        packed = [batch[i] for i in order]
        hidden, last_rows = self._run_packed(packed, sum(_is_decode(item) for item in packed))
        if order == sorted(order):
            return hidden, last_rows
        in_batch_order = torch.empty_like(last_rows)
        in_batch_order[torch.tensor(order, device=last_rows.device)] = last_rows
        return hidden, in_batch_order

    def _run_packed(self, batch: list[ScheduledSeq], decode_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions = [], []
        for item in batch:
            start = item.seq.num_computed_tokens
            ids.extend(item.seq.tokens(start, start + item.num_new_tokens))
            positions.extend(range(start, start + item.num_new_tokens))
        meta = AttentionMetadata(
            backend=self.backend,
            queries=Packing.of([item.num_new_tokens for item in batch], self.device),
            causal=True,
            query_start=torch.tensor([item.seq.num_computed_tokens for item in batch], device=self.device),
            kv_cache=self.kv_cache,
            groups=self._group_slots(batch),
            batch_invariant=self.batch_invariant,
        )
        with leading_decode_rows(decode_rows if self.batch_invariant else 0):
            hidden = self.model(
                torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device),
                meta,
            )
        return hidden, meta.queries.cu[1:].long() - 1

    def sample(self, logits: torch.Tensor, batch: list[ScheduledSeq]) -> SamplerOutput | None:
        """Sample for the rows that complete a sequence. Non-finite logits are refused, never sampled, and a row
        that cannot be sampled fails alone: its error is in ``SamplerOutput.failures``, the other rows are sampled."""
        sampling = [item.seq for item in batch if item.samples]
        if not sampling:
            return None
        finite = finite_rows(logits).tolist()
        failed: dict[int, Exception] = {
            row: NonFiniteOutputError(
                f"non-finite logits for request {seq.request_id!r} under policy {self.policy.name} "
                f"(weights/activations {self.policy.compute_dtype}); the activations overflowed. "
                "Use dtype='hybrid' (float32 residual stream, half-precision attention) or dtype='float32'"
            )
            for row, (seq, ok) in enumerate(zip(sampling, finite, strict=True))
            if not ok
        }
        states = [
            SequenceSamplingState(s.params, s.prompt_token_ids, s.output_token_ids, s.generator) for s in sampling
        ]
        return self.sampler.sample_each(logits, states, failed)


def _is_decode(item: ScheduledSeq) -> bool:
    """A generated token computed on its own (decoding, or replayed after a preemption): prompt tokens never are."""
    return item.num_new_tokens == 1 and item.seq.num_computed_tokens >= len(item.seq.prompt_token_ids)
