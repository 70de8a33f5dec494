"""The OpenAI Responses API, stateless: POST /v1/responses over the chat layer (chat.py), for the
`openai` SDK's client.responses, the OpenAI Agents SDK's default model and Codex CLI.

Nothing is stored: every request carries its whole conversation in `input` (text, or message,
function_call, function_call_output and reasoning items), `store` is answered as false, and
`previous_response_id` / `conversation` are refused with a 400 that says so. Answers are output
items (`reasoning` from <think>, `message`, `function_call`), streamed as the typed events of the
API (response.created, response.output_item.added, response.output_text.delta, ...,
response.completed). Errors have OpenAI's shape.
"""

from __future__ import annotations

import json
import logging
import time
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
    Reply,
    ReplyFormat,
    SamplingOptions,
    Thinking,
    fit_max_tokens,
    prepare,
    reply_parts,
    thinking,
    tool_call_schema,
    without_reasoning,
)
from .errors import APIError, api_error

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger(__name__)

# reasoning.effort -> the most tokens a thinking model may think (None: no limit); "none" and
# "minimal" turn thinking off.
EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": None, "xhigh": None}


# ---- request bodies -----------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class FunctionTool(_Body):
    type: str
    name: str | None = Field(default=None, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class ReasoningConfig(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)        # vLLM's extension
    seed: int | None = None                                # vLLM's extension
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


# ---- requests -> chat-layer messages ------------------------------------------------------------

def _bad(message: str, param: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def _content_text(content: Any, where: str) -> str:
    """A message item's content (a string or a list of text parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise _bad(f"{kind} parts are not supported; this model takes text only", at)
        if kind not in ("input_text", "output_text", "text", "refusal") or not isinstance(
                part.get("text", part.get("refusal")), str):
            raise _bad("expected a text part (input_text or output_text) with text", at)
        texts.append(part.get("text", part.get("refusal")))
    return "".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{item.get('type')} items need {key} (a non-empty string)", f"{where}.{key}")
    return value


def template_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """instructions and input -> what chat templates expect (OpenAI chat-style dicts). Consecutive
    function_call items join the assistant turn before them; their outputs become tool messages.
    Every system or developer message joins the instructions in one system message, first: chat
    templates take one (Qwen's writes later ones as turns of their own, which small models echo),
    and Codex sends several."""
    systems = [instructions] if instructions else []
    out: list[dict[str, Any]] = []
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not items:
        raise _bad("give at least one input item", "input")
    names: dict[str, str] = {}  # call_id -> function name
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad("role must be user, assistant, system or developer", f"{where}.role")
            content = _content_text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                systems.append(content)
                continue
            if role == "assistant":
                content = without_reasoning(content)
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            call_id, name = _string(item, "call_id", where), _string(item, "name", where)
            arguments = item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise _bad("arguments must be a JSON string", f"{where}.arguments")
            try:
                parsed: Any = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                parsed = arguments
            names[call_id] = name
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            output = item.get("output", "")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
            message = {"role": "tool", "content": text, "tool_call_id": call_id}
            if call_id in names:
                message["name"] = names[call_id]
            out.append(message)
        elif kind == "reasoning":
            continue  # earlier reasoning does not go back to the template
        elif kind == "item_reference":
            raise _bad("item_reference needs stored responses; this server stores none: send the items themselves",
                       where)
        else:
            raise _bad(f"input items of type {kind!r} are not supported (message, function_call, "
                       "function_call_output and reasoning are)", f"{where}.type")
    system = "\n\n".join(t for t in systems if t)
    return [{"role": "system", "content": system}, *out] if system else out


def template_tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The function tools as chat templates take them. Hosted tools (web_search, file_search, mcp,
    ...), namespaces and custom tools are left out: this server cannot run them and the model
    cannot call them (Codex sends several, with function tools beside them)."""
    if not req.tools or req.tool_choice == "none":
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.type != "function":
            continue
        if not tool.name:
            raise _bad("a function tool needs a name", f"tools.{i}.name")
        tools.append({"type": "function", "function": {"name": tool.name, "description": tool.description or "",
                                                       "parameters": tool.parameters or {"type": "object"}}})
    return tools or None


def _forced_tools(tools: list[dict[str, Any]] | None, choice: Any) -> list[dict[str, Any]] | None:
    if tools is None or choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return tools
    chosen = [t for t in tools if t["function"]["name"] == choice.name]
    if not chosen:
        raise _bad(f"names {choice.name!r}, which is not among the tools", "tool_choice")
    return chosen


def _text_schema(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.schema_ is None:
        raise _bad("a json_schema format needs a schema", "text.format.schema")
    return fmt.schema_


def _thinking(engine: AsyncLLMEngine, reasoning: ReasoningConfig | None) -> Thinking:
    effort = reasoning.effort if reasoning is not None else None
    if effort is None:
        return thinking(engine, None)
    if effort in ("none", "minimal"):
        return thinking(engine, False)
    return thinking(engine, True, EFFORT_BUDGETS[effort])


# ---- responses ----------------------------------------------------------------------------------

def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status !=
            "in_progress" else []}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []}


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if status != "in_progress" else "", "status": status}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def router(server: Server) -> APIRouter:
    routes = APIRouter(tags=["responses"])

    @routes.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request) -> Any:
        engine = server.ready_engine()
        lora = server.check_model(req.model)
        if req.previous_response_id is not None:
            raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                                "whole conversation in input", param="previous_response_id")
        if req.conversation is not None:
            raise APIError(400, "conversation is not supported: this server stores no conversations; send the whole "
                                "conversation in input", param="conversation")
        if req.background:
            raise APIError(400, "background responses are not supported", param="background")
        messages = template_messages(req.instructions, req.input)
        tools = template_tools(req)
        forced = _forced_tools(tools, req.tool_choice)
        schema = tool_call_schema(forced) if forced else _text_schema(req.text)
        switch = _thinking(engine, req.reasoning)
        prompt = await server.chat.render_prompt(engine.engine.tokenizer, messages, tools, switch.template_kwargs)
        max_tokens = fit_max_tokens(engine.engine.max_model_len, len(prompt.token_ids), req.max_output_tokens)
        options = SamplingOptions(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, json_schema=schema,
                                  max_thinking_tokens=switch.budget)
        jobs = prepare(engine, [prompt.token_ids], options, lora)
        server.check_capacity(engine, len(jobs))
        fmt = ReplyFormat(prompt.opens_thinking, tools is not None, forced is not None,
                          frozenset(t["function"]["name"] for t in tools or []))
        answer = Answer(server, engine, request, jobs[0], fmt, lora, switch.shown, req,
                        lora.lora_name if lora is not None else server.config.model_name)
        if req.stream:
            return StreamingResponse(answer.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await answer.whole()

    return routes


class Answer:
    """One /v1/responses request's generation, answered whole or as the API's event stream."""

    def __init__(self, server: Server, engine: AsyncLLMEngine, request: Request, job: Job, fmt: ReplyFormat,
                 lora: LoRARequest | None, show_thinking: bool, req: ResponsesRequest, model: str):
        self.server, self.engine, self.request, self.job, self.fmt, self.lora = server, engine, request, job, fmt, lora
        self.show_thinking, self.req, self.model = show_thinking, req, model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], out: CompletionOutput | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else {
            "type": "text"}
        usage = None
        if out is not None:
            prompt_tokens, output_tokens = len(self.job[0]), len(out.token_ids)
            usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt_tokens + output_tokens}
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice or "auto"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                                                        "summary": None},
            "store": False, "temperature": req.temperature, "text": {"format": fmt}, "tool_choice": choice,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "top_p": req.top_p,
            "truncation": "disabled", "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }

    def parts(self, reply: Reply) -> list[tuple[str, Any]]:
        return [p for p in reply_parts(reply) if self.show_thinking or p[0] != "reasoning"]

    def finished(self, out: CompletionOutput, output: list[dict[str, Any]], called: bool) -> dict[str, Any]:
        self.server.metrics.prompt_tokens.inc(len(self.job[0]))
        status = "incomplete" if out.finish_reason == "length" and not called else "completed"
        return self.response(status, output, out)

    async def whole(self) -> dict[str, Any]:
        finals = await self.server.chat.collect(self.engine, [self.job], self.request.is_disconnected, self.lora)
        out = finals[0]
        reply = self.fmt.split(out.text)
        output = []
        for kind, value in self.parts(reply):
            if kind == "reasoning":
                output.append(_reasoning_item(_item_id("rs"), value, "completed"))
            elif kind == "text":
                output.append(_message_item(_item_id("msg"), value, "completed"))
            else:
                output.append(_call_item(_item_id("fc"), value, "completed"))
        return self.finished(out, output, bool(reply.tool_calls))

    async def stream(self) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            seq += 1
            return _sse({"type": kind, "sequence_number": seq - 1, **fields})

        output: list[dict[str, Any]] = []   # the items finished so far
        open_kind: str | None = None        # "reasoning" or "text": the item being written
        open_id, open_text = "", ""
        called = False

        def close() -> str:
            nonlocal open_kind
            if open_kind is None:
                return ""
            index = len(output)
            if open_kind == "reasoning":
                item = _reasoning_item(open_id, open_text, "completed")
                part = item["content"][0]
                done = event("response.reasoning_text.done", item_id=open_id, output_index=index, content_index=0,
                             text=open_text)
            else:
                item = _message_item(open_id, open_text, "completed")
                part = item["content"][0]
                done = event("response.output_text.done", item_id=open_id, output_index=index, content_index=0,
                             text=open_text, logprobs=[])
            output.append(item)
            open_kind = None
            return (done + event("response.content_part.done", item_id=open_id, output_index=index,
                                 content_index=0, part=part)
                    + event("response.output_item.done", output_index=index, item=item))

        yield event("response.created", response=self.response("in_progress", []))
        yield event("response.in_progress", response=self.response("in_progress", []))
        try:
            replies = self.fmt.stream()
            async for _, out in self.server.chat.run(self.engine, [self.job], self.request.is_disconnected, self.lora):
                completion = out.outputs[0]
                for kind, value in self.parts(replies.feed(completion.delta_text, out.finished)):
                    if kind == "tool_call":
                        yield close()
                        called, index, item_id = True, len(output), _item_id("fc")
                        yield event("response.output_item.added", output_index=index,
                                    item=_call_item(item_id, value, "in_progress"))
                        arguments = value["function"]["arguments"]
                        yield event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                    delta=arguments)
                        yield event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                    name=value["function"]["name"], arguments=arguments)
                        item = _call_item(item_id, value, "completed")
                        output.append(item)
                        yield event("response.output_item.done", output_index=index, item=item)
                        continue
                    index = len(output)
                    if kind != open_kind:
                        yield close()
                        index = len(output)
                        open_kind, open_text = kind, ""
                        if kind == "reasoning":
                            open_id = _item_id("rs")
                            yield event("response.output_item.added", output_index=index,
                                        item=_reasoning_item(open_id, "", "in_progress"))
                            yield event("response.content_part.added", item_id=open_id, output_index=index,
                                        content_index=0, part={"type": "reasoning_text", "text": ""})
                        else:
                            open_id = _item_id("msg")
                            yield event("response.output_item.added", output_index=index,
                                        item=_message_item(open_id, "", "in_progress"))
                            yield event("response.content_part.added", item_id=open_id, output_index=index,
                                        content_index=0,
                                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                    open_text += value
                    if kind == "reasoning":
                        yield event("response.reasoning_text.delta", item_id=open_id, output_index=index,
                                    content_index=0, delta=value)
                    else:
                        yield event("response.output_text.delta", item_id=open_id, output_index=index,
                                    content_index=0, delta=value, logprobs=[])
                if out.finished:
                    yield close()
                    final = self.finished(completion, output, called)
                    yield event(f"response.{final['status']}", response=final)
        except Exception as exc:  # never leave a stream hanging: tell the client, then end it
            err = api_error(exc) if isinstance(exc, GenerationTimeout) else None
            if err is None:
                log.exception("stream failed")
            message = err.message if err is not None else f"generation failed: {exc}"
            code = err.code if err is not None else "server_error"
            yield event("response.failed", response=self.response("failed", output, error={"code": code,
                                                                                             "message": message}))
