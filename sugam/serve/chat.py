"""The chat layer every API's routes share: messages to prompt ids, sampling options to jobs the
engine validates and runs, and a completion read as reasoning, content and tool calls (whole or as
it streams). Plain Python types only: no HTTP, no API's JSON shapes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..engine.async_engine import AsyncLLMEngine
from ..engine.sequence import CompletionOutput, RequestOutput
from ..errors import PromptTooLongError
from ..lora.adapter import LoRARequest
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .metrics import ServerMetrics
from .reasoning import CLOSE, ReasoningParser, prompt_opens_thinking, split_reasoning
from .templates import TemplateRenderer
from .tools import BareCallParser, ToolCallParser, extract_bare_call, extract_tool_calls, parse_call

T = TypeVar("T")
Job = tuple[list[int], SamplingParams]  # one sample to generate: prompt token ids and its params


class GenerationTimeout(Exception):
    """The jobs ran past the request time limit and were stopped."""


class ClientGone(Exception):
    """The client went away before every job finished."""


# ---- prompts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]

    @property
    def opens_thinking(self) -> bool:
        """Whether the template ended the prompt inside <think> (the output then only closes it)."""
        return prompt_opens_thinking(self.text)


def without_reasoning(content: str) -> str:
    """An earlier assistant turn as it goes back to the template: without its reasoning (as QwQ's
    card asks)."""
    return split_reasoning(content)[1] if CLOSE in content else content


# ---- sampling -----------------------------------------------------------------------------------

@dataclass
class SamplingOptions:
    """What a request asks of generation, before validation (SamplingParams and the engine do that)."""
    max_tokens: int | None = None         # None: until the context is full
    temperature: float | None = None      # None here and below: the model's default
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None           # alternatives per token; None: no logprobs
    json_schema: dict[str, Any] | None = None  # e.g. tool_call_schema(), or {"type": "object"}
    regex: str | None = None
    max_thinking_tokens: int | None = None
    n: int = 1                            # samples per prompt

    def sampling_params(self) -> SamplingParams:
        """Raises InvalidRequestError for an impossible value."""
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos, logprobs=self.logprobs,
            json_schema=self.json_schema, regex=self.regex, max_thinking_tokens=self.max_thinking_tokens)


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON schema whose documents are exactly calls of the given tools: {"name": ..., "arguments": {...}}."""
    variants = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def samples(prompt: list[int], params: SamplingParams, n: int) -> list[Job]:
    """n jobs sampling one prompt; with a seed, sample i uses seed + i so that samples differ."""
    if params.seed is None or n == 1:
        return [(prompt, params)] * n
    return [(prompt, replace(params, seed=params.seed + i)) for i in range(n)]


def prepare(engine: AsyncLLMEngine, prompts: list[list[int]], options: SamplingOptions,
            lora: LoRARequest | None = None) -> list[Job]:
    """The jobs for options.n samples of each prompt, prompt-major. SamplingParams and the engine
    validate them here (InvalidRequestError, PromptTooLongError, LoRAError), so that a bad request
    fails before a stream has sent its headers, not halfway through it."""
    params = options.sampling_params()
    for ids in prompts:
        # What generate() will check (ids, length, grammar, adapter); the sequence is discarded.
        engine.engine.create_sequence(ids, params, request_id="check", lora_request=lora)
    return [job for ids in prompts for job in samples(ids, params, options.n)]


def fit_max_tokens(context: int, prompt_len: int, max_tokens: int | None) -> int:
    """The output budget of a request whose prompt has prompt_len tokens: max_tokens capped to the
    room the context leaves (agents send large max_tokens whatever the model's context; the answer
    then stops where the context ends, as llama-server and Ollama do). A prompt that fills the
    context is refused."""
    room = context - prompt_len
    if room <= 0:
        raise PromptTooLongError(f"the prompt has {prompt_len} tokens but the context holds {context}; shorten it")
    return min(max_tokens or room, room)


