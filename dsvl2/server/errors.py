"""Errors as the server answers them: OpenAI's JSON shape with the right HTTP status.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` (what the official
``openai`` client parses into ``APIStatusError.body``). ``param`` names the request field
at fault where one is (``temperature``, ``messages[1].content[0].image_url.url``), so a
client can point at it.

Status by cause: 400 bad JSON / schema / values / images / context length / more KV
cache than the whole budget (``GenerationError`` from the driver's ``submit``), 401 missing
or wrong API key, 403 a browser request from a web page of another origin (``Origin``),
404 unknown model or route, 413 body or image too large, 415 a body that is not
``application/json`` (text/plain and form bodies are what a page of another origin can
send without a preflight), 421 a ``Host`` the server does not answer to (DNS rebinding),
429 queue full (with ``Retry-After``), 503 model still loading (with ``Retry-After``),
500 only for a fault of the server itself (logged with its traceback, never sent to the
client).
"""

from __future__ import annotations

from ..errors import ConversationError, DSVL2Error, GenerationError, ImageError, ImageTooLargeError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 421: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """A refusal with its HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_dsvl2(exc: DSVL2Error) -> APIError:
    """A dsvl2 input error raised while processing a request (images, conversation, options)."""
    msg = str(exc)
    if isinstance(exc, ImageTooLargeError):
        return APIError(413, msg, param="messages", code="image_too_large")
    if isinstance(exc, ImageError):
        return APIError(400, msg, param="messages", code="invalid_image")
    if isinstance(exc, ConversationError):
        return APIError(400, msg, param="messages")
    if isinstance(exc, GenerationError):
        return APIError(400, msg)
    return APIError(400, msg)
