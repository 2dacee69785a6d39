"""A request answered with an OpenAI error: the exception handlers raise from, and the response they send."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from hyprec.serving.protocol import error_body


class ApiError(Exception):
    """Ends a request with HTTP ``status`` and OpenAI's error object (``kind`` is its ``type``)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error object as a response with HTTP ``status``."""
    return JSONResponse(error_body(message, kind, status, param), status_code=status)
