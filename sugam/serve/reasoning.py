"""Splits model output into reasoning (inside <think>...</think>) and answer, also while streaming.

Formats handled: the output opens and closes the thought itself (Qwen3, QwQ without a pre-opened
tag), or the chat template already wrote `<think>` at the end of the prompt so the output only
closes it (DeepSeek-R1-Distill, QwQ, Qwen3 with thinking on). Text that may be the start of a tag
is held back until the next delta decides. Blank lines right after a tag are dropped.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether the chat template ended the prompt with an open <think>."""
    return prompt_text.rstrip().endswith(OPEN)


class ReasoningParser:
    def __init__(self, prompt_opened_thinking: bool = False):
        self.state = "reasoning" if prompt_opened_thinking else "start"
        self.saw_reasoning = prompt_opened_thinking
        self._buffer = ""
        self._started = {"reasoning": False, "content": False}

    def _emit(self, kind: str, text: str) -> str:
        if not self._started[kind]:
            text = text.lstrip("\n")
            self._started[kind] = bool(text)
        return text

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for a new piece of output text."""
        self._buffer += delta
        reasoning = content = ""
        while self._buffer:
            if self.state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(OPEN):
                    self._buffer, self.state, self.saw_reasoning = stripped[len(OPEN):], "reasoning", True
                elif OPEN.startswith(stripped):
                    break  # may still become <think>
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                at = self._buffer.find(CLOSE)
                if at < 0:
                    # Hold back a possible partial </think> and the newlines before it: the thought
                    # ends without them.
                    keep = len(self._buffer) - partial_tag_suffix(self._buffer, CLOSE)
                    keep = len(self._buffer[:keep].rstrip("\n"))
                    reasoning += self._emit("reasoning", self._buffer[:keep])
                    self._buffer = self._buffer[keep:]
                    break
                reasoning += self._emit("reasoning", self._buffer[:at].rstrip("\n"))
                self._buffer, self.state = self._buffer[at + len(CLOSE):], "content"
            else:
                content += self._emit("content", self._buffer)
                self._buffer = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush what was held back when the output ends."""
        rest, self._buffer = self._buffer, ""
        if self.state == "reasoning":
            return self._emit("reasoning", rest), ""
        return "", self._emit("content", rest)


def split_reasoning(text: str, prompt_opened_thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning, or None when the model did not think; content) of a complete output."""
    parser = ReasoningParser(prompt_opened_thinking)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2
