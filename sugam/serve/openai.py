"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models over the chat layer, with
OpenAI's response, chunk, logprobs and usage shapes and SSE framing. A request's `model` picks the
base model or one of the LoRA adapters /v1/models lists (vLLM's convention)."""

from __future__ import annotations

import base64
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..chat_template import RESERVED_TEMPLATE_VARIABLES
from ..engine.async_engine import AsyncLLMEngine
from ..engine.sequence import Logprob
from ..lora.adapter import LoRARequest
from ..tokenizer import Tokenizer
from .chat import GenerationTimeout, Job, ReplyFormat, SamplingOptions, prepare, tool_call_schema, without_reasoning
from .errors import APIError, api_error, error_body
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    NamedToolChoice,
    ResponseFormat,
)

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger(__name__)


def router(server: Server) -> APIRouter:
    routes = APIRouter()

    @routes.get("/v1/models")
    async def models() -> dict[str, Any]:
        base_name = server.config.model_name
        model: dict[str, Any] = {"id": base_name, "object": "model", "created": 0, "owned_by": "sugam",
                                 "root": server.config.model_path or base_name, "parent": None}
        data = [model]
        if server.engine is not None:  # the path chosen at load: CPU, kernels, weight formats, compute dtype
            model["max_model_len"] = server.engine.engine.max_model_len
            model["sugam_execution"] = server.engine.engine.runner.execution_path()
            # LoRA adapters in vLLM's shape: each its own model, with the base as its parent.
            for lora in sorted(server.engine.engine.list_loras(), key=lambda r: r.lora_int_id):
                data.append({"id": lora.lora_name, "object": "model", "created": 0, "owned_by": "sugam",
                             "root": lora.lora_path, "parent": base_name})
        return {"object": "list", "data": data}

    @routes.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        engine = server.ready_engine()
        lora = server.check_model(req.model)
        tokenizer = engine.engine.tokenizer
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
        template_tools = tools if tools and choice != "none" else None
        if req.chat_template is not None:
            raise APIError(400, "chat_template is not accepted: this server renders only the model's own chat "
                                "template", param="chat_template")
        messages = template_messages(req.messages)
        _check_template_kwargs(req.chat_template_kwargs)
        prompt = await server.chat.render_prompt(tokenizer, messages, template_tools, req.chat_template_kwargs)
        # tool_choice "required" or a named tool: a grammar makes the whole output one call.
        forced_call = template_tools is not None and (choice == "required" or isinstance(choice, dict))
        schema = (tool_call_schema(_chosen_tools(template_tools, choice)) if template_tools and forced_call
                  else _response_schema(req.response_format))
        top = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens or req.max_tokens
        options = _options(req, max_tokens, top if req.logprobs else None, schema, req.max_thinking_tokens)
        jobs = prepare(engine, [prompt.token_ids], options, lora)
        _check_room(engine, len(prompt.token_ids), max_tokens)
        server.check_capacity(engine, len(jobs))
        fmt = ReplyFormat(prompt.opens_thinking, template_tools is not None, forced_call,
                          frozenset(t["function"]["name"] for t in template_tools or []))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": _model_name(server, lora)}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream_chat(server, engine, request, len(prompt.token_ids), jobs, base, fmt, req.logprobs, top,
                             include_usage, lora),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = await server.chat.collect(engine, jobs, request.is_disconnected, lora)
        choices, completion_tokens = [], 0
        for index, out in sorted(finals.items()):
            completion_tokens += len(out.token_ids)
            reply = fmt.split(out.text)
            message: dict[str, Any] = {"role": "assistant",
                                       "content": reply.content if reply.content or not reply.tool_calls else None}
            if reply.reasoning is not None:
                message["reasoning_content"] = message["reasoning"] = reply.reasoning
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            choices.append({"index": index, "message": message,
                            "finish_reason": "tool_calls" if reply.tool_calls else out.finish_reason,
                            "logprobs": {"content": _chat_logprobs(out.logprobs or [], out.token_ids, top)}
                            if req.logprobs else None})
        prompt_tokens = len(prompt.token_ids)
        server.metrics.prompt_tokens.inc(prompt_tokens)
        return {**base, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @routes.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        engine = server.ready_engine()
        lora = server.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        tokenizer = engine.engine.tokenizer
        raw = req.prompt
        prompts: list[str | list[int]]
        if isinstance(raw, str) or raw and all(isinstance(t, int) for t in raw):
            prompts = [raw]  # type: ignore[list-item]  # one prompt: text or token ids
        else:
            prompts = list(raw)  # type: ignore[arg-type]
        if not prompts or len(prompts) > 64:
            raise APIError(400, "prompt must hold 1 to 64 prompts", param="prompt")
        encoded = await server.chat.off_loop(lambda: [tokenizer.encode(p) if isinstance(p, str) else list(p)
                                                      for p in prompts])
        options = _options(req, req.max_tokens, req.logprobs, _response_schema(req.response_format))
        # Choice index = prompt index * n + sample index, as OpenAI numbers them.
        jobs = prepare(engine, encoded, options, lora)
        for ids in encoded:
            _check_room(engine, len(ids), req.max_tokens)
        server.check_capacity(engine, len(jobs))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": _model_name(server, lora)}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream_completion(server, engine, request, jobs, req, base, include_usage, lora),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = await server.chat.collect(engine, jobs, request.is_disconnected, lora)
        choices, completion_tokens = [], 0
        for index, out in sorted(finals.items()):
            prefix = tokenizer.decode(jobs[index][0]) if req.echo else ""
            completion_tokens += len(out.token_ids)
            choices.append({"index": index, "text": prefix + out.text, "finish_reason": out.finish_reason,
                            "logprobs": _completion_logprobs(out.logprobs or [], out.token_ids, len(prefix))
                            if req.logprobs is not None else None})
        prompt_tokens = sum(len(ids) for ids in encoded)
        server.metrics.prompt_tokens.inc(prompt_tokens)
        return {**base, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @routes.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        engine = server.ready_engine()
        if server.check_model(req.model) is not None:
            raise APIError(400, f"embeddings come from the base model only; use {server.config.model_name!r}",
                           param="model")
        raw = req.input
        inputs: list[str | list[int]]
        if isinstance(raw, str) or raw and all(isinstance(t, int) for t in raw):
            inputs = [raw]  # type: ignore[list-item]
        else:
            inputs = list(raw)  # type: ignore[arg-type]
        if not 1 <= len(inputs) <= MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} texts or token lists", param="input")
        hidden = engine.engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions > hidden:
            raise APIError(400, f"dimensions must be in [1, {hidden}], not {req.dimensions}", param="dimensions")
        tokenizer = engine.engine.tokenizer
        # Tokenized as /api/embed tokenizes, so both give the same vectors.
        encoded = await server.chat.off_loop(lambda: [tokenizer.encode(t) if isinstance(t, str) else list(t)
                                                      for t in inputs])
        data, tokens = [], 0
        for i, ids in enumerate(encoded):
            if not ids:
                raise APIError(400, f"input {i} is empty", param="input")
            vector = await engine.embed(ids)
            if req.dimensions is not None:  # cut and normalised again, as OpenAI's shortened embeddings are
                vector = _normalised(vector[:req.dimensions])
            tokens += len(ids)
            data.append({"object": "embedding", "index": i, "embedding": _encoded(vector, req.encoding_format)})
        server.metrics.prompt_tokens.inc(tokens)
        return {"object": "list", "data": data, "model": server.config.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return routes


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    """float: the list; base64: the little-endian float32 bytes, as OpenAI sends them."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


# ---- requests -----------------------------------------------------------------------------------

def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> what chat templates expect: text content, tool-call arguments as objects,
    and earlier assistant turns without their reasoning."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
            content: str | None = "".join(p.text or "" for p in m.content)
        else:
            content = m.content
        if m.role == "assistant" and content:
            content = without_reasoning(content)
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


def _check_template_kwargs(template_kwargs: dict[str, Any] | None) -> None:
    # The tokenizer refuses these too; checked here first so that the 400 names the field.
    for key in sorted(RESERVED_TEMPLATE_VARIABLES):  # the template, or what the renderer fills in
        if key in (template_kwargs or {}):
            raise APIError(400, f"chat_template_kwargs may not set {key!r}: this server renders only the "
                                "model's own chat template", param=f"chat_template_kwargs.{key}")


def _chosen_tools(tools: list[dict[str, Any]], choice: Any) -> list[dict[str, Any]]:
    """The tools a call may use under tool_choice ("required": any of them, or the one it names)."""
    if not isinstance(choice, dict):
        return tools
    wanted = choice["function"].get("name")
    chosen = [t for t in tools if t["function"]["name"] == wanted]
    if not chosen:
        raise APIError(400, f"tool_choice names {wanted!r}, which is not among the tools", param="tool_choice")
    return chosen


def _response_schema(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return fmt.json_schema.schema_


def _options(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, logprobs: int | None,
             json_schema: dict | None, max_thinking_tokens: int | None = None) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
        logprobs=logprobs, json_schema=json_schema, regex=req.guided_regex,
        max_thinking_tokens=max_thinking_tokens, n=req.n)


def _model_name(server: Server, lora: LoRARequest | None) -> str:
    """The model a response names: the adapter the request picked, else the base."""
    return lora.lora_name if lora is not None else server.config.model_name


def _check_room(engine: AsyncLLMEngine, prompt_len: int, max_tokens: int | None) -> None:
    # The engine would stop at the end of the context; OpenAI's API refuses such a request instead.
    context = engine.engine.max_model_len
    if max_tokens is not None and prompt_len + max_tokens > context:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                            f"{prompt_len + max_tokens} exceeds the context of {context} tokens",
                       param="max_tokens", code="context_length_exceeded")


# ---- responses ----------------------------------------------------------------------------------

def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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


def _sse_error(exc: Exception) -> str:
    """An error after the stream's 200 went out: one error event, then the stream ends as usual."""
    if isinstance(exc, GenerationTimeout):
        err = api_error(exc)
        return _sse(error_body(err.message, err.type, err.param, err.code))
    log.exception("stream failed")
    return _sse(error_body(f"generation failed: {exc}", "server_error"))


async def _stream_chat(server: Server, engine: AsyncLLMEngine, request: Request, prompt_tokens: int, jobs: list[Job],
                       base: dict[str, Any], fmt: ReplyFormat, logprobs: bool, top: int, include_usage: bool,
                       lora: LoRARequest | None = None) -> AsyncIterator[str]:
    n = len(jobs)
    chunk = {**base, "object": "chat.completion.chunk"}
    replies = [fmt.stream() for _ in range(n)]
    calls_sent = [0] * n
    seen_tokens = [0] * n
    completion_tokens = 0

    def delta_chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _sse({**chunk, "choices": [choice]})

    for i in range(n):
        yield delta_chunk(i, {"role": "assistant", "content": ""})
    try:
        async for index, out in server.chat.run(engine, jobs, request.is_disconnected, lora):
            completion = out.outputs[0]
            piece = replies[index].feed(completion.delta_text, out.finished)
            delta: dict[str, Any] = {}
            if piece.reasoning:
                delta["reasoning_content"] = delta["reasoning"] = piece.reasoning
            if piece.content:
                delta["content"] = piece.content
            if piece.tool_calls:
                delta["tool_calls"] = [{"index": calls_sent[index] + k, **call}
                                       for k, call in enumerate(piece.tool_calls)]
                calls_sent[index] += len(piece.tool_calls)
            lp = None
            new_tokens = completion.token_ids[seen_tokens[index]:]
            if logprobs and new_tokens:
                lp = {"content": _chat_logprobs((completion.logprobs or [])[seen_tokens[index]:], new_tokens, top)}
            seen_tokens[index] = len(completion.token_ids)
            if delta or lp:
                yield delta_chunk(index, delta, lp=lp)
            if out.finished:
                completion_tokens += len(completion.token_ids)
                finish = "tool_calls" if calls_sent[index] else completion.finish_reason
                yield delta_chunk(index, {}, finish)
    except Exception as exc:  # never leave a stream hanging: tell the client, then end it
        yield _sse_error(exc)
    server.metrics.prompt_tokens.inc(prompt_tokens)
    if include_usage:
        yield _sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")


async def _stream_completion(server: Server, engine: AsyncLLMEngine, request: Request, jobs: list[Job],
                             req: CompletionRequest, base: dict[str, Any], include_usage: bool,
                             lora: LoRARequest | None = None) -> AsyncIterator[str]:
    tokenizer: Tokenizer = engine.engine.tokenizer
    seen: dict[int, int] = {}
    offsets: dict[int, int] = {}
    completion_tokens = 0
    try:
        if req.echo:
            for index, (ids, _) in enumerate(jobs):
                text = tokenizer.decode(ids)
                offsets[index] = len(text)
                yield _sse({**base, "choices": [{"index": index, "text": text, "logprobs": None,
                                                  "finish_reason": None}]})
        async for index, out in server.chat.run(engine, jobs, request.is_disconnected, lora):
            completion = out.outputs[0]
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
                completion_tokens += len(completion.token_ids)
    except Exception as exc:
        yield _sse_error(exc)
    prompts = [ids for ids, _ in jobs[::req.n]]
    prompt_tokens = sum(len(p) for p in prompts)
    server.metrics.prompt_tokens.inc(prompt_tokens)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")
