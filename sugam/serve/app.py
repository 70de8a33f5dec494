"""FastAPI app speaking the OpenAI API over the asyncio engine.

Every error a client can cause is answered in OpenAI's error shape with a 4xx; a request that
ends early for any reason (disconnect, timeout, error) is aborted so its KV blocks return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat_template import RESERVED_TEMPLATE_VARIABLES
from ..engine.async_engine import AsyncLLMEngine
from ..engine.llm_engine import LLMEngine
from ..engine.runner import describe_path
from ..engine.sequence import CompletionOutput, Logprob, RequestOutput
from ..errors import SugamError
from ..sampling_params import SamplingParams
from ..tokenizer import ChatTemplateError, TemplateLimitError, Tokenizer
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
)
from .reasoning import ReasoningParser, prompt_opens_thinking, split_reasoning
from .templates import TemplateRenderer
from .tools import ToolCallParser, extract_tool_calls, parse_call

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


class BodyLimitMiddleware:
    """Refuses request bodies over a size limit (by Content-Length, and while reading chunked ones)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error_response(APIError(413, f"request body exceeds {self.limit} bytes", code="body_too_large"))
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
    """Holds the engine (once loaded), the metrics and the request handlers."""

    def __init__(self, config: ServerConfig, load_engine: Callable[[], LLMEngine]):
        self.config = config
        self.metrics = ServerMetrics()
        self.engine: AsyncLLMEngine | None = None
        self.load_error: str | None = None
        self._load_engine = load_engine
        self._prompt_pool = ThreadPoolExecutor(max_workers=config.prompt_workers, thread_name_prefix="sugam-prompt")
        self.templates = TemplateRenderer(workers=config.prompt_workers)

    def start_templates(self) -> None:
        seconds = self.templates.start()
        log.info("chat template workers started in %.2f s", seconds)

    def start_loading(self) -> None:
        def load() -> None:
            try:
                engine = self._load_engine()
                self.engine = AsyncLLMEngine(engine)
                path = engine.runner.execution_path()
                self.metrics.set_execution_path(path)
                print(f"sugam: {self.config.model_name} loaded ({describe_path(path)}); serving",
                      file=sys.stderr, flush=True)
            except Exception as exc:  # reported by /health and every /v1 call
                log.exception("loading the model failed")
                self.load_error = str(exc)

        threading.Thread(target=load, name="sugam-load", daemon=True).start()

    def close(self) -> None:
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)
        self.templates.close()

    # ---- helpers ------------------------------------------------------------------------------

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU work (template rendering, tokenizing) in the prompt threads, so that the event
        loop keeps answering other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, work)

    async def chat_prompt(self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None,
                          template_kwargs: dict[str, Any] | None) -> tuple[str, list[int]]:
        """The rendered chat prompt and its token ids; template failures and limits are 400s."""
        for key in sorted(RESERVED_TEMPLATE_VARIABLES):  # the template, or what the renderer fills in
            if key in (template_kwargs or {}):
                raise APIError(400, f"chat_template_kwargs may not set {key!r}: this server renders only the "
                                    "model's own chat template", param=f"chat_template_kwargs.{key}")

        try:
            source, variables = tokenizer.chat_variables(messages, tools=tools, add_generation_prompt=True,
                                                         template_kwargs=template_kwargs)
            # Rendered in a worker process (sugam/serve/templates.py), tokenized here.
            text = await self.templates.render(source, variables, tokenizer.template_limits)
            return text, await self.off_loop(lambda: tokenizer.encode(text, add_special_tokens=False))
        except TemplateLimitError as exc:
            raise APIError(400, str(exc), param="messages", code="chat_template_limit") from exc
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    def ready_engine(self) -> AsyncLLMEngine:
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", "server_error")
            raise APIError(503, "the model is still loading; retry shortly", "server_error",
                           headers={"Retry-After": "5"})
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name and name != self.config.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def check_capacity(self, engine: AsyncLLMEngine, sequences: int) -> None:
        queued = engine.num_queued()
        if queued + sequences > self.config.max_waiting:
            raise APIError(429, f"the server is busy ({queued} requests waiting); retry shortly",
                           "rate_limit_error", headers={"Retry-After": "1"})

    def sampling_params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                        prompt_len: int, logprobs: int | None, json_schema: dict | None,
                        max_thinking_tokens: int | None = None) -> SamplingParams:
        engine = self.ready_engine().engine
        context = engine.max_model_len
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {context}",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                                f"{prompt_len + max_tokens} exceeds the context of {context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=logprobs,
                json_schema=json_schema, regex=req.guided_regex, max_thinking_tokens=max_thinking_tokens)
            if json_schema is not None or req.guided_regex is not None:
                engine.grammars.matcher(json_schema, req.guided_regex)  # refuse a bad grammar before streaming
        except SugamError as exc:
            raise APIError(400, str(exc), param="response_format" if json_schema is not None else None) from exc
        return params

    async def run(self, request: Request, jobs: list[tuple[list[int], SamplingParams]]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run (prompt, params) jobs concurrently; yield (job index, output) as they advance. Leaving
        early, a client disconnect or the timeout aborts all of them."""
        engine = self.ready_engine()
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()
        base_id = uuid.uuid4().hex

        async def one(index: int) -> None:
            prompt, sp = jobs[index]
            try:
                async for out in engine.generate(prompt, sp, request_id=f"{base_id}-{index}"):
                    queue.put_nowait((index, out))
            except BaseException as exc:
                queue.put_nowait(exc)
                raise
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(one(i)) for i in range(len(jobs))]
        deadline = time.monotonic() + self.config.request_timeout
        remaining = len(jobs)
        try:
            while remaining:
                if time.monotonic() > deadline:
                    raise APIError(408, f"the request took longer than {self.config.request_timeout:.0f} s "
                                        "and was stopped", code="timeout")
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _samples(prompt: list[int], params: SamplingParams, n: int) -> list[tuple[list[int], SamplingParams]]:
    """n jobs sampling one prompt; with a seed, choice i uses seed + i so that choices differ."""
    if params.seed is None or n == 1:
        return [(prompt, params)] * n
    return [(prompt, replace(params, seed=params.seed + i)) for i in range(n)]


def _response_schema(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return fmt.json_schema.schema_


def _tool_call_schema(tools: list[dict], choice: Any) -> dict:
    """A JSON schema whose documents are exactly the allowed calls: {"name": ..., "arguments": {...}}."""
    if isinstance(choice, dict):
        wanted = choice["function"].get("name")
        tools = [t for t in tools if t["function"]["name"] == wanted]
        if not tools:
            raise APIError(400, f"tool_choice names {wanted!r}, which is not among the tools", param="tool_choice")
    variants = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> what chat templates expect: text content, tool-call arguments as objects,
    and earlier assistant turns without their reasoning (as QwQ's card asks)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
            content: str | None = "".join(p.text or "" for p in m.content)
        else:
            content = m.content
        if m.role == "assistant" and content:
            content = split_reasoning(content)[1] if "</think>" in content else content
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                arguments: Any = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        pass
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        out.append(message)
    return out


def _chat_logprobs(entries: list[dict[int, Logprob]], tokens: list[int], top: int) -> list[dict[str, Any]]:
    content = []
    for token, entry in zip(tokens, entries):
        chosen = entry[token]
        alternatives = sorted((lp for t, lp in entry.items()), key=lambda lp: lp.rank)[:top]
        content.append({"token": chosen.decoded_token, "logprob": chosen.logprob,
                        "bytes": list(chosen.decoded_token.encode("utf-8")),
                        "top_logprobs": [{"token": a.decoded_token, "logprob": a.logprob,
                                          "bytes": list(a.decoded_token.encode("utf-8"))} for a in alternatives]})
    return content


def _completion_logprobs(entries: list[dict[int, Logprob]], tokens: list[int], offset: int) -> dict[str, Any]:
    texts, values, tops, offsets = [], [], [], []
    for token, entry in zip(tokens, entries):
        chosen = entry[token]
        texts.append(chosen.decoded_token)
        values.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in entry.values()})
        offsets.append(offset)
        offset += len(chosen.decoded_token)
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


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

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

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
        return _error_response(APIError(400, message, param=field))

    @app.exception_handler(SugamError)
    async def sugam_error(request: Request, exc: SugamError) -> JSONResponse:
        return _error_response(APIError(400, str(exc)))

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Callable) -> Response:
        path = request.url.path
        if path.startswith("/v1/"):
            if config.api_key is not None:
                header = request.headers.get("authorization", "")
                given = header[7:] if header.lower().startswith("bearer ") else ""
                if not secrets.compare_digest(given.encode(), config.api_key.encode()):
                    response: Response = _error_response(APIError(
                        401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                        code="invalid_api_key"))
                    server.metrics.requests.labels(path, "401").inc()
                    return response
            try:
                response = await call_next(request)
            except APIError as exc:  # raised while reading the body (size limit)
                response = _error_response(exc)
            server.metrics.requests.labels(path, str(response.status_code)).inc()
            return response
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.engine is not None:
            return JSONResponse({"status": "ok", "model": config.model_name})
        status = "error" if server.load_error else "loading"
        return JSONResponse({"status": status, "detail": server.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = server.engine.stats() if server.engine is not None else None
        return Response(server.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model: dict[str, Any] = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "sugam"}
        if server.engine is not None:  # the path chosen at load: CPU, kernels, weight formats, compute dtype
            model["sugam_execution"] = server.engine.engine.runner.execution_path()
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        engine = server.ready_engine()
        server.check_model(req.model)
        tokenizer = engine.engine.tokenizer
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        template_tools = tools if tools and choice != "none" else None
        if req.chat_template is not None:
            raise APIError(400, "chat_template is not accepted: this server renders only the model's own chat "
                                "template", param="chat_template")
        prompt_text, prompt = await server.chat_prompt(tokenizer, _template_messages(req.messages), template_tools,
                                                       req.chat_template_kwargs)
        forced_call = template_tools is not None and (choice == "required" or isinstance(choice, dict))
        schema = _tool_call_schema(template_tools, choice) if forced_call else _response_schema(req.response_format)
        top = req.top_logprobs or 0
        params = server.sampling_params(req, req.max_completion_tokens or req.max_tokens, len(prompt),
                                        top if req.logprobs else None, schema, req.max_thinking_tokens)
        server.check_capacity(engine, req.n)
        opened = prompt_opens_thinking(prompt_text)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream_chat(server, request, prompt, _samples(prompt, params, req.n), base, opened,
                             template_tools is not None,
                             forced_call, req.logprobs, top, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = await _collect(server, request, _samples(prompt, params, req.n))
        choices, completion_tokens = [], 0
        for index, out in sorted(finals.items()):
            completion_tokens += len(out.token_ids)
            reasoning, content = split_reasoning(out.text, opened)
            calls: list[dict[str, Any]] = []
            if forced_call:
                calls = _forced_calls(content)
                content = ""
            elif template_tools:
                content, calls = extract_tool_calls(content)
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if reasoning is not None:
                message["reasoning_content"] = message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": index, "message": message,
                            "finish_reason": "tool_calls" if calls else out.finish_reason,
                            "logprobs": {"content": _chat_logprobs(out.logprobs or [], out.token_ids, top)}
                            if req.logprobs else None})
        server.metrics.prompt_tokens.inc(len(prompt))
        return {**base, "choices": choices, "usage": {"prompt_tokens": len(prompt), "completion_tokens":
                completion_tokens, "total_tokens": len(prompt) + completion_tokens}}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        engine = server.ready_engine()
        server.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        tokenizer = engine.engine.tokenizer
        raw = req.prompt
        if isinstance(raw, str) or raw and all(isinstance(t, int) for t in raw):
            prompts = [raw]
        else:
            prompts = list(raw)  # type: ignore[arg-type]
        if not prompts or len(prompts) > 64:
            raise APIError(400, "prompt must hold 1 to 64 prompts", param="prompt")
        encoded = await server.off_loop(lambda: [tokenizer.encode(p) if isinstance(p, str) else list(p)
                                                 for p in prompts])
        vocab = engine.engine.model_config.vocab_size
        for ids in encoded:
            if not ids:
                raise APIError(400, "a prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        schema = _response_schema(req.response_format)
        all_params = [server.sampling_params(req, req.max_tokens, len(ids), req.logprobs, schema) for ids in encoded]
        server.check_capacity(engine, req.n * len(encoded))
        # Choice index = prompt index * n + sample index, as OpenAI numbers them.
        jobs = [job for ids, p in zip(encoded, all_params) for job in _samples(ids, p, req.n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": config.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream_completion(server, request, jobs, req, base, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = await _collect(server, request, jobs)
        choices, completion_tokens = [], 0
        for index, out in sorted(finals.items()):
            prefix = tokenizer.decode(jobs[index][0]) if req.echo else ""
            completion_tokens += len(out.token_ids)
            choices.append({"index": index, "text": prefix + out.text, "finish_reason": out.finish_reason,
                            "logprobs": _completion_logprobs(out.logprobs or [], out.token_ids, len(prefix))
                            if req.logprobs is not None else None})
        prompt_tokens = sum(len(ids) for ids in encoded)
        server.metrics.prompt_tokens.inc(prompt_tokens)
        return {**base, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens":
                completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}

    return app


def _forced_calls(text: str) -> list[dict[str, Any]]:
    call = parse_call(text.strip())
    return [call] if call else []


class _Timing:
    """Feeds the latency histograms as one choice's tokens arrive."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics, self.start, self.last, self.tokens = metrics, time.monotonic(), None, 0

    def saw(self, out: CompletionOutput) -> None:
        new = len(out.token_ids) - self.tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe((now - self.last) / new)
        self.last, self.tokens = now, len(out.token_ids)
        self.metrics.generation_tokens.inc(new)

    def done(self) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.start)


