"""The Ollama API on the same port, engine and key as the OpenAI one: /api/chat, /api/generate,
/api/embed (and the older /api/embeddings), /api/tags, /api/show, /api/ps, /api/pull and
/api/version, over the chat layer (chat.py) with Ollama's shapes: NDJSON streams (one JSON object a
line) by default, `stream: false` for one object, durations in nanoseconds, and errors as
`{"error": "..."}` (app.py answers every /api/ error so, auth and validation included).

Models are named as Ollama names them, `name:tag`: the served model answers to its name with or
without `:latest`, a LoRA adapter to its own. docs/OLLAMA.md says what differs from Ollama.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__ as sugam_version
from .. import registry
from ..engine.async_engine import AsyncLLMEngine
from ..engine.sequence import CompletionOutput
from ..errors import SugamError
from ..lora.adapter import LoRARequest
from ..tokenizer import Tokenizer
from .chat import (
    ClientGone,
    GenerationTimeout,
    Job,
    Prompt,
    Reply,
    ReplyFormat,
    SamplingOptions,
    model_thinks,
    prepare,
    without_reasoning,
)
from .errors import APIError, api_error
from .protocol import Tool

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .app import Server

log = logging.getLogger(__name__)

# The Ollama release whose API this module follows (clients check it for features such as `think`).
OLLAMA_VERSION = "0.12.0"
# `think: "low" | "medium" | "high"` -> the most tokens the model may think (None: no limit).
THINK_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": None}
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
NDJSON = "application/x-ndjson"
# /api/ps: the model stays loaded until the server stops; Ollama shows that as a far expiry.
NEVER_EXPIRES = "2318-01-01T00:00:00Z"


# ---- request bodies (Ollama's fields; others are ignored, as Ollama does) -----------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Options(_Body):
    """The `options` sugam applies; Ollama's others (num_gpu, num_thread, mirostat, ...) are accepted
    and ignored."""
    num_predict: int | None = None        # -1: no limit, -2: fill the context
    num_ctx: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=-1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, le=2**63 - 1)  # negative: random, as in Ollama
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)


class ToolCallFunction(_Body):
    name: str
    arguments: dict[str, Any] | str | None = None


class ToolCall(_Body):
    function: ToolCallFunction


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


Think = bool | Literal["low", "medium", "high"] | None


class _GenerationBody(_Body):
    model: str | None = None
    stream: bool | None = None            # None: stream, as Ollama does
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    think: Think = None
    keep_alive: str | float | None = None  # accepted; the model stays loaded


class ChatRequest(_GenerationBody):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None


class GenerateRequest(_GenerationBody):
    prompt: str | None = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[Any] | None = None


class EmbedRequest(_Body):
    model: str | None = None
    input: str | list[str] = Field(default_factory=list)
    truncate: bool | None = None          # None: truncate, as Ollama does
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: str | float | None = None


class EmbeddingsRequest(_Body):
    model: str | None = None
    prompt: str | None = ""
    options: Options | None = None
    keep_alive: str | float | None = None


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = None               # Ollama's older field
    verbose: bool | None = None


class PullRequest(_Body):
    model: str | None = None
    name: str | None = None
    stream: bool | None = None
    insecure: bool | None = None


def read_body_as_json(scope: MutableMapping[str, Any]) -> None:
    """Ollama reads every request body as JSON whatever its Content-Type (`curl -d` sends a form
    type): so do the /api/ routes."""
    headers = scope.get("headers", [])
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            if kind == b"application/json" or kind.endswith(b"+json"):
                return
    scope["headers"] = [(n, v) for n, v in headers if n != b"content-type"] + [(b"content-type", b"application/json")]


# ---- the models this server has, as Ollama describes them ---------------------------------------

def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def rfc3339(ns: int | None = None, digits: int = 9) -> str:
    """UTC time in RFC 3339 with fractional seconds (nanoseconds, as Ollama writes created_at)."""
    ns = time.time_ns() if ns is None else ns
    seconds, frac = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}"[:digits + 1] + "Z"


def human_number(n: int) -> str:
    """Ollama's parameter_size: 494032768 -> "494.03M", 7615616512 -> "7.6B"."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == math.floor(value) else f"{value:.{decimals}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def ollama_family(cfg: ModelConfig) -> str:
    """Ollama names a family by its GGUF architecture: qwen3_moe -> qwen3moe."""
    return cfg.architecture.replace("_moe", "moe")


