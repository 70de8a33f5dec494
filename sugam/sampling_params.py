"""Per-request sampling parameters (vLLM's names, which users know)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeVar

from .errors import SugamError

T = TypeVar("T")


class InvalidRequestError(SugamError, ValueError):
    """A request asks for something impossible (negative temperature, top_p of 2, ...)."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Fields left as None take the model's own defaults (generation_config.json), then the
    engine's: temperature 1.0, no top-k/top-p/min-p, no penalties.
    """
    max_tokens: int | None = 256          # None: until the context is full
    temperature: float | None = None      # 0 means greedy
    top_p: float | None = None
    top_k: int | None = None              # None, 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None  # >1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0         # OpenAI semantics, on generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None           # None: off; N: the chosen token plus N alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A JSON schema the output must satisfy ({"type": "object"} for any JSON object), enforced
    # token by token with a grammar.
    json_schema: dict | None = None
    regex: str | None = None              # or a regular expression the whole output must match
    # For reasoning models: after this many tokens inside <think>, the engine writes </think>.
    max_thinking_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature is None or self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k is None or self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty is None or self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.max_thinking_tokens is None or self.max_thinking_tokens >= 0,
             f"max_thinking_tokens must be >= 0, got {self.max_thinking_tokens}"),
            (self.json_schema is None or isinstance(self.json_schema, dict), "json_schema must be a JSON object"),
            (self.json_schema is None or self.regex is None, "give json_schema or regex, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    def with_defaults(self, defaults: object) -> SamplingParams:
        """A copy where unset fields take the model's defaults, then the engine's."""
        def pick(name: str, fallback: T) -> T:
            value = getattr(self, name)
            if value is None:
                value = getattr(defaults, name, None)
            return fallback if value is None else value

        return replace(
            self,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
