"""Result objects (vLLM-compatible field names): generation, classification and reranking."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a request.

    Attributes:
        index: which of the request's ``n`` completions this is.
        text: generated text (stop string removed unless ``include_stop_str_in_output``).
        token_ids: generated token ids (a final EOS or stop token included).
        finish_reason: None while running, then ``stop`` (EOS, stop token or stop string), ``length``
            (``max_tokens`` or the context window) or ``abort``.
        stop_reason: the stop string or stop token id that ended it, if any.
        logprobs: per generated token, ``{token_id: logprob}`` with the chosen token and the top-N alternatives
            (when the request asked for ``logprobs``), else None.
        cumulative_logprob: sum of the chosen tokens' log-probabilities.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of a request after a step: its prompt and its ``n`` completions so far.

    ``error`` is set when this request failed on its own (e.g. its logits became non-finite after its penalties):
    the engine has dropped it (its completions end with ``abort``) and the other requests went on.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class ClassificationOutput:
    """One text (or text pair) classified: the most probable label and the probability of every label."""

    label: str
    probs: list[float]  # per label, in the model's id2label order (sigmoid for one label, softmax otherwise)


@dataclass
class RerankResult:
    """One document of a reranked list: its index in the input, its score, and the document when asked for."""

    index: int
    relevance_score: float
    document: str | None = None
