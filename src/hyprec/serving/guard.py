"""The gate in front of the API routes (pure ASGI middleware): API key, request body, concurrency, metrics. The API
routes are those under ``/v1`` and :data:`UNVERSIONED`; ``/health``, ``/version`` and ``/metrics`` stay open.

Order matters. The key is checked from the headers alone. Then the body is read in full, within
``body_timeout`` seconds and ``max_body_bytes`` bytes. Only then does the request take one of the
``max_concurrent_requests`` slots, and it holds it until its last response byte (for a stream, its last event).
Clients that send their bodies slowly, or never, therefore cannot take the slots that requests being served need.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

from fastapi.responses import JSONResponse

from hyprec.serving.metrics import ServerMetrics
from hyprec.serving.protocol import error_body
from hyprec.serving.settings import ServerSettings

Scope = dict[str, Any]
UNVERSIONED = frozenset({"/rerank", "/score", "/classify"})
"""API routes served without the ``/v1`` prefix too (vLLM's paths, which clients use)."""


class _Refused(Exception):
    """A request answered by the gate itself (401, 408, 413, 429)."""

    def __init__(self, status: int, message: str, kind: str, label: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.kind, self.label, self.close = status, message, kind, label, close


class _ClientGone(Exception):
    """The client disconnected before its body was in: there is nobody to answer."""


def bearer_token_matches(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """Whether ``Authorization: Bearer <key>`` is among ``headers`` (the scheme in any case, as RFC 9110 says). The
    key is compared in constant time, so response timing tells nothing about how much of a guess was right."""
    value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
    scheme, _, token = value.strip().partition(b" ")
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


class RequestGuard:
    """ASGI middleware applying ``settings``' key, body and concurrency limits to the API routes (see the module
    docstring) and counting every API request in ``metrics``; other paths pass straight through."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = None if settings.api_key is None else settings.api_key.encode()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (scope["path"].startswith("/v1/") or scope["path"] in UNVERSIONED):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            if self.key is not None and not bearer_token_matches(scope["headers"], self.key):
                message = "missing or wrong API key (Authorization: Bearer ...)"
                raise _Refused(401, message, "authentication_error", "unauthenticated")
            body = await self._read_body(scope, receive)
            if self.in_flight >= self.settings.max_concurrent_requests:
                limit = self.settings.max_concurrent_requests
                raise _Refused(429, f"too many concurrent requests (limit {limit})", "rate_limit_error", "rejected")
        except _ClientGone:
            return
        except _Refused as refused:
            self.metrics.requests.labels(refused.label, str(refused.status)).inc()
            headers = {"connection": "close"} if refused.close else None
            if refused.status == 401:
                headers = {"www-authenticate": "Bearer"}
            response = JSONResponse(
                error_body(refused.message, refused.kind, refused.status), refused.status, headers=headers
            )
            await response(scope, receive, send)
            return
        await self._serve(scope, receive, send, body, start)

    async def _read_body(self, scope: Scope, receive: Any) -> bytes:
        """The whole request body, or _Refused: 413 beyond ``max_body_bytes`` (before reading a byte when
        Content-Length already says so), 408 when it takes longer than ``body_timeout``."""
        limit, timeout = self.settings.max_body_bytes, self.settings.body_timeout
        message = f"request body larger than {limit} bytes (the limit)"
        too_large = _Refused(413, message, "invalid_request_error", "rejected", close=True)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            # Close the connection too: the rest of a body that never came must not be read as a next request.
            message = f"request body not received within {timeout:g} s"
            raise _Refused(408, message, "timeout", "rejected", close=True) from None

    async def _serve(self, scope: Scope, receive: Any, send: Any, body: bytes, start: float) -> None:
        """Run the app on the received ``body`` while holding a concurrency slot, until its last response byte."""
        replayed = False
        status = 500

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, whenever it comes

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, replay, watch)
        except Exception:
            status = 500  # an unhandled error becomes a 500 further out
            raise
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            route = getattr(scope.get("route"), "path", "unmatched")  # bounded label values
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()
