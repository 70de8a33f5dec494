"""Reasoning and tool-call parsing on streams cut at every possible point, and the thinking budget."""

from __future__ import annotations

import pytest

from sugam import LLM, SamplingParams
from sugam.serve.chat import ReplyFormat
from sugam.serve.reasoning import ReasoningParser, prompt_opens_thinking, split_reasoning
from sugam.serve.tools import ToolCallParser, extract_bare_call, extract_tool_calls

CASES = [
    # (output, template pre-opened <think>, reasoning, content)
    ("<think>\nstep one\n\nstep two\n</think>\n\nAnswer.", False, "step one\n\nstep two", "Answer."),  # Qwen3 / QwQ
    ("step one\n</think>\n\nAnswer.", True, "step one", "Answer."),                                 # R1-Distill, QwQ
    ("Just an answer with </think> inside? no.", False, None, "Just an answer with </think> inside? no."),
    ("<think>\ncut off mid-thought", False, "cut off mid-thought", ""),                                # budget/length
    ("  <think>x</think>y", False, "x", "y"),
]


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    r = c = ""
    for piece in pieces:
        dr, dc = parser.feed(piece)
        r, c = r + dr, c + dc
    dr, dc = parser.finish()
    return r + dr, c + dc


@pytest.mark.parametrize("output,opened,reasoning,content", CASES)
def test_reasoning_split_at_every_cut(output, opened, reasoning, content):
    assert split_reasoning(output, opened) == (reasoning, content)
    for cut in range(len(output) + 1):
        assert stream(ReasoningParser(opened), [output[:cut], output[cut:]]) == (reasoning or "", content)
    assert stream(ReasoningParser(opened), list(output)) == (reasoning or "", content)


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


def test_tool_calls_at_every_cut():
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    content, calls = extract_tool_calls(text)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert calls[0]["function"]["arguments"] == '{"x": 1}'
    for cut in range(len(text) + 1):
        parser = ToolCallParser()
        got, found = "", []
        for piece in (text[:cut], text[cut:]):
            c, new = parser.feed(piece)
            got, found = got + c, found + new
        got += parser.finish()
        assert got.strip() == "Sure." and [c["function"]["name"] for c in found] == ["f", "g"]
    # malformed calls stay text
    assert extract_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


BARE = [  # (answer, whether it is a call of the offered tool "get_weather")
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```', True),
    (' {"name": "get_weather", "arguments": {"city": "Paris"}}\n', True),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', True),
    ('{"name": "delete_all", "arguments": {}}', False),                      # not an offered tool
    ('Sure: {"name": "get_weather", "arguments": {}}', False),                # text around it
    ('{"name": "get_weather", "arguments": {}} and then', False),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}', False),  # the fence never closes
    ('```python\nprint({"name": "get_weather"})\n```', False),
    ('{"city": "Paris"', False),
]


@pytest.mark.parametrize("answer,is_call", BARE)
def test_bare_json_calls_at_every_cut(answer, is_call):
    """A small model's call without the tags: the whole answer one JSON call of an offered tool."""
    names = frozenset({"get_weather"})
    content, calls = extract_bare_call(answer, names)
    assert (content, bool(calls)) == (("", True) if is_call else (answer, False))
    if is_call:
        assert calls[0]["function"]["name"] == "get_weather" and '"Paris"' in calls[0]["function"]["arguments"]
    fmt = ReplyFormat(tools=True, tool_names=names)
    for cut in range(len(answer) + 1):
        stream = fmt.stream()
        pieces = [stream.feed(answer[:cut]), stream.feed(answer[cut:], finished=True)]
        content, got = "".join(p.content for p in pieces), [c for p in pieces for c in p.tool_calls]
        assert (content, len(got)) == (("", 1) if is_call else (answer, 0)), cut
    assert len(fmt.split(answer).tool_calls) == is_call
    assert not ReplyFormat(tools=True).split(answer).tool_calls  # only where the route offers the names


def test_thinking_budget_closes_the_thought(tiny_models):
    llm = LLM(str(tiny_models["qwen2"][0]), dtype="float32")
    tok = llm.get_tokenizer()
    start, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    prompt = tok.encode("hello") + [start]  # a template that opened the thought
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                max_thinking_tokens=4))[0].outputs[0]
    assert out.token_ids[4] == end
    zero = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, max_thinking_tokens=0))[0]
    assert zero.outputs[0].token_ids[0] == end


def test_history_goes_back_to_the_template_without_reasoning():
    from sugam.serve.openai import template_messages
    from sugam.serve.protocol import ChatMessage

    messages = [ChatMessage(role="user", content="2+2?"),
                ChatMessage(role="assistant", content="<think>\nadd them\n</think>\n\n4", reasoning_content="add them"),
                ChatMessage(role="assistant", content=None, tool_calls=[
                    {"id": "c1", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]),
                ChatMessage(role="developer", content=[{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}])]
    out = template_messages(messages)
    assert out[1]["content"] == "4" and "reasoning_content" not in out[1]
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}  # templates want an object
    assert out[3] == {"role": "system", "content": "be brief"}
