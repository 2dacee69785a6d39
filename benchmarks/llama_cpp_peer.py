"""llama.cpp as a peer, through ``llama-cpp-python``'s low-level bindings (its C API, one call per batch).

``llama-cpp-python`` is an optional extra (``pip install -e '.[llamacpp]'``): pip builds it from its sdist, which
vendors llama.cpp, for this CPU (``GGML_NATIVE``; ~6 minutes on 2 cores). The high-level ``Llama`` class serves one
sequence at a time, so this drives ``llama_decode`` directly: every sequence of a batch in one call (prefill), then
one token per sequence per call (decode), greedy by argmax of the returned logits -- what llama.cpp's own
``llama-batched-bench`` does. Teacher-forced logits for fidelity come from one call with an output at every position.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def unavailable() -> str | None:
    """Why llama.cpp cannot run here (None: it can)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); pip install -e '.[llamacpp]' builds it"
    return None


class LlamaCpp:
    """One GGUF model in llama.cpp with a context for ``max_seqs`` sequences of up to ``seq_tokens`` tokens."""

    def __init__(self, path: Path, *, threads: int, max_seqs: int, seq_tokens: int):
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: llama.cpp calls it later
        lc.llama_log_set(self._quiet, None)
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        # llama.cpp's extra buffer types repack weights for its AMX and AVX-512 kernels at load; with this build that
        # path crashes (SIGSEGV in the first llama_decode, also through the high-level Llama class) on the AMX Xeon
        # where the benchmarks ran, so the peer runs llama.cpp's standard CPU kernels.
        model_params.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lc.llama_context_default_params()
        params.n_ctx = max_seqs * seq_tokens
        params.n_batch = params.n_ubatch = max_seqs * seq_tokens  # a whole prefill (or teacher-forced text) per call
        params.n_seq_max = max_seqs
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.capacity = max_seqs * seq_tokens
        self.batch = lc.llama_batch_init(self.capacity, 0, max_seqs)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, wants) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wants
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        status = self.lc.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _logits(self, index: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab,))

    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of every prompt, decoded together."""
        self.reset()
        entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        self._decode(entries)
        lasts = [i for i, e in enumerate(entries) if e[3]]
        outputs = [[int(self._logits(i).argmax())] for i in lasts]
        for step in range(1, new_tokens):
            self._decode(
                [(out[-1], len(p) + step - 1, s, True) for s, (p, out) in enumerate(zip(prompts, outputs, strict=True))]
            )
            for s, out in enumerate(outputs):
                out.append(int(self._logits(s).argmax()))
        return outputs

    def teacher_forced(self, ids: list[int]) -> np.ndarray:
        """Float32 logits ``[len(ids) - 1, vocab]``: position i predicts token i + 1."""
        self.reset()
        self._decode([(t, pos, 0, pos < len(ids) - 1) for pos, t in enumerate(ids)])
        return np.stack([self._logits(i).copy() for i in range(len(ids) - 1)])

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)
