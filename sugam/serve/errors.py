"""HTTP errors in OpenAI's error shape (Ollama's, `{"error": "..."}`, under /api/), and the one mapping
from what a request can raise to them."""

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


def error_response_for(path: str, exc: Exception) -> JSONResponse:
    """The error in the shape of the API that `path` belongs to."""
    return ollama_error_response(exc) if ollama_path(path) else error_response(exc)
