"""The Anthropic Messages API on the same port, engine, key and limits as the OpenAI one:
POST /v1/messages and /v1/messages/count_tokens over the chat layer (chat.py), for Claude Code
(ANTHROPIC_BASE_URL) and the `anthropic` SDK.

Content blocks map onto the chat layer's messages: `text` to content, `tool_use` to tool calls,
`tool_result` to tool messages, `thinking` (earlier turns) is dropped as the chat layer drops
reasoning; answers come back as `thinking`, `text` and `tool_use` blocks, streamed with Anthropic's
event sequence. Errors have Anthropic's envelope (errors.py, by path). Fields sugam does not know
(cache_control, metadata, service_tier, container, ...) are ignored, as Claude Code sends many.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.async_engine import AsyncLLMEngine
from ..engine.sequence import CompletionOutput
from ..lora.adapter import LoRARequest
from .chat import (
    GenerationTimeout,
    Job,
    Prompt,
    ReplyFormat,
    SamplingOptions,
    Thinking,
    fit_max_tokens,
    prepare,
    reply_parts,
    thinking,
    tool_call_schema,
)
from .errors import APIError, anthropic_error_body, api_error

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger(__name__)


# ---- request bodies -----------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Block(_Body):
    """A content block of any type; which fields a type needs is checked when it is read."""
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None


class InputMessage(_Body):
    role: Literal["user", "assistant", "system"]   # Claude Code 2.1 sends system messages between turns
    content: str | list[Block]


class ToolDef(_Body):
    name: str = Field(min_length=1, max_length=256)
    type: str | None = None          # None or "custom": a client tool; others are Anthropic's server tools
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)
    display: str | None = None       # "omitted": think, but send the thinking blocks without their text


class CountTokensRequest(_Body):
    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=64)
    stream: bool = False
    # The anthropic SDK 2.x sends these through extra_body; Anthropic's own ranges.
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None


class RequestError(ValueError):
    """A request the chat layer cannot take; answered with a 400 naming the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# ---- requests -> chat-layer messages ------------------------------------------------------------