async def _collect(server: Server, request: Request, jobs: list[tuple[list[int], SamplingParams]]
                   ) -> dict[int, CompletionOutput]:
    finals: dict[int, CompletionOutput] = {}
    timings = [_Timing(server.metrics) for _ in jobs]
    async for index, out in server.run(request, jobs):
        timings[index].saw(out.outputs[0])
        if out.finished:
            finals[index] = out.outputs[0]
            timings[index].done()
    if len(finals) < len(jobs):  # the client went away
        raise APIError(499, "client disconnected")
    return finals


async def _stream_chat(server: Server, request: Request, prompt: list[int],
                       jobs: list[tuple[list[int], SamplingParams]], base: dict[str, Any], opened: bool, tools: bool,
                       forced_call: bool, logprobs: bool, top: int, include_usage: bool) -> AsyncIterator[str]:
    n = len(jobs)
    chunk = {**base, "object": "chat.completion.chunk"}
    reasoning = [ReasoningParser(opened) for _ in range(n)]
    tool_parsers = [ToolCallParser() for _ in range(n)]
    forced_text = [""] * n  # with a forced tool call the whole output is one call, parsed at the end
    calls_sent = [0] * n
    seen_tokens = [0] * n
    timings = [_Timing(server.metrics) for _ in range(n)]
    completion_tokens = 0

    def delta_chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _sse({**chunk, "choices": [choice]})

    for i in range(n):
        yield delta_chunk(i, {"role": "assistant", "content": ""})
    try:
        async for index, out in server.run(request, jobs):
            completion = out.outputs[0]
            timings[index].saw(completion)
            r_delta, c_delta = reasoning[index].feed(completion.delta_text)
            calls: list[dict[str, Any]] = []
            if out.finished:
                r_end, c_end = reasoning[index].finish()
                r_delta, c_delta = r_delta + r_end, c_delta + c_end
            if forced_call:
                forced_text[index] += c_delta
                c_delta = ""
                if out.finished:
                    calls = _forced_calls(forced_text[index])
            elif tools:
                c_delta, calls = tool_parsers[index].feed(c_delta)
                if out.finished:
                    c_delta += tool_parsers[index].finish()
            delta: dict[str, Any] = {}
            if r_delta:
                delta["reasoning_content"] = delta["reasoning"] = r_delta
            if c_delta:
                delta["content"] = c_delta
            if calls:
                delta["tool_calls"] = [{"index": calls_sent[index] + k, **call} for k, call in enumerate(calls)]
                calls_sent[index] += len(calls)
            lp = None
            new_tokens = completion.token_ids[seen_tokens[index]:]
            if logprobs and new_tokens:
                lp = {"content": _chat_logprobs((completion.logprobs or [])[seen_tokens[index]:], new_tokens, top)}
            seen_tokens[index] = len(completion.token_ids)
            if delta or lp:
                yield delta_chunk(index, delta, lp=lp)
            if out.finished:
                timings[index].done()
                completion_tokens += len(completion.token_ids)
                finish = "tool_calls" if calls_sent[index] else completion.finish_reason
                yield delta_chunk(index, {}, finish)
    except APIError as exc:
        yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
    except Exception as exc:  # never leave a stream hanging: tell the client, then end it
        log.exception("stream failed")
        yield _sse(error_body(f"generation failed: {exc}", "server_error"))
    server.metrics.prompt_tokens.inc(len(prompt))
    if include_usage:
        yield _sse({**chunk, "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens":
                    completion_tokens, "total_tokens": len(prompt) + completion_tokens}})
    yield _sse("[DONE]")


