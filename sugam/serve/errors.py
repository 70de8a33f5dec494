"""HTTP errors in OpenAI's error shape (Ollama's, `{"error": "..."}`, under /api/; Anthropic's,
`{"type": "error", "error": {"type", "message"}}`, under /v1/messages), and the one mapping from what a
request can raise to them."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from ..chat_template import ChatTemplateError, TemplateLimitError
from ..distributed.parallel import DistributedFailure
from ..engine.llm_engine import KVPoolBusyError
from ..errors import DownloadError, PromptTooLongError, SugamError
from .chat import ClientGone, GenerationTimeout


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


# Raised by the chat layer, the engine or the templates; api_error() answers each.
REQUEST_ERRORS: tuple[type[Exception], ...] = (APIError, SugamError, GenerationTimeout, ClientGone)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error(exc: Exception) -> APIError:
    """The HTTP answer to an error a request caused. The engine, SamplingParams and the template
    renderer validate requests; their refusals (SugamError) are 400s carrying their message."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GenerationTimeout):
        return APIError(408, str(exc), code="timeout")
    if isinstance(exc, ClientGone):
        return APIError(499, "client disconnected")
    if isinstance(exc, TemplateLimitError):
        return APIError(400, str(exc), param="messages", code="chat_template_limit")
    if isinstance(exc, ChatTemplateError):
        return APIError(400, str(exc), param="messages")
    if isinstance(exc, KVPoolBusyError):
        return APIError(503, str(exc), "server_error", headers={"Retry-After": "1"})
    if isinstance(exc, DistributedFailure):  # a tensor-parallel rank died or hung: the server is going down
        return APIError(503, str(exc), "server_error")
    if isinstance(exc, DownloadError):  # the registry's files could not be fetched or did not verify
        return APIError(502, str(exc), "server_error")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, SugamError):
        return APIError(400, str(exc))
    raise TypeError(f"not a request error: {exc!r}")


def error_response(exc: Exception) -> JSONResponse:
    err = api_error(exc)
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def ollama_path(path: str) -> bool:
    """Whether a request path belongs to the Ollama API, whose errors are `{"error": "..."}`."""
    return path.startswith("/api/")


def ollama_error_response(exc: Exception) -> JSONResponse:
    err = api_error(exc)
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def anthropic_path(path: str) -> bool:
    """Whether a request path belongs to the Anthropic Messages API."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_error_response(exc: Exception) -> JSONResponse:
    err = api_error(exc)
    return JSONResponse(anthropic_error_body(err.status, err.message), status_code=err.status, headers=err.headers)


def error_response_for(path: str, exc: Exception) -> JSONResponse:
    """The error in the shape of the API that `path` belongs to."""
    if ollama_path(path):
        return ollama_error_response(exc)
    if anthropic_path(path):
        return anthropic_error_response(exc)
    return error_response(exc)
