"""Identity and limits of one server (``hyprec serve`` options), validated when built.

Each limit has a :class:`Rule` in :data:`LIMITS`, used twice: by :class:`ServerSettings` (a bad value raises
:class:`~hyprec.errors.InvalidInputError` naming the field) and as the argparse ``type`` of the matching
``hyprec serve`` option (a bad value is a usage error naming the option).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyprec.errors import InvalidInputError
from hyprec.loading.generation_tokenizer import CHAT_TEMPLATE_TIMEOUT
from hyprec.model_sources import DEFAULT_MODEL

API_KEY_ENV = "HYPREC_API_KEY"
"""The environment variable ``hyprec serve`` reads the API key from when neither ``--api-key`` nor
``--api-key-file`` is given (a key on the command line is visible to every user of the machine in ``ps``)."""


@dataclass(frozen=True)
class Rule:
    """What one numeric setting accepts: ``kind`` (int or float), a test, and the words for an error message."""

    kind: type
    accepts: Any  # Callable[[int | float], bool]
    expected: str

    def check(self, name: str, value: Any) -> Any:
        """``value`` as ``kind`` if it is one and passes, else InvalidInputError naming ``name``."""
        kinds = (int, float) if self.kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or not self.accepts(value):
            raise InvalidInputError(f"{name}={value!r}: expected {self.expected}")
        return self.kind(value)

    def __call__(self, text: str) -> Any:
        """The argparse ``type``: parse and check an option's text (argparse names the option in the error)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected {self.expected}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"{text}: expected {self.expected}")
        return value


PORT = Rule(int, lambda v: 1 <= v <= 65535, "a TCP port in 1..65535")
COUNT = Rule(int, lambda v: v >= 1, "an integer >= 1")
SECONDS = Rule(float, lambda v: math.isfinite(v) and v > 0, "a finite number of seconds > 0")

LIMITS = {
    "max_concurrent_requests": COUNT,
    "max_inputs_per_request": COUNT,
    "max_body_bytes": COUNT,
    "max_input_tokens": COUNT,
    "request_timeout": SECONDS,
    "body_timeout": SECONDS,
    "chat_template_timeout": SECONDS,
    "shutdown_timeout": SECONDS,
}
"""The numeric fields of :class:`ServerSettings` and their rules; ``hyprec serve`` has an option of the same name
for each (``max_body_bytes``: ``--max-body-bytes``)."""


@dataclass
class ServerSettings:
    """Limits and identity of one server; every field is checked when the object is built.

    Attributes:
        model_name: the name clients use (``model`` in requests, ``/v1/models``, error messages, ``/metrics``).
        api_key: when set, the API routes (``/v1/*``, ``/rerank``, ``/score``, ``/classify``) need
            ``Authorization: Bearer KEY``; ``/health``, ``/version`` and ``/metrics`` stay open.
        max_concurrent_requests: requests served at once (counted from a fully received body); 429 beyond.
        max_inputs_per_request: texts or prompts in one request (rerank: documents; score: texts of either side);
            413 beyond.
        max_input_tokens: tokens per embedding or classifier input (a text pair counts whole); 400 beyond unless
            truncation is asked. None: the model's limit.
        request_timeout: seconds a request may take once received; 504 beyond.
        max_body_bytes: the largest request body; 413 beyond (checked before reading when Content-Length says so).
        body_timeout: seconds a client has to send its whole request body; 408 beyond. A slow body never holds a
            concurrency slot.
        chat_template_timeout: seconds a chat template may take to render; the request fails (400) beyond.
        shutdown_timeout: seconds open requests get to finish after SIGTERM/SIGINT; then they end with a 503 error
            (an error event for a stream).
    """

    model_name: str
    api_key: str | None = None
    max_concurrent_requests: int = 256
    max_inputs_per_request: int = 2048
    max_input_tokens: int | None = None
    request_timeout: float = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout: float = 30.0
    chat_template_timeout: float = CHAT_TEMPLATE_TIMEOUT
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise InvalidInputError(f"model_name={self.model_name!r}: expected a non-empty string")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise InvalidInputError("api_key: expected None or a non-empty string")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            # A header's surrounding whitespace is not part of the token, so such a key could never match.
            raise InvalidInputError("api_key: expected no leading or trailing whitespace")
        for name, rule in LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "max_input_tokens":
                continue  # the model's own limit
            setattr(self, name, rule.check(name, value))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        """The settings ``hyprec serve`` options ask for (``args`` from its parser)."""
        return cls(
            model_name=args.served_model_name or served_name(args.model),
            api_key=resolve_api_key(args.api_key, args.api_key_file),
            **{name: getattr(args, name) for name in LIMITS},
        )


def served_name(model: str | None) -> str:
    """The name a model is served under by default: an alias as given, a path by its file or directory name (an
    absolute path would show the server's file system to every client, in ``/v1/models``, errors and the
    unauthenticated ``/metrics``)."""
    if model is None:
        return DEFAULT_MODEL
    path = Path(model)
    return path.resolve().name if path.exists() else model


def resolve_api_key(value: str | None, file: Path | None) -> str | None:
    """The API key from ``--api-key``, else ``--api-key-file`` (its first line), else ``$HYPREC_API_KEY``."""
    if value is not None and file is not None:
        raise InvalidInputError("--api-key and --api-key-file: give one of them, not both")
    if value is not None:
        return value
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"--api-key-file {file}: cannot read it: {exc}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise InvalidInputError(f"--api-key-file {file}: expected the key on its first line, which is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None
