"""A request's state as it moves through the engine, and the outputs handed back to callers.

`Sequence` is data: token ids, KV blocks, sampling state and the text state that the output
processor (output_processor.py) advances. Logic that changes it lives in the scheduler (blocks,
status), the sampler (the generator) and the output processor (tokens, text, stops).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from ..tokenizer import IncrementalDetokenizer
    from .lora_manager import LoadedLoRA
    from .output_processor import Checkpoint
    from .sampler import SeenTokens
    from .speculative import SpeculationState
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


@dataclass
class TextState:
    """What the output processor keeps per sequence: the detokenizer, the text, the reasoning state."""
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    think_ids: tuple[int, int] | None
    holdback: int                 # chars held back while they may start a stop string
    text: str = ""                # all text decoded so far (cut at a stop string when one matches)
    emitted: int = 0              # how much of `text` callers have seen
    thinking: bool = False        # inside <think>...</think>
    thinking_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)  # appended since the last output
    checkpoints: deque[Checkpoint] = field(default_factory=deque)  # for rollback, newest last


class Sequence:
    """One generation: prompt, output so far, KV blocks, sampling and text state."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, max_total_tokens: int, generator: torch.Generator,
                 text_state: TextState, grammar: GrammarMatcher | None = None, cache_salt: int | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the leading full blocks
        self.num_computed_tokens = 0        # tokens whose K/V are in the cache
        # Enters the prefix-cache hash chain: requests with different salts (e.g. LoRA adapters,
        # whose K/V differ for the same tokens) never share blocks.
        self.cache_salt = cache_salt
        self.lora: LoadedLoRA | None = None   # the LoRA adapter it runs with (None: the base model)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.generator = generator
        self.max_output_tokens = min(params.max_tokens or max_total_tokens, max_total_tokens - len(prompt_token_ids))
        self.grammar = grammar
        self.text_state = text_state
        # Speculative decoding: tokens whose K/V the draft model holds, and how many to guess next.
        self.num_draft_computed_tokens = 0
        self.speculation: SpeculationState | None = None
        # The sampler's running set of distinct tokens, for the repetition penalty (None: not built;
        # a rollback of output tokens drops it).
        self.seen_tokens: SeenTokens | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def thinking(self) -> bool:
        return self.text_state.thinking