async def _stream_completion(server: Server, request: Request, jobs: list[tuple[list[int], SamplingParams]],
                             req: CompletionRequest, base: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    tokenizer = server.ready_engine().engine.tokenizer
    seen: dict[int, int] = {}
    offsets: dict[int, int] = {}
    completion_tokens = 0
    timings = [_Timing(server.metrics) for _ in jobs]
    try:
        if req.echo:
            for index, (ids, _) in enumerate(jobs):
                text = tokenizer.decode(ids)
                offsets[index] = len(text)
                yield _sse({**base, "choices": [{"index": index, "text": text, "logprobs": None,
                                                  "finish_reason": None}]})
        async for index, out in server.run(request, jobs):
            completion = out.outputs[0]
            timings[index].saw(completion)
            start = seen.get(index, 0)
            new_tokens = completion.token_ids[start:]
            seen[index] = len(completion.token_ids)
            lp = None
            if req.logprobs is not None and new_tokens:
                lp = _completion_logprobs((completion.logprobs or [])[start:], new_tokens, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(completion.delta_text)
            if completion.delta_text or lp or out.finished:
                yield _sse({**base, "choices": [{"index": index, "text": completion.delta_text, "logprobs": lp,
                                                  "finish_reason": completion.finish_reason if out.finished else None}]})
            if out.finished:
                timings[index].done()
                completion_tokens += len(completion.token_ids)
    except APIError as exc:
        yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
    except Exception as exc:
        log.exception("stream failed")
        yield _sse(error_body(f"generation failed: {exc}", "server_error"))
    prompts = [ids for ids, _ in jobs[::req.n]]
    prompt_tokens = sum(len(p) for p in prompts)
    server.metrics.prompt_tokens.inc(prompt_tokens)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens":
                    completion_tokens, "total_tokens": prompt_tokens + completion_tokens}})
    yield _sse("[DONE]")
