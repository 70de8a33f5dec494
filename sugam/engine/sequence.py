"""A request's state as it moves through the engine, and the outputs handed back to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from .structured import GrammarMatcher


@dataclass
class Logprob:
    logprob: float
    rank: int                  # 1 = the most likely token
    decoded_token: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None          # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    # What this step added (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One generation: prompt, output so far, KV blocks, sampling state, text and stop handling."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer, eos_token_ids: list[int],
                 max_total_tokens: int, generator: torch.Generator, grammar: GrammarMatcher | None = None,
                 think_token_ids: tuple[int, int] | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the leading full blocks
        self.num_computed_tokens = 0        # tokens whose K/V are in the cache
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.generator = generator
        self.max_output_tokens = min(params.max_tokens or max_total_tokens, max_total_tokens - len(prompt_token_ids))
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._text = ""           # all text decoded so far (cut at a stop string when one matches)
        self._emitted = 0         # how much of _text callers have seen
        self._holdback = max((len(s) for s in params.stop or []), default=1) - 1
        self._new_token_ids: list[int] = []
        self.grammar = grammar
        # Reasoning state: inside <think>...</think>? (a chat template may open it in the prompt)
        self._think_ids = think_token_ids
        self.thinking = False
        self._thinking_tokens = 0
        if think_token_ids:
            start, end = think_token_ids
            for token in reversed(self.prompt_token_ids):
                if token in think_token_ids:
                    self.thinking = token == start
                    break

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def forced_token(self) -> int | None:
        """A token the engine writes instead of sampling: </think> once the thinking budget is spent."""
        budget = self.params.max_thinking_tokens
        if self.thinking and budget is not None and self._thinking_tokens >= budget and self._think_ids:
            return self._think_ids[1]
        return None

    @property
    def constrained(self) -> bool:
        """Whether the grammar decides which tokens may come next. A JSON schema shapes the answer,
        so a reasoning model thinks freely first; a regex shapes the whole output."""
        if self.grammar is None:
            return False
        return not (self.thinking and self.params.json_schema is not None)

    def append_token(self, token_id: int, logprobs: dict[int, Logprob] | None) -> None:
        """Record a sampled token and decide whether the sequence is done."""
        grammar_step = self.constrained
        if self._think_ids and token_id == self._think_ids[0]:
            self.thinking, self._thinking_tokens = True, 0
        elif self._think_ids and token_id == self._think_ids[1]:
            self.thinking = False
        elif self.thinking:
            self._thinking_tokens += 1
        self.output_token_ids.append(token_id)
        self._new_token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if token_id in self._stop_ids:
            self._text += self._detok.flush()
            self._finish("stop", token_id)
            return
        self._text += self._detok.push(token_id)
        if self.params.stop and self._match_stop_string():
            return
        if grammar_step and self.grammar is not None:
            self.grammar.accept(token_id)
            if self.grammar.done:  # the document is complete: only end-of-sequence could follow
                self._text += self._detok.flush()
                self._finish("stop", None)
                return
        if len(self.output_token_ids) >= self.max_output_tokens:
            self._text += self._detok.flush()
            self._finish("length", None)

    def _match_stop_string(self) -> bool:
        # Only the tail can hold a new match: the text before it was checked on earlier tokens.
        start = max(0, self._emitted - self._holdback)
        best = None
        for stop in self.params.stop or []:
            at = self._text.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self._text = self._text[:at + len(stop)] if self.params.include_stop_str_in_output else self._text[:at]
        self._finish("stop", stop)
        return True

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def abort(self) -> None:
        self._finish("abort", None)

    def take_output(self) -> RequestOutput:
        """The cumulative output plus what changed since the last call."""
        # While running, hold back text that may turn out to be the start of a stop string.
        visible = len(self._text) if self.finished else max(self._emitted, len(self._text) - self._holdback)
        delta = self._text[self._emitted:visible]
        self._emitted = visible
        new_ids, self._new_token_ids = self._new_token_ids, []
        completion = CompletionOutput(
            index=0, text=self._text[:visible], token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            logprobs=self.logprobs, delta_text=delta, delta_token_ids=new_ids)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [completion], self.finished)
