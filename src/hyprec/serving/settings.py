"""Identity and limits of one server (``hyprec serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """Limits and identity of one server."""

    model_name: str
    api_key: str | None = None
    max_concurrent_requests: int = 256  # 429 beyond
    max_inputs_per_request: int = 2048  # 413 beyond
    max_input_tokens: int | None = None  # 400 beyond, unless truncation is asked; default: the model's limit
    request_timeout: float = 600.0  # seconds; 504 beyond