def model_thinks(engine: AsyncLLMEngine) -> bool:
    """Whether the model can think: it has <think> tokens and its template knows about them."""
    e = engine.engine
    template = e.tokenizer.chat_template or ""
    return e.think_token_ids is not None and ("<think>" in template or "enable_thinking" in template)


@dataclass(frozen=True)
class Thinking:
    """How a request's thinking switch reaches the template and the engine."""
    template_kwargs: dict[str, Any] | None = None
    budget: int | None = None   # the most tokens the thought may take (None: no limit)
    shown: bool = True          # whether the thought goes back to the client


def thinking(engine: AsyncLLMEngine, enabled: bool | None, budget: int | None = None) -> Thinking:
    """enabled None: the model's default. On a model that does not think the switch changes nothing
    (agents ask every model to think). Off: through the template where it knows how, and a model
    that thinks anyway is stopped at once (a budget of 0 makes the engine close </think>)."""
    if enabled is None or not model_thinks(engine):
        return Thinking()
    if not enabled:
        return Thinking({"enable_thinking": False}, 0, False)
    return Thinking({"enable_thinking": True}, budget, True)


# ---- generation ---------------------------------------------------------------------------------

class Timing:
    """Feeds the latency histograms as one job's tokens arrive."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics, self.start, self.tokens = metrics, time.monotonic(), 0
        self.last: float | None = None   # when the last tokens came

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


class Chat:
    """The prompt workers (template processes, tokenizer threads) and the generation loop."""

    def __init__(self, metrics: ServerMetrics, workers: int, request_timeout: float):
        self.metrics = metrics
        self.request_timeout = request_timeout
        self._prompt_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sugam-prompt")
        self.templates = TemplateRenderer(workers=workers)

    def start(self) -> float:
        """Spawn the template workers; returns the seconds it took."""
        return self.templates.start()

    def close(self) -> None:
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)
        self.templates.close()

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU work (tokenizing) in the prompt threads, so that the event loop keeps answering
        other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, work)

    async def render_prompt(self, tokenizer: Tokenizer, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None, template_kwargs: dict[str, Any] | None) -> Prompt:
        """The model's chat template applied to the messages; raises ChatTemplateError (and its
        TemplateLimitError) when the template refuses them or runs past a limit."""
        source, variables = tokenizer.chat_variables(messages, tools=tools, add_generation_prompt=True,
                                                     template_kwargs=template_kwargs)
        # Rendered in a worker process (sugam/serve/templates.py), tokenized in a thread.
        text = await self.templates.render(source, variables, tokenizer.template_limits)
        return Prompt(text, await self.off_loop(lambda: tokenizer.encode(text, add_special_tokens=False)))

    async def run(self, engine: AsyncLLMEngine, jobs: list[Job], is_disconnected: Callable[[], Awaitable[bool]],
                  lora: LoRARequest | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run the jobs concurrently (with the LoRA adapter `lora`, if given); yield (job index,
        output) as they advance. Ends quietly when the client disconnects, raises GenerationTimeout
        past the time limit; either way, and on leaving early, every job is aborted so its KV
        blocks return at once."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()
        base_id = uuid.uuid4().hex
        timings = [Timing(self.metrics) for _ in jobs]

        async def one(index: int) -> None:
            prompt, sp = jobs[index]
            try:
                async for out in engine.generate(prompt, sp, request_id=f"{base_id}-{index}", lora_request=lora):
                    queue.put_nowait((index, out))
            except BaseException as exc:
                queue.put_nowait(exc)
                raise
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(one(i)) for i in range(len(jobs))]
        deadline = time.monotonic() + self.request_timeout
        remaining = len(jobs)
        try:
            while remaining:
                if time.monotonic() > deadline:
                    raise GenerationTimeout(f"the request took longer than {self.request_timeout:.0f} s "
                                            "and was stopped")
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await is_disconnected():
                        return
                    continue
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    index, out = item
                    timings[index].saw(out.outputs[0])
                    yield item
                    if out.finished:
                        timings[index].done()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, engine: AsyncLLMEngine, jobs: list[Job], is_disconnected: Callable[[], Awaitable[bool]],
                      lora: LoRARequest | None = None) -> dict[int, CompletionOutput]:
        """Each job's final output by job index; raises ClientGone if the client left first."""
        finals: dict[int, CompletionOutput] = {}
        async for index, out in self.run(engine, jobs, is_disconnected, lora):
            if out.finished:
                finals[index] = out.outputs[0]
        if len(finals) < len(jobs):
            raise ClientGone("client disconnected")
        return finals