def _text_of(blocks: str | list[Block] | None, where: str) -> str:
    """The text of a string or a list of text blocks (a tool result's or the system prompt's)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for j, block in enumerate(blocks):
        _only_text(block, f"{where}.{j}")
        parts.append(block.text or "")
    return "\n".join(parts)


def _only_text(block: Block, where: str) -> None:
    if block.type in ("image", "document", "search_result"):
        raise RequestError(f"{where}: {block.type} blocks are not supported; this model takes text only", where)
    if block.type != "text" or block.text is None:
        raise RequestError(f"{where}: expected a text block with text, got type {block.type!r}", where)


def _arguments_object(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments (a JSON string from the chat layer) as the object `input` must be."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {"value": arguments}
    return arguments if isinstance(arguments, dict) else {"value": arguments}


def template_messages(system: str | list[Block] | None, messages: list[InputMessage]) -> list[dict[str, Any]]:
    """Anthropic's system prompt and messages -> what chat templates expect (OpenAI-style dicts:
    tool calls with object arguments, tool results as `tool` messages after the call they answer)."""
    out: list[dict[str, Any]] = []
    # System messages between turns join the system prompt: chat templates take one, first (Qwen's
    # writes a later one as a turn of its own, which small models then echo).
    systems = [_text_of(system, "system")] + [_text_of(m.content, f"messages.{i}.content")
                                              for i, m in enumerate(messages) if m.role == "system"]
    text = "\n\n".join(t for t in systems if t)
    if text:
        out.append({"role": "system", "content": text})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    for i, m in enumerate(messages):
        where = f"messages.{i}.content"
        if m.role == "system":
            continue
        blocks = [Block(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            at = f"{where}.{j}"
            if block.type in ("thinking", "redacted_thinking"):
                continue  # earlier reasoning does not go back to the template
            if block.type == "tool_use":
                if m.role != "assistant":
                    raise RequestError(f"{at}: tool_use blocks belong to assistant messages", at)
                if not block.id or not block.name:
                    raise RequestError(f"{at}: a tool_use block needs an id and a name", at)
                names[block.id] = block.name
                arguments = block.input if block.input is not None else {}
                if not isinstance(arguments, dict):
                    raise RequestError(f"{at}.input: a tool_use block's input must be an object", f"{at}.input")
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": arguments}})
            elif block.type == "tool_result":
                if m.role != "user":
                    raise RequestError(f"{at}: tool_result blocks belong to user messages", at)
                if not block.tool_use_id:
                    raise RequestError(f"{at}: a tool_result block needs a tool_use_id", at)
                content = _text_of(block.content, f"{at}.content")
                if block.is_error:
                    content = f"Error: {content}"
                result = {"role": "tool", "content": content, "tool_call_id": block.tool_use_id}
                if block.tool_use_id in names:
                    result["name"] = names[block.tool_use_id]
                results.append(result)
            else:
                _only_text(block, at)
                texts.append(block.text or "")
        content = "\n".join(t for t in texts if t) if len(texts) > 1 else "".join(texts)
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        else:
            out.extend(results)  # the results answer the previous turn's calls; any text follows them
            if content or not results:
                out.append({"role": "user", "content": content})
    if messages[-1].role == "assistant":
        raise RequestError("the last message is from the assistant: continuing a prefilled answer is not supported",
                           f"messages.{len(messages) - 1}")
    return out


def template_tools(tools: list[ToolDef] | None, choice: ToolChoice | None) -> list[dict[str, Any]] | None:
    """Client tools as chat templates take them (Anthropic's server tools, which run on Anthropic's
    side, are left out); None when there are none or tool_choice is none."""
    if not tools or (choice is not None and choice.type == "none"):
        return None
    chosen = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                 "parameters": t.input_schema or {"type": "object"}}}
              for t in tools if t.type in (None, "custom")]
    return chosen or None


def _forced_tools(tools: list[dict[str, Any]] | None, choice: ToolChoice | None) -> list[dict[str, Any]] | None:
    """The tools a grammar must make the answer call (tool_choice any, or tool with a name)."""
    if tools is None or choice is None or choice.type not in ("any", "tool"):
        return None
    if choice.type == "any":
        return tools
    chosen = [t for t in tools if t["function"]["name"] == choice.name]
    if not chosen:
        raise RequestError(f"tool_choice names {choice.name!r}, which is not among the tools", "tool_choice.name")
    return chosen


# ---- responses ----------------------------------------------------------------------------------

def _stop_reason(out: CompletionOutput, called: bool, stops: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished answer."""
    if called:
        return "tool_use", None
    if out.finish_reason == "length":
        return "max_tokens", None
    if isinstance(out.stop_reason, str) and out.stop_reason in stops:
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    call_id = call["id"]
    return {"type": "tool_use", "id": "toolu_" + call_id.removeprefix("call_"), "name": call["function"]["name"],
            "input": _arguments_object(call["function"]["arguments"])}


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def router(server: Server) -> APIRouter:
    routes = APIRouter(tags=["anthropic"])

    async def prompt_for(req: CountTokensRequest, engine: AsyncLLMEngine) -> tuple[
            Prompt, list[dict[str, Any]] | None, list[dict[str, Any]] | None, Thinking]:
        """(the prompt, the template's tools, the tools a grammar forces, the thinking switch)."""
        try:
            messages = template_messages(req.system, req.messages)
            tools = template_tools(req.tools, req.tool_choice)
            forced = _forced_tools(tools, req.tool_choice)
        except RequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        think = req.thinking
        switch = thinking(engine, None if think is None else think.type != "disabled",
                          think.budget_tokens if think is not None and think.type == "enabled" else None)
        prompt = await server.chat.render_prompt(engine.engine.tokenizer, messages, tools, switch.template_kwargs)
        return prompt, tools, forced, switch

    @routes.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest) -> dict[str, Any]:
        engine = server.ready_engine()
        server.check_model(req.model)
        prompt, *_ = await prompt_for(req, engine)
        return {"input_tokens": len(prompt.token_ids)}

    @routes.post("/v1/messages")
    async def messages(req: MessagesRequest, request: Request) -> Any:
        engine = server.ready_engine()
        lora = server.check_model(req.model)
        prompt, tools, forced, switch = await prompt_for(req, engine)
        max_tokens = fit_max_tokens(engine.engine.max_model_len, len(prompt.token_ids), req.max_tokens)
        options = SamplingOptions(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p or None,
                                  top_k=req.top_k or None, stop=req.stop_sequences,
                                  json_schema=tool_call_schema(forced) if forced else None,
                                  max_thinking_tokens=switch.budget)
        jobs = prepare(engine, [prompt.token_ids], options, lora)
        server.check_capacity(engine, len(jobs))
        fmt = ReplyFormat(prompt.opens_thinking, tools is not None, forced is not None,
                          frozenset(t["function"]["name"] for t in tools or []))
        answer = Answer(server, engine, request, jobs[0], fmt, lora, switch.shown, req.stop_sequences or [],
                        lora.lora_name if lora is not None else (req.model or server.config.model_name),
                        omit_thinking=req.thinking is not None and req.thinking.display == "omitted")
        if req.stream:
            return StreamingResponse(answer.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await answer.whole()

    return routes


class Answer:
    """One /v1/messages request's generation, answered whole or as Anthropic's event stream."""

    def __init__(self, server: Server, engine: AsyncLLMEngine, request: Request, job: Job, fmt: ReplyFormat,
                 lora: LoRARequest | None, show_thinking: bool, stops: list[str], model: str,
                 omit_thinking: bool = False):
        self.server, self.engine, self.request, self.job, self.fmt, self.lora = server, engine, request, job, fmt, lora
        self.show_thinking, self.stops, self.model = show_thinking, stops, model
        self.omit_thinking = omit_thinking  # thinking blocks go out without their text
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
                usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def parts(self, reply: Any) -> list[tuple[str, Any]]:
        return [p for p in reply_parts(reply) if self.show_thinking or p[0] != "reasoning"]

    async def whole(self) -> dict[str, Any]:
        finals = await self.server.chat.collect(self.engine, [self.job], self.request.is_disconnected, self.lora)
        out = finals[0]
        reply = self.fmt.split(out.text)
        content: list[dict[str, Any]] = []
        for kind, value in self.parts(reply):
            if kind == "reasoning":
                content.append({"type": "thinking", "thinking": "" if self.omit_thinking else value, "signature": ""})
            elif kind == "text":
                content.append({"type": "text", "text": value})
            else:
                content.append(_tool_use(value))
        if not content:
            content.append({"type": "text", "text": ""})
        prompt_tokens = len(self.job[0])
        self.server.metrics.prompt_tokens.inc(prompt_tokens)
        return self.message(content, _stop_reason(out, bool(reply.tool_calls), self.stops),
                            _usage(prompt_tokens, len(out.token_ids)))

    async def stream(self) -> AsyncIterator[str]:
        prompt_tokens = len(self.job[0])
        yield _event("message_start", {"message": self.message([], (None, None), _usage(prompt_tokens, 0))})
        index, open_kind = -1, None  # the block being written ("reasoning" or "text"), if any
        called = False

        def close() -> str:
            nonlocal open_kind
            if open_kind is None:
                return ""
            stop = _event("content_block_delta", {"index": index, "delta": {"type": "signature_delta",
                                                                            "signature": ""}}) \
                if open_kind == "reasoning" else ""
            open_kind = None
            return stop + _event("content_block_stop", {"index": index})

        try:
            replies = self.fmt.stream()
            async for _, out in self.server.chat.run(self.engine, [self.job], self.request.is_disconnected, self.lora):
                completion = out.outputs[0]
                for kind, value in self.parts(replies.feed(completion.delta_text, out.finished)):
                    if kind == "tool_call":
                        yield close()
                        called, index = True, index + 1
                        block = _tool_use(value)
                        yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                        yield _event("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                        yield _event("content_block_stop", {"index": index})
                        continue
                    if kind != open_kind:
                        yield close()
                        index, open_kind = index + 1, kind
                        start = {"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning" else {
                            "type": "text", "text": ""}
                        yield _event("content_block_start", {"index": index, "content_block": start})
                    if kind == "reasoning" and self.omit_thinking:
                        continue
                    delta = {"type": "thinking_delta", "thinking": value} if kind == "reasoning" else {
                        "type": "text_delta", "text": value}
                    yield _event("content_block_delta", {"index": index, "delta": delta})
                if out.finished:
                    yield close()
                    if index < 0:  # an empty answer is one empty text block
                        yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                        yield _event("content_block_stop", {"index": 0})
                    reason, sequence = _stop_reason(completion, called, self.stops)
                    yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                                   "usage": {"output_tokens": len(completion.token_ids)}})
                    yield _event("message_stop", {})
        except Exception as exc:  # never leave a stream hanging: tell the client, then end it
            yield _stream_error(exc)
        self.server.metrics.prompt_tokens.inc(prompt_tokens)


def _stream_error(exc: Exception) -> str:
    """An error after the stream's 200 went out: Anthropic's `error` event."""
    if isinstance(exc, GenerationTimeout):
        err = api_error(exc)
        body = anthropic_error_body(err.status, err.message)
    else:
        log.exception("stream failed")
        body = anthropic_error_body(500, f"generation failed: {exc}")
    return f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