def parameter_count(cfg: ModelConfig) -> int:
    """Weights of the transformer described by `cfg` (embeddings, layers, head; biases and norms)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * h * q + 2 * h * kv + (q + 2 * kv if cfg.qkv_bias else 0) + (h if cfg.o_bias else 0)
    attention += 2 * cfg.head_dim if cfg.qk_norm else 0
    mlp = 3 * h * inter + (2 * inter + h if cfg.mlp_bias else 0)
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    dense_layers = sum(not cfg.sparse_layer(i) for i in range(cfg.num_hidden_layers))
    experts, _ = cfg.expert_params()  # every expert counts (Ollama's 30.5B for Qwen3-30B-A3B)
    return embeddings + cfg.num_hidden_layers * (attention + 2 * h) + dense_layers * mlp + experts + h


_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


@dataclass(frozen=True)
class FileFacts:
    size: int
    digest: str           # "sha256:..."
    modified_at: str
    format: str           # "gguf" or "safetensors"
    quantization: str     # e.g. "Q5_0", "Q4_K_M", "BF16"


def file_facts(path: Path, torch_dtype: str | None = None) -> FileFacts:
    """Size, digest, date, format and quantization of a weights file or folder. The digest is the
    registry's sha256 of the file for a registry model (checked at pull), else the sha256 of its
    path, size and modification time (hashing gigabytes per listing would be slow)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    weights = [p for p in files if p.suffix in _WEIGHT_SUFFIXES] or files
    size = sum(p.stat().st_size for p in weights)
    mtime = max((p.stat().st_mtime_ns for p in weights), default=0)
    source = next((m for m in registry.MODELS.values() if path.is_file() and path.name == m.filename
                   and size == m.size), None)
    digest = source.sha256 if source else hashlib.sha256(f"{path.resolve()}\n{size}\n{mtime}".encode()).hexdigest()
    gguf = path.is_file() and path.suffix == ".gguf"
    return FileFacts(size, f"sha256:{digest}", rfc3339(mtime, digits=6), "gguf" if gguf else "safetensors",
                     _gguf_quantization(path) if gguf else _dense_quantization(path, torch_dtype))


def _gguf_quantization(path: Path) -> str:
    """llama.cpp's name of the file type (general.file_type), else the commonest matrix type."""
    import gguf as gguf_lib

    from ..loader.gguf import GGUFFile

    try:
        meta = GGUFFile(path)
    except Exception:  # noqa: BLE001 - a description, never a reason to fail a listing
        return "unknown"
    file_type = meta.metadata.get("general.file_type")
    try:
        if isinstance(file_type, int):
            name = gguf_lib.LlamaFileType(file_type).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        pass
    types = Counter(t.qtype.name for t in meta.tensors.values() if len(t.shape) == 2)
    return types.most_common(1)[0][0] if types else "unknown"


def _dense_quantization(path: Path, torch_dtype: str | None) -> str:
    """A safetensors checkpoint: sugam's quantization marker (`sugam quantize`), else the dtype."""
    from ..loader.hf import _quantization_marker

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    try:
        marker = _quantization_marker(files[0]) if files else None
    except Exception:  # noqa: BLE001 - a description, never a reason to fail a listing
        marker = None
    if marker:
        return str(marker).upper()
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(torch_dtype or "", (torch_dtype or "unknown").upper())


