"""OpenAI-compatible request bodies (pydantic) and the error shape.

Field names follow OpenAI's API, with vLLM's extras (``top_k``, ``min_p``, ``repetition_penalty``,
``normalize``, ``truncate_prompt_tokens``, ``prompt_name``); the rerank, score and classify bodies follow vLLM's
(Cohere's and Jina's shape for rerank), with TEI's ``truncate``. Unknown fields are ignored, as OpenAI does; wrong
types and out-of-range values become a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

TokenIds = list[StrictInt]
PromptInput = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    user: StrictStr | None = None


class EmbeddingRequest(_Request):
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    normalize: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = Field(default=None, ge=1)
    prompt_name: StrictStr | None = None


class _SamplingRequest(_Request):
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=16)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stream: StrictBool = False
    ignore_eos: StrictBool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "n": self.n,
            "stop": stop,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "ignore_eos": self.ignore_eos,
        }


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class RerankDocument(BaseModel):
    """A document as Cohere's rerank API also accepts it: an object with its ``text`` (other fields ignored)."""

    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class _PairRequest(_Request):
    # Inputs longer than the model's limit are refused unless this asks to truncate them (TEI's flag).
    truncate: StrictBool = False


class RerankRequest(_PairRequest):
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: StrictInt | None = Field(default=None, ge=0)  # None or 0 (vLLM's default): every document
    return_documents: StrictBool = True


class ScoreRequest(_PairRequest):
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]


class ClassifyRequest(_PairRequest):
    input: StrictStr | list[StrictStr]


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
