"""Qwen-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the output
become OpenAI `tool_calls`; the text around them stays content. Works on a stream too.

Small models often write the call without the tags, as the whole answer: `{"name": ..., "arguments":
...}`, bare or in a ```json fence. `BareCallParser` takes such an answer as a call when it names
one of the offered tools and nothing else is around it; anything else stays content."""

from __future__ import annotations

import json
import uuid
from typing import Any

from .reasoning import partial_tag_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parse_call(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}}


class ToolCallParser:
    """Feed content deltas; get back (content delta, completed tool calls)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self.calls: list[dict[str, Any]] = []

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += delta
        content, calls = "", []
        while self._buffer:
            if self._in_call:
                at = self._buffer.find(CLOSE)
                if at < 0:
                    break
                call = parse_call(self._buffer[:at].strip())
                if call is None:  # not a well-formed call: give the text back as content
                    content += OPEN + self._buffer[:at + len(CLOSE)]
                else:
                    calls.append(call)
                self._buffer, self._in_call = self._buffer[at + len(CLOSE):], False
            else:
                at = self._buffer.find(OPEN)
                if at >= 0:
                    content += self._buffer[:at]
                    self._buffer, self._in_call = self._buffer[at + len(OPEN):], True
                    continue
                keep = partial_tag_suffix(self._buffer, OPEN)  # may be the start of <tool_call>
                content += self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
        self.calls.extend(calls)
        return content, calls

    def finish(self) -> str:
        """Text left over at the end (an unfinished call is returned as plain text)."""
        rest, self._buffer = self._buffer, ""
        return (OPEN + rest) if self._in_call else rest


def extract_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    return (content + parser.finish()).strip(), calls


_FENCE = "```"


def _bare_call_state(text: str, names: frozenset[str]) -> tuple[bool, dict[str, Any] | None]:
    """(whether `text` may still become a bare call of one of `names`, the call if it is one now)."""
    t = text.lstrip()
    fenced = t.startswith(_FENCE)
    if fenced:
        head, newline, body = t[len(_FENCE):].partition("\n")
        if not newline:
            return "json".startswith(head.strip().lower()), None
        if head.strip().lower() not in ("", "json"):
            return False, None
        t = body.lstrip()
    elif _FENCE.startswith(t):  # "", "`" or "``": undecided
        return True, None
    if not t:
        return True, None
    if not t.startswith("{"):
        return False, None
    try:
        data, end = json.JSONDecoder().raw_decode(t)
    except json.JSONDecodeError:
        return True, None  # unfinished (or not JSON at all: decided at the end)
    call = parse_call(json.dumps(data)) if isinstance(data, dict) else None
    if call is None or call["function"]["name"] not in names:
        return False, None
    rest = t[end:].strip()
    if fenced:
        return _FENCE.startswith(rest), call if rest == _FENCE else None
    return rest == "", call if rest == "" else None


class BareCallParser:
    """Feed content deltas; the answer is held back while it may still be one bare call (a JSON
    object naming an offered tool, alone or in a ```json fence), and given back as content as soon
    as it cannot be."""

    def __init__(self, names: frozenset[str]):
        self.names = names
        self._held: str | None = ""  # None: decided, not a call

    def feed(self, delta: str) -> str:
        if self._held is None:
            return delta
        self._held += delta
        if _bare_call_state(self._held, self.names)[0]:
            return ""
        text, self._held = self._held, None
        return text

    def release(self) -> str:
        """Give up (e.g. the answer has a tagged call): what was held, as content."""
        text, self._held = self._held or "", None
        return text

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content left, [the call] when the whole answer was one)."""
        text, self._held = self._held, None
        if text is None:
            return "", []
        call = _bare_call_state(text, self.names)[1]
        return ("", [call]) if call else (text, [])


def extract_bare_call(text: str, names: frozenset[str]) -> tuple[str, list[dict[str, Any]]]:
    parser = BareCallParser(names)
    content = parser.feed(text)
    rest, calls = parser.finish()
    return content + rest, calls
