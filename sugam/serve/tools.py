"""Qwen-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the output
become OpenAI `tool_calls`; the text around them stays content. Works on a stream too."""

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
