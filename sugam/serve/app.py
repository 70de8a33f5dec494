"""The server's assembly: config, engine loading and readiness, capacity, middleware (body limit,
auth, request counting), /health, /metrics and the error handlers; the API routes live in their
own modules (openai.py: chat, completions, embeddings; anthropic.py: the Anthropic Messages API;
responses.py: the OpenAI Responses API; ollama.py: the Ollama API under /api/; lora.py: loading
adapters at runtime; webui.py: the chat page at /) over the chat layer (chat.py).

Every error a client can cause is answered with a 4xx, in OpenAI's error shape (Ollama's under /api/,
Anthropic's under /v1/messages); a request that ends early for any reason (disconnect, timeout,
error) is aborted so its KV blocks return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..distributed.parallel import DistributedFailure
from ..engine.async_engine import AsyncLLMEngine
from ..engine.llm_engine import LLMEngine
from ..engine.runner import describe_path
from ..lora.adapter import LoRARequest
from . import anthropic, lora, ollama, openai, responses, webui
from .chat import Chat
from .errors import REQUEST_ERRORS, APIError, anthropic_error_body, anthropic_path, error_response_for, ollama_path
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 256               # queued sequences beyond which new requests get 429
    max_body_bytes: int = 4 * 2**20      # larger request bodies get 413
    request_timeout: float = 600.0       # seconds a request may take before it is aborted
    # Threads that tokenize prompts off the event loop, and processes that render chat templates
    # (sugam/serve/templates.py: a render in a thread would hold the GIL the engine needs). Each
    # render is bounded by the template limits (sugam/chat_template.py), so a slow one holds one
    # worker for at most a few seconds; two keep a second request moving meanwhile.
    prompt_workers: int = 2
    model_path: str | None = None        # what /v1/models reports as the base model's root
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING):
    # they read adapter files from the server's disk at a client's word, so they are off by default.
    allow_runtime_lora: bool = False
    webui: bool = True                   # the chat page at / (sugam/serve/webui.py); off: / is only the Ollama probe


class BodyLimitMiddleware:
    """Refuses request bodies over a size limit (by Content-Length, and while reading chunked ones)."""

    def __init__(self, app: Callable, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response_for(scope.get("path", ""), APIError(413, f"request body exceeds {self.limit} bytes",
                                                                     code="body_too_large"))
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
            return message

        await self.app(scope, limited_receive, send)


class Server:
    """Holds the engine (once loaded), the metrics and the chat layer the routes share."""

    def __init__(self, config: ServerConfig, load_engine: Callable[[], LLMEngine]):
        self.config = config
        self.metrics = ServerMetrics(config.model_name)
        self.engine: AsyncLLMEngine | None = None
        self.load_error: str | None = None
        self.fatal_error: str | None = None
        self._load_engine = load_engine
        self.chat = Chat(self.metrics, workers=config.prompt_workers, request_timeout=config.request_timeout)
        self._last_lora_id = 0

    def start_templates(self) -> None:
        seconds = self.chat.start()
        log.info("chat template workers started in %.2f s", seconds)

    def start_loading(self) -> None:
        def load() -> None:
            try:
                engine = self._load_engine()
                if engine.tp is not None:
                    engine.tp.on_failure(self.fail)
                self.engine = AsyncLLMEngine(engine)
                path = engine.runner.execution_path()
                self.metrics.set_execution_path(path)
                print(f"sugam: {self.config.model_name} loaded ({describe_path(path)}); serving",
                      file=sys.stderr, flush=True)
            except DistributedFailure as exc:  # the tensor-parallel group could not form: let a supervisor retry
                self.load_error = str(exc)
                self.fail(str(exc))
            except Exception as exc:  # reported by /health and every /v1 call
                log.exception("loading the model failed")
                self.load_error = str(exc)

        threading.Thread(target=load, name="sugam-load", daemon=True).start()

    def close(self) -> None:
        self.chat.close()

    def fail(self, reason: str, exit_after: float = 1.0) -> None:
        """The engine cannot go on (a tensor-parallel rank died or hung): answer 503 from now on and
        exit non-zero shortly, so that a supervisor (systemd, Kubernetes) starts a fresh server."""
        self.fatal_error = reason
        print(f"sugam: fatal: {reason}; answering 503 and exiting", file=sys.stderr, flush=True)

        def leave() -> None:
            try:
                self.close()       # the template worker processes go too, not orphaned
            finally:
                os._exit(1)

        threading.Timer(exit_after, leave).start()
        threading.Timer(exit_after + 5, os._exit, args=(1,)).start()   # should closing hang

    def ready_engine(self) -> AsyncLLMEngine:
        if self.fatal_error:
            raise APIError(503, f"the server is stopping: {self.fatal_error}", "server_error")
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", "server_error")
            raise APIError(503, "the model is still loading; retry shortly", "server_error",
                           headers={"Retry-After": "5"})
        return self.engine

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names, or None for the base model (its name, or none
        given); any other name is a 404."""
        if not name or name == self.config.model_name:
            return None
        loras = self.engine.engine.loras if self.engine is not None else None
        loaded = loras.get(name) if loras is not None else None
        if loaded is not None:
            return loaded.request
        adapters = sorted(lora.name for lora in loras.list()) if loras is not None else []
        also = f" and the LoRA adapters {', '.join(map(repr, adapters))}" if adapters else ""
        raise APIError(404, f"model {name!r} does not exist; this server serves {self.config.model_name!r}{also}",
                       param="model", code="model_not_found")

    def next_lora_id(self) -> int:
        """An id for an adapter loaded at runtime: after those loaded at start (1, 2, ...) and
        every id given before (called on the event loop, so never twice the same)."""
        ids = [r.lora_int_id for r in self.engine.engine.list_loras()] if self.engine is not None else []
        self._last_lora_id = max([self._last_lora_id, *ids]) + 1
        return self._last_lora_id

    def check_capacity(self, engine: AsyncLLMEngine, sequences: int) -> None:
        queued = engine.num_queued()
        if queued + sequences > self.config.max_waiting:
            raise APIError(429, f"the server is busy ({queued} requests waiting); retry shortly",
                           "rate_limit_error", headers={"Retry-After": "1"})