# ---- replies ------------------------------------------------------------------------------------

@dataclass
class Reply:
    """A completion (or a streamed piece of one) read as a chat turn. reasoning is None when the
    model did not think; in a streamed piece it is "" when there is none. Tool calls are dicts in
    the function-call shape chat templates read back: {"id", "type", "function": {"name", "arguments"}}
    with the arguments as a JSON string."""
    reasoning: str | None
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _forced_calls(text: str) -> list[dict[str, Any]]:
    call = parse_call(text.strip())
    return [call] if call else []


@dataclass(frozen=True)
class ReplyFormat:
    """How to read a completion."""
    opens_thinking: bool = False  # the prompt opened <think>; the output only closes it
    tools: bool = False           # <tool_call>...</tool_call> in the content are calls
    forced_call: bool = False     # the whole content is one call (tool_call_schema made it so)
    # With tools: an answer that is only a JSON call of one of these tools, bare or in a ```json
    # fence (as small models write it, without the tags), is that call too.
    tool_names: frozenset[str] = frozenset()

    def split(self, text: str) -> Reply:
        reasoning, content = split_reasoning(text, self.opens_thinking)
        calls: list[dict[str, Any]] = []
        if self.forced_call:
            calls, content = _forced_calls(content), ""
        elif self.tools:
            content, calls = extract_tool_calls(content)
            if not calls and self.tool_names:
                content, calls = extract_bare_call(content, self.tool_names)
        return Reply(reasoning, content, calls)

    def stream(self) -> ReplyStream:
        return ReplyStream(self)


def reply_parts(reply: Reply) -> list[tuple[str, Any]]:
    """A reply (or a streamed piece of one) as parts in output order: ("reasoning", text),
    ("text", text), ("tool_call", call). For APIs whose answers are lists of typed blocks."""
    parts: list[tuple[str, Any]] = []
    if reply.reasoning:
        parts.append(("reasoning", reply.reasoning))
    if reply.content:
        parts.append(("text", reply.content))
    parts.extend(("tool_call", call) for call in reply.tool_calls)
    return parts


class ReplyStream:
    """Reads one job's output as it streams: feed text deltas, get Reply pieces."""

    def __init__(self, fmt: ReplyFormat):
        self.fmt = fmt
        self._reasoning = ReasoningParser(fmt.opens_thinking)
        self._tools = ToolCallParser()
        self._bare = BareCallParser(fmt.tool_names) if fmt.tools and fmt.tool_names else None
        self._forced_text = ""  # with a forced call the whole output is one call, parsed at the end

    def feed(self, delta: str, finished: bool = False) -> Reply:
        reasoning, content = self._reasoning.feed(delta)
        calls: list[dict[str, Any]] = []
        if finished:
            r_end, c_end = self._reasoning.finish()
            reasoning, content = reasoning + r_end, content + c_end
        if self.fmt.forced_call:
            self._forced_text += content
            content = ""
            if finished:
                calls = _forced_calls(self._forced_text)
        elif self.fmt.tools:
            content, calls = self._tools.feed(content)
            if finished:
                content += self._tools.finish()
            if self._bare is not None:
                if self._tools.calls:  # a tagged call: the answer is not one bare call
                    content, self._bare = self._bare.release() + content, None
                else:
                    content = self._bare.feed(content)
                    if finished:
                        rest, calls = self._bare.finish()
                        content += rest
        return Reply(reasoning, content, calls)