def capabilities(engine: AsyncLLMEngine) -> list[str]:
    """What the model can do, as Ollama's /api/show lists it."""
    e = engine.engine
    template = e.tokenizer.chat_template or ""
    caps = ["completion"]
    if "tools" in template:
        caps.append("tools")
    if model_thinks(engine):
        caps.append("thinking")
    if fim_token_ids(e.tokenizer) is not None:
        caps.append("insert")
    return caps


def fim_token_ids(tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    ids = tuple(tokenizer.token_to_id(t) for t in FIM_TOKENS)
    return ids if None not in ids else None  # type: ignore[return-value]


class Catalog:
    """The base model and the LoRA adapters in Ollama's terms (file facts computed once per path)."""

    def __init__(self, server: Server):
        self.server = server
        self._facts: dict[str, FileFacts] = {}

    async def facts(self, path: str | None, torch_dtype: str | None) -> FileFacts:
        unknown = FileFacts(0, "sha256:" + "0" * 64, rfc3339(0, 6), "unknown", "unknown")
        if not path:
            return unknown
        if path not in self._facts:
            try:
                self._facts[path] = await asyncio.to_thread(file_facts, Path(path), torch_dtype)
            except OSError:  # moved or unreadable since it was loaded: described as unknown, not cached
                log.warning("cannot read %s to describe it", path, exc_info=True)
                return unknown
        return self._facts[path]

    def resolve(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names, None for the base model; 404 for others."""
        if not name:
            raise APIError(400, "model is required")
        engine = self.server.ready_engine().engine
        for candidate in dict.fromkeys((name, name.removesuffix(":latest"))):
            if candidate == self.server.config.model_name:
                return None
            loaded = engine.loras.get(candidate) if engine.loras is not None else None
            if loaded is not None:
                return loaded.request
        raise APIError(404, f"model '{name}' not found")

    def name(self, lora: LoRARequest | None) -> str:
        return tagged(lora.lora_name if lora is not None else self.server.config.model_name)

    async def details(self, engine: AsyncLLMEngine, lora: LoRARequest | None) -> dict[str, Any]:
        cfg = engine.engine.model_config
        base = await self.facts(self.server.config.model_path, cfg.torch_dtype)
        own = await self.facts(lora.lora_path, cfg.torch_dtype) if lora is not None else base
        return {"parent_model": tagged(self.server.config.model_name) if lora is not None else "",
                "format": own.format, "family": ollama_family(cfg), "families": [ollama_family(cfg)],
                "parameter_size": human_number(parameter_count(cfg)), "quantization_level": base.quantization}

    async def entries(self, engine: AsyncLLMEngine) -> list[tuple[LoRARequest | None, FileFacts]]:
        cfg = engine.engine.model_config
        out: list[tuple[LoRARequest | None, FileFacts]] = [
            (None, await self.facts(self.server.config.model_path, cfg.torch_dtype))]
        for lora in sorted(engine.engine.list_loras(), key=lambda r: r.lora_int_id):
            out.append((lora, await self.facts(lora.lora_path, cfg.torch_dtype)))
        return out

    def model_info(self, engine: AsyncLLMEngine) -> dict[str, Any]:
        e = engine.engine
        cfg, arch = e.model_config, ollama_family(e.model_config)
        experts = {f"{arch}.expert_count": cfg.num_experts, f"{arch}.expert_used_count": cfg.num_experts_per_tok,
                   f"{arch}.expert_feed_forward_length": cfg.moe_intermediate_size} if cfg.is_moe else {}
        return {**experts,
            "general.architecture": arch, "general.parameter_count": parameter_count(cfg),
            f"{arch}.context_length": e.max_model_len,  # what this server accepts (--max-model-len, KV pool)
            f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.feed_forward_length": cfg.intermediate_size,
            f"{arch}.attention.head_count": cfg.num_attention_heads,
            f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
            f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.attention.value_length": cfg.head_dim,
            f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, f"{arch}.rope.freq_base": cfg.rope_theta,
            f"{arch}.vocab_size": cfg.vocab_size, "sugam.trained_context_length": cfg.context_length,
        }

    def parameters(self, engine: AsyncLLMEngine) -> str:
        """The generation defaults in Ollama's text form (`name<spaces>value` a line)."""
        e = engine.engine
        rows: list[tuple[str, str]] = []
        for token_id in e.eos_token_ids:
            token = e.tokenizer.id_to_token(token_id)
            if token:
                rows.append(("stop", json.dumps(token)))
        d = e.generation_defaults
        for key, name in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                          ("min_p", "min_p"), ("repetition_penalty", "repeat_penalty")):
            value = getattr(d, key, None)
            if value is not None:
                rows.append((name, f"{value:g}"))
        rows.append(("num_ctx", str(e.max_model_len)))
        return "\n".join(f"{k:<30} {v}" for k, v in rows)


# ---- requests -> prompts and options ----------------------------------------------------------

def _no_images(images: list[Any] | None, where: str) -> None:
    if images:
        raise APIError(400, f"{where}: this model takes text only; images are not supported")


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama messages -> what chat templates expect: tool-call arguments as objects, tool results
    named, earlier assistant turns without their thinking (as Qwen's templates want)."""
    out = []
    for i, m in enumerate(messages):
        _no_images(m.images, f"messages.{i}.images")
        content = m.content or ""
        if m.role == "assistant" and content:
            content = without_reasoning(content)
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.tool_name:
            message["name"] = m.tool_name
        if m.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in m.tool_calls]
        out.append(message)
    return out


def _arguments(arguments: dict[str, Any] | str | None) -> dict[str, Any]:
    """Tool-call arguments as an object (a model may write them as a JSON string, even twice)."""
    for _ in range(2):
        if not isinstance(arguments, str):
            break
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {"value": arguments}
    return arguments if isinstance(arguments, dict) else {} if arguments is None else {"value": arguments}


def _format_schema(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "object"}
    if isinstance(fmt, dict):
        return fmt
    raise APIError(400, f'invalid format {fmt!r}: give "json" or a JSON schema')


@dataclass
class Thinking:
    template_kwargs: dict[str, Any] | None
    budget: int | None
    shown: bool           # whether reasoning goes out in `thinking` (not for think: false)


def _thinking(think: Think, engine: AsyncLLMEngine, model: str) -> Thinking:
    if think is None:
        return Thinking(None, None, True)
    thinks = "thinking" in capabilities(engine)
    if think is False:
        # Off through the template where it knows how; a model that thinks anyway is stopped at once
        # (a budget of 0 makes the engine close </think>), and what it thought is not shown.
        return Thinking({"enable_thinking": False}, 0 if engine.engine.think_token_ids else None, False)
    if not thinks:
        raise APIError(400, f'"{model}" does not support thinking')
    return Thinking({"enable_thinking": True}, THINK_BUDGETS[think] if isinstance(think, str) else None, True)


def _options(options: Options | None, schema: dict[str, Any] | None, thinking: Thinking) -> SamplingOptions:
    o = options or Options()
    num_predict = o.num_predict
    if num_predict is not None and num_predict < -2:
        raise APIError(400, f"options.num_predict must be -1 (no limit), -2 (fill the context) or >= 0, "
                            f"not {num_predict}")
    return SamplingOptions(
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
        repetition_penalty=o.repeat_penalty, presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty, seed=o.seed if o.seed is not None and o.seed >= 0 else None,
        stop=o.stop, json_schema=schema, max_thinking_tokens=thinking.budget)


def _fit_context(engine: AsyncLLMEngine, options: Options | None, prompt_len: int, sampling: SamplingOptions) -> None:
    """num_ctx above the server's context is capped to it (as Ollama caps it to the model's); below,
    it bounds prompt + output. The output stops where the context ends (done_reason "length")."""
    context = engine.engine.max_model_len
    num_ctx = options.num_ctx if options else None
    if num_ctx is not None:
        if num_ctx < 1:
            raise APIError(400, f"options.num_ctx must be positive, not {num_ctx}")
        context = min(context, num_ctx)
    if prompt_len >= context:
        where = "num_ctx" if context < engine.engine.max_model_len else "the server's context"
        raise APIError(400, f"the prompt has {prompt_len} tokens but {where} holds {context}; shorten it")
    room = context - prompt_len
    if sampling.max_tokens is not None or context < engine.engine.max_model_len:
        sampling.max_tokens = min(sampling.max_tokens or room, room)


# ---- responses ----------------------------------------------------------------------------------

class Clock:
    """Ollama's durations (nanoseconds): load = arrival to the job's start (template, tokens,
    checks), prompt_eval = start to the first token, eval = first token to the last."""

    def __init__(self) -> None:
        self.arrived = time.monotonic_ns()
        self.started = self.first = self.last = 0

    def start(self) -> None:
        self.started = time.monotonic_ns()

    def saw(self, tokens: int) -> None:
        now = time.monotonic_ns()
        if tokens and not self.first:
            self.first = now
        self.last = now

    def durations(self, prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        end = time.monotonic_ns()
        started = self.started or self.arrived
        first = self.first or self.last or end
        return {"total_duration": end - self.arrived, "load_duration": started - self.arrived,
                "prompt_eval_count": prompt_tokens, "prompt_eval_duration": first - started,
                "eval_count": eval_tokens, "eval_duration": (self.last or first) - first}


def ollama_tool_calls(calls: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """Calls in the chat layer's shape (arguments a JSON string) -> Ollama's (arguments an object)."""
    return [{"id": call["id"], "function": {"index": start + i, "name": call["function"]["name"],
                                            "arguments": _arguments(call["function"]["arguments"])}}
            for i, call in enumerate(calls)]


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def _stream_error(exc: Exception) -> str:
    """An error after the stream's 200 went out: one error line, then the stream ends."""
    if isinstance(exc, GenerationTimeout):
        return _line({"error": api_error(exc).message})
    log.exception("stream failed")
    return _line({"error": f"generation failed: {exc}"})


@dataclass
class Generation:
    """One request's job and how to answer it, for /api/chat and /api/generate alike."""
    server: Server
    engine: AsyncLLMEngine
    request: Request
    job: Job
    fmt: ReplyFormat
    lora: LoRARequest | None
    model: str
    clock: Clock
    show_thinking: bool
    fields: Callable[[Reply, int], dict[str, Any]]        # a reply's fields (given the tool calls sent before)
    final: Callable[[CompletionOutput], dict[str, Any]]   # more fields of the done object

    def head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": rfc3339()}

    def tail(self, out: CompletionOutput) -> dict[str, Any]:
        prompt_tokens = len(self.job[0])
        self.server.metrics.prompt_tokens.inc(prompt_tokens)
        return {"done": True, "done_reason": out.finish_reason if out.finish_reason in ("stop", "length") else "stop",
                **self.clock.durations(prompt_tokens, len(out.token_ids)), **self.final(out)}

    def shown(self, reply: Reply) -> Reply:
        return reply if self.show_thinking else Reply(None, reply.content, reply.tool_calls)

    async def stream(self) -> AsyncIterator[str]:
        replies, calls = self.fmt.stream(), 0
        try:
            async for _, out in self.server.chat.run(self.engine, [self.job], self.request.is_disconnected, self.lora):
                completion = out.outputs[0]
                self.clock.saw(len(completion.token_ids))
                piece = self.shown(replies.feed(completion.delta_text, out.finished))
                if piece.content or piece.reasoning or piece.tool_calls:
                    yield _line({**self.head(), **self.fields(piece, calls), "done": False})
                calls += len(piece.tool_calls)
                if out.finished:
                    yield _line({**self.head(), **self.fields(Reply(None, ""), calls), **self.tail(completion)})
        except Exception as exc:  # never leave a stream hanging: tell the client, then end it
            yield _stream_error(exc)

    async def answer(self) -> dict[str, Any]:
        final: CompletionOutput | None = None
        async for _, out in self.server.chat.run(self.engine, [self.job], self.request.is_disconnected, self.lora):
            self.clock.saw(len(out.outputs[0].token_ids))
            if out.finished:
                final = out.outputs[0]
        if final is None:
            raise ClientGone("client disconnected")
        return {**self.head(), **self.fields(self.shown(self.fmt.split(final.text)), 0), **self.tail(final)}

    async def respond(self, stream: bool | None) -> Any:
        if stream is False:
            return await self.answer()
        return StreamingResponse(self.stream(), media_type=NDJSON, headers={"Cache-Control": "no-cache"})


def _chat_fields(reply: Reply, calls_before: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["thinking"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = ollama_tool_calls(reply.tool_calls, calls_before)
    return {"message": message}


def _generate_fields(reply: Reply, calls_before: int) -> dict[str, Any]:
    fields: dict[str, Any] = {"response": reply.content}
    if reply.reasoning:
        fields["thinking"] = reply.reasoning
    return fields


# ---- routes -------------------------------------------------------------------------------------

def router(server: Server) -> APIRouter:
    routes = APIRouter(tags=["ollama"])
    catalog = Catalog(server)

    def loaded(model: str, done_reason: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Ollama's answer to a request with nothing to generate: the model is (already) loaded."""
        return {"model": model, "created_at": rfc3339(), **fields, "done": True, "done_reason": done_reason}

    async def start(engine: AsyncLLMEngine, prompt_ids: list[int], options: Options | None, schema: dict | None,
                    thinking: Thinking, lora: LoRARequest | None) -> Job:
        sampling = _options(options, schema, thinking)
        _fit_context(engine, options, len(prompt_ids), sampling)
        jobs = prepare(engine, [prompt_ids], sampling, lora)
        server.check_capacity(engine, len(jobs))
        return jobs[0]

    @routes.get("/api/version")
    async def version() -> dict[str, Any]:
        return {"version": OLLAMA_VERSION, "sugam_version": sugam_version}

    @routes.get("/api/tags")
    async def tags() -> dict[str, Any]:
        engine = server.ready_engine()
        models = []
        for lora, facts in await catalog.entries(engine):
            name = catalog.name(lora)
            models.append({"name": name, "model": name, "modified_at": facts.modified_at, "size": facts.size,
                           "digest": facts.digest.removeprefix("sha256:"),
                           "details": await catalog.details(engine, lora)})
        return {"models": models}

    @routes.get("/api/ps")
    async def ps() -> dict[str, Any]:
        engine = server.ready_engine()
        e = engine.engine
        kv_bytes = sum(t.numel() * t.element_size() for c in e.runner.kv_caches
                       for t in (c.keys, c.values, c.key_scales, c.value_scales) if t is not None)
        models = []
        for lora, facts in await catalog.entries(engine):
            size = e.runner.weight_bytes + kv_bytes if lora is None else facts.size
            name = catalog.name(lora)
            models.append({"name": name, "model": name, "size": size, "digest": facts.digest.removeprefix("sha256:"),
                           "details": await catalog.details(engine, lora), "expires_at": NEVER_EXPIRES,
                           "size_vram": size if e.device.type != "cpu" else 0, "context_length": e.max_model_len})
        return {"models": models}

    @routes.post("/api/show")
    async def show(req: ShowRequest) -> dict[str, Any]:
        engine = server.ready_engine()
        lora = catalog.resolve(req.model or req.name)
        e = engine.engine
        cfg = e.model_config
        facts = await catalog.facts(lora.lora_path if lora else server.config.model_path, cfg.torch_dtype)
        parameters = catalog.parameters(engine)
        template = e.tokenizer.chat_template or ""
        modelfile = "\n".join([
            f"# Modelfile of {catalog.name(lora)}, as sugam serves it", f"FROM {server.config.model_path or ''}",
            *([f"ADAPTER {lora.lora_path}"] if lora else []), f'TEMPLATE """{template}"""',
            *(f"PARAMETER {line}" for line in parameters.splitlines())])
        info = catalog.model_info(engine)
        if lora is not None:
            info["sugam.lora.path"] = lora.lora_path
        return {"license": "", "modelfile": modelfile, "parameters": parameters, "template": template,
                "details": await catalog.details(engine, lora), "model_info": info,
                "capabilities": capabilities(engine), "modified_at": facts.modified_at}

    @routes.post("/api/chat")
    async def chat(req: ChatRequest, request: Request) -> Any:
        clock = Clock()
        engine = server.ready_engine()
        lora = catalog.resolve(req.model)
        model = req.model or catalog.name(lora)  # echoed as sent, as Ollama does
        schema = _format_schema(req.format)
        thinking = _thinking(req.think, engine, model)
        messages = template_messages(req.messages)
        if not messages:
            return loaded(model, "load", {"message": {"role": "assistant", "content": ""}})
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt: Prompt = await server.chat.render_prompt(engine.engine.tokenizer, messages, tools,
                                                         thinking.template_kwargs)
        job = await start(engine, prompt.token_ids, req.options, schema, thinking, lora)
        clock.start()
        fmt = ReplyFormat(prompt.opens_thinking, tools is not None,
                          tool_names=frozenset(t["function"]["name"] for t in tools or []))
        return await Generation(server, engine, request, job, fmt, lora, model, clock, thinking.shown, _chat_fields,
                                lambda out: {}).respond(req.stream)

    @routes.post("/api/generate")
    async def generate(req: GenerateRequest, request: Request) -> Any:
        clock = Clock()
        engine = server.ready_engine()
        lora = catalog.resolve(req.model)
        model = req.model or catalog.name(lora)  # echoed as sent, as Ollama does
        _no_images(req.images, "images")
        if req.template:
            raise APIError(400, "template is not accepted: this server renders only the model's own chat template")
        schema = _format_schema(req.format)
        thinking = _thinking(req.think, engine, model)
        tokenizer = engine.engine.tokenizer
        text = req.prompt or ""
        if not text and not req.suffix:
            return loaded(model, "load", {"response": ""})
        opens_thinking = False
        if req.suffix:
            fim = fim_token_ids(tokenizer)
            if fim is None:
                raise APIError(400, f'"{req.model}" does not support insert (suffix): its vocabulary has no '
                                    "fill-in-the-middle tokens")
            prefix, suffix = await server.chat.off_loop(lambda: (tokenizer.encode(text, add_special_tokens=False),
                                                                 tokenizer.encode(req.suffix or "",
                                                                                  add_special_tokens=False)))
            ids = [fim[0], *prefix, fim[1], *suffix, fim[2]]
        elif req.raw or not tokenizer.chat_template:  # raw, or a model without a template: the prompt as it is
            ids = await server.chat.off_loop(lambda: tokenizer.encode(text))
        else:
            messages = [{"role": "system", "content": req.system}] if req.system else []
            prompt = await server.chat.render_prompt(tokenizer, [*messages, {"role": "user", "content": text}],
                                                     None, thinking.template_kwargs)
            ids, opens_thinking = prompt.token_ids, prompt.opens_thinking
        ids = [*(req.context or []), *ids]  # an earlier answer's context continues the conversation
        job = await start(engine, ids, req.options, schema, thinking, lora)
        clock.start()
        return await Generation(server, engine, request, job, ReplyFormat(opens_thinking), lora, model, clock,
                                thinking.shown, _generate_fields,
                                lambda out: {"context": [*job[0], *out.token_ids]}).respond(req.stream)

    async def embeddings_of(engine: AsyncLLMEngine, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        tokenizer = engine.engine.tokenizer
        limit = engine.engine.max_model_len
        encoded = await server.chat.off_loop(lambda: [tokenizer.encode(t) for t in texts])
        vectors, tokens = [], 0
        for i, ids in enumerate(encoded):
            if not ids:
                raise APIError(400, f"input {i} is empty")
            if len(ids) > limit:
                if not truncate:
                    raise APIError(400, f"input {i} has {len(ids)} tokens, more than the context of {limit} "
                                        "(send truncate: true to cut it)")
                ids = ids[:limit]
            tokens += len(ids)
            vectors.append(await engine.embed(ids))
        return vectors, tokens

    def base_only(lora: LoRARequest | None) -> None:
        if lora is not None:
            raise APIError(400, f"embeddings come from the base model only; use '{catalog.name(None)}'")

    @routes.post("/api/embed")
    async def embed(req: EmbedRequest) -> dict[str, Any]:
        clock = Clock()
        engine = server.ready_engine()
        lora = catalog.resolve(req.model)
        base_only(lora)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        hidden = engine.engine.model_config.hidden_size
        if req.dimensions is not None and not 1 <= req.dimensions <= hidden:
            raise APIError(400, f"dimensions must be in [1, {hidden}], not {req.dimensions}")
        vectors, tokens = await embeddings_of(engine, texts, req.truncate is not False)
        if req.dimensions is not None:  # cut and normalise again, as Ollama does
            vectors = [_normalise(v[:req.dimensions]) for v in vectors]
        d = clock.durations(tokens, 0)
        return {"model": req.model, "embeddings": vectors, "total_duration": d["total_duration"],
                "load_duration": 0, "prompt_eval_count": tokens}

    @routes.post("/api/embeddings")
    async def embeddings(req: EmbeddingsRequest) -> dict[str, Any]:
        engine = server.ready_engine()
        base_only(catalog.resolve(req.model))
        if not req.prompt:
            return {"embedding": []}
        vectors, _ = await embeddings_of(engine, [req.prompt], True)
        return {"embedding": vectors[0]}

    @routes.post("/api/pull")
    async def pull(req: PullRequest) -> Any:
        name = req.model or req.name
        if not name:
            raise APIError(400, "model is required")
        source = registry.lookup_alias(name.removesuffix(":latest"))
        if source is None:
            raise APIError(404, f"pull model manifest: model '{name}' is not in sugam's registry (it has "
                                f"{', '.join(registry.known_aliases())})")
        events = _pull_events(server, source)
        if req.stream is False:
            last: dict[str, Any] = {}
            async for event in events:
                if "error" in event:
                    raise APIError(502, event["error"])
                last = event
            return last
        return StreamingResponse((_line(e) async for e in events), media_type=NDJSON,
                                 headers={"Cache-Control": "no-cache"})

    return routes


def _normalise(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


async def _pull_events(server: Server, source: registry.ModelSource) -> AsyncIterator[dict[str, Any]]:
    """Ollama's pull progress for a registry model, fetched in a worker thread (a pull of a cached
    model only reports it complete). The served model does not change."""
    digest = f"sha256:{source.sha256}"
    layer = {"status": f"pulling {source.sha256[:12]}", "digest": digest, "total": source.size}
    yield {"status": "pulling manifest"}
    if registry.is_cached(source):
        yield {**layer, "completed": source.size}
    else:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()

        def report(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (stage, done))

        task = asyncio.ensure_future(asyncio.to_thread(registry.pull, source.alias, False, report))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        verifying = False
        while (item := await queue.get()) is not None:
            stage, done = item
            if stage == "download":
                yield {**layer, "completed": done}
            elif not verifying:
                verifying = True
                yield {**layer, "completed": source.size}
                yield {"status": "verifying sha256 digest"}
        try:
            await task
        except SugamError as exc:  # the download failed or did not verify: the client's answer
            yield {"error": str(exc)}
            return
        except Exception as exc:  # noqa: BLE001 - e.g. no disk space; still an answer, not a hung stream
            log.exception("pull failed")
            yield {"error": f"pull failed: {exc}"}
            return
        if not verifying:
            yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    served = server.config.model_name
    note = (f"{source.alias} is in sugam's cache; this server keeps serving {tagged(served)} "
            f"(run `sugam serve {source.alias}` to serve it)") if source.alias != served else (
        f"{source.alias} is in sugam's cache")
    yield {"status": note}
    yield {"status": "success"}