def create_app(config: ServerConfig, load_engine: Callable[[], LLMEngine]) -> FastAPI:
    server = Server(config, load_engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start_loading()
        await asyncio.to_thread(server.start_templates)  # before serving, so no request pays the spawn
        yield
        server.close()

    app = FastAPI(title="sugam", version="0.1.0", description="OpenAI-compatible API for Qwen-family models",
                  lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)

    # One answer for what a request can raise: HTTP-layer APIErrors, the engine's and the
    # templates' refusals (SugamError: 400 with their message), timeouts and disconnects.
    async def request_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response_for(request.url.path, exc)

    for kind in REQUEST_ERRORS:
        app.add_exception_handler(kind, request_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        field = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            field = None
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
        else:
            message = f"{field or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response_for(request.url.path, APIError(400, message, param=field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if ollama_path(request.url.path):  # e.g. an unknown /api/ route or a wrong method: Ollama's shape
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        if anthropic_path(request.url.path):
            return JSONResponse(anthropic_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                                headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Callable) -> Response:
        path = request.url.path
        if path.startswith(("/v1/", "/api/")):
            if config.api_key is not None:
                # Authorization: Bearer KEY (OpenAI, Ollama) or x-api-key: KEY (Anthropic), on every route
                header = request.headers.get("authorization", "")
                given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
                if not secrets.compare_digest(given.encode(), config.api_key.encode()):
                    response: Response = error_response_for(path, APIError(
                        401, "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)",
                        "authentication_error", code="invalid_api_key"))
                    server.metrics.requests.labels(path, "401").inc()
                    return response
            if ollama_path(path):
                ollama.read_body_as_json(request.scope)
            try:
                response = await call_next(request)
            except APIError as exc:  # raised while reading the body (size limit)
                response = error_response_for(path, exc)
            server.metrics.requests.labels(path, str(response.status_code)).inc()
            return response
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.fatal_error:
            return JSONResponse({"status": "error", "detail": server.fatal_error}, status_code=503)
        if server.engine is not None:
            return JSONResponse({"status": "ok", "model": config.model_name})
        status = "error" if server.load_error else "loading"
        return JSONResponse({"status": status, "detail": server.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = server.engine.stats() if server.engine is not None else None
        if server.engine is not None and server.engine.engine.loras is not None:
            engine = server.engine.engine
            counts = engine.scheduler.counts()
            server.metrics.set_lora_info(counts.running_loras, counts.waiting_loras, engine.config.max_loras)
        return Response(server.metrics.render(stats), media_type="text/plain; version=0.0.4")

    app.include_router(openai.router(server))
    app.include_router(anthropic.router(server))
    app.include_router(responses.router(server))
    app.include_router(ollama.router(server))
    app.include_router(lora.router(server))
    app.include_router(webui.router(server))
    return app
