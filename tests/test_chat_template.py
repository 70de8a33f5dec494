"""Chat templates under limits: real-shaped templates render exactly as before, hostile ones are
stopped quickly with a TemplateLimitError naming the limit, in bounded time and memory."""

from __future__ import annotations

import json
import time
import tracemalloc

import jinja2.ext
import pytest
from conftest import CHATML, train_tokenizer
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sugam.chat_template import (
    ChatTemplateError,
    TemplateLimitError,
    TemplateLimits,
    _tojson,
    render_template,
)
from sugam.loader.base import TokenizerSpec
from sugam.tokenizer import Tokenizer

# Written for this test in the shape of the Qwen2.5 / Qwen3 templates: a tools preamble, a
# namespace scan backwards over the messages, reasoning split off earlier turns, tool calls as
# JSON, tool results grouped, and an optional empty thought.
QWEN_SHAPED = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1, searching=true) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.searching and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.searching = false %}{%- set ns.last_query = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
        {{- '<|im_start|>assistant\\n' ~ content }}
        {%- for call in message.tool_calls or [] %}
            {%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- call.name }}{{- '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are helpful."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}: " + "words " * 30})
        if i % 3 == 0:
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]})
            messages.append({"role": "tool", "content": json.dumps({"temp": i})})
        messages.append({"role": "assistant", "content": f"<think>\nstep {i}\n</think>\n\nanswer {i} " + "more " * 30})
    return messages


def plain_render(source: str, **variables) -> str:
    """jinja2's sandbox without sugam's limits: what the output must stay equal to."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    return env.from_string(source).render(**variables)


@pytest.mark.parametrize("source", [CHATML, QWEN_SHAPED])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_real_shaped_templates_render_exactly_as_before(source, tools):
    variables = {"messages": conversation(4), "tools": tools, "add_generation_prompt": True, "enable_thinking": False}
    assert render_template(source, variables) == plain_render(source, **variables)


def test_a_long_conversation_stays_far_inside_the_limits():
    # ~2,700 messages, 750k characters of prompt: a fifth of each budget would still pass.
    limits = TemplateLimits()
    tight = TemplateLimits(max_steps=limits.max_steps // 5, max_work_chars=limits.max_work_chars // 5,
                           max_output_chars=limits.max_output_chars // 5, max_seconds=limits.max_seconds)
    variables = {"messages": conversation(1000), "tools": TOOLS, "add_generation_prompt": True}
    start = time.perf_counter()
    out = render_template(QWEN_SHAPED, variables, tight)
    assert len(out) > 400_000 and time.perf_counter() - start < limits.max_seconds / 2


# A short clock, so that the cases stopped by time cost the suite little (tracemalloc, on while they
# run, makes allocation-heavy templates about ten times slower). The cases stopped by another limit
# get a long one: on a loaded machine the slowest of them (0.7 s idle) would otherwise meet the clock
# before its own limit.
FAST = TemplateLimits(max_seconds=1.5)
UNHURRIED = TemplateLimits(max_seconds=30)

# (template, the limit that stops it). The first seven are the reports.
HOSTILE = {
    "nested_range": ("{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}", "time"),
    "lipsum": ("{{ lipsum(10**7) }}", "lipsum"),
    "huge_power": ("{{ 10 ** 100000000 }}", "size"),
    "format_width": ("{{ '{:>1000000000}'.format('a') }}", "size"),
    "string_repeat": ("{{ 'a' * 10**10 }}", "size"),
    "range": ("{% for i in range(10**9) %}{% endfor %}", "range"),
    "nested_format_spec": ("{{ '{:>{w}}'.format('a', w=1000000000) }}", "format"),
    "format_map": ("{{ '{a:>1000000000}'.format_map({'a': 1}) }}", "size"),
    "percent_width": ("{{ '%1000000000s' % 'a' }}", "size"),
    "format_filter": ("{{ '%1000000000s'|format('a') }}", "size"),
    "center_filter": ("{{ 'a'|center(1000000000) }}", "size"),
    "indent_filter": ("{{ ('x\\n' * 1000)|indent(1000000) }}", "size"),
    "ljust": ("{{ 'a'.ljust(1000000000) }}", "size"),
    "expandtabs": ("{{ '\\t\\t'.expandtabs(1000000000) }}", "size"),
    "replace": ("{{ ('a' * 100000).replace('a', 'b' * 100000) }}", "size"),
    "replace_filter": ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}", "size"),
    "join_separator": ("{{ ('x' * 1000000).join(['a'] * 100000) }}", "size"),
    "join_filter": ("{{ (['a'] * 100000)|join('x' * 1000000) }}", "size"),
    "wordwrap": ("{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 100000) }}", "size"),
    "translate": ("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "size"),
    "to_bytes": ("{{ (5).to_bytes(1000000000, 'big')|length }}", "size"),
    "list_repeat": ("{{ ([1] * 10**9)|length }}", "size"),
    "tilde_doubling": (("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}"), "size"),
    "plus_doubling": (("{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}"), "size"),
    "squaring": (("{% set ns = namespace(x=10**1000) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}"
                 "{% endfor %}"), "size"),
    "shared_items": ("{{ ['x' * 1000000] * 1000 }}", "size"),
    "shared_tree_printed": (("{% set ns = namespace(x=['ab']) %}{% for i in range(100) %}{% set ns.x = [ns.x, ns.x] %}"
                            "{% endfor %}{{ ns.x|tojson }}"), "size"),
    "shared_tree_compared": (("{% set ns = namespace(x=['ab'], y=['ab']) %}{% for i in range(60) %}"
                             "{% set ns.x = [ns.x, ns.x] %}{% set ns.y = [ns.y, ns.y] %}{% endfor %}{{ ns.x == ns.y }}"),
                             "size"),
    "sum_of_lists": ("{{ ([[1] * 100000] * 100000)|sum(start=[])|length }}", "size"),
    "tojson_indent": ("{{ [[[[1]]]]|tojson(indent=1000000000) }}", "format"),
    "batch": ("{{ [1]|batch(1000000000, 0)|list|length }}", "size"),
    "slice": ("{{ [1]|slice(1000000000)|list|length }}", "size"),
    "round": ("{{ 5|round(-1000000000) }}", "format"),
    "endless_recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nesting"),
    "exponential_macros": (("{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% else %}x{% endif %}"
                           "{% endmacro %}{{ f(40)|length }}"), "time"),
    "long_output": ("{% for i in range(100000) %}{% for j in range(100) %}" + "x" * 80
                    + "{% endfor %}{% endfor %}", "output"),
    "buffered_output": ("{% set x %}{% for i in range(100000) %}{% for j in range(100) %}" + "x" * 2000
                        + "{% endfor %}{% endfor %}{% endset %}{{ x|length }}", "work"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_are_stopped_quickly_in_bounded_memory(name):
    source, limit = HOSTILE[name]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TemplateLimitError) as refused:
            render_template(source, {"messages": []}, FAST if limit == "time" else UNHURRIED)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.limit == limit, str(refused.value)
    assert str(refused.value).startswith("chat template stopped: ")
    assert elapsed < FAST.max_seconds + 3, elapsed  # 1.5 s idle for those stopped by the clock, 0.7 s for the rest
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_the_step_budget_holds_without_the_clock():
    slow_clock = TemplateLimits(max_steps=10_000, max_seconds=3600)
    with pytest.raises(TemplateLimitError, match="10,000 steps"):
        render_template("{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}", {}, slow_clock)
    render_template("{% for i in range(50) %}{% for j in range(50) %}{% endfor %}{% endfor %}", {}, slow_clock)


@pytest.mark.parametrize("source,cause", [
    ("{{ 1 / 0 }}", "ZeroDivisionError('division by zero')"),
    ("{{ messages.nope() }}", "'list object' has no attribute 'nope'"),
    ("{{ 10.0 ** 400 }}", "OverflowError("),
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{% include 'x' %}", "TypeError('no loader for this environment specified')"),
    ("{{ '{0.__class__.__mro__}'.format(1) }}", "access to attribute '__class__' of 'int' object is unsafe"),
    ("{{ 'x' + 1 }}", "TypeError('can only concatenate str"),
    ("{% for x in 5 %}{% endfor %}", "TypeError(\"'int' object is not iterable\")"),
])
def test_every_template_failure_is_a_chat_template_error(source, cause):
    with pytest.raises(ChatTemplateError) as failed:
        render_template(source, {"messages": []})
    assert str(failed.value).startswith("chat template failed") and cause in str(failed.value), str(failed.value)


def test_a_non_text_template_is_refused():
    with pytest.raises(ChatTemplateError, match="must be text"):
        render_template(["not", "a", "template"], {})  # type: ignore[arg-type]


def test_template_kwargs_cannot_choose_the_template():
    tok = Tokenizer(TokenizerSpec(tokenizer_json=train_tokenizer().to_str(), chat_template=CHATML))
    msgs = [{"role": "user", "content": "hi"}]
    for key in ("chat_template", "messages", "tools", "add_generation_prompt"):
        with pytest.raises(ChatTemplateError, match=key):
            tok.render_chat(msgs, template_kwargs={key: "{{ 7 * 7 }}"})
    with pytest.raises(ChatTemplateError, match="chat_template"):  # the Python API's kwargs, too
        tok.apply_chat_template(msgs, tokenize=False, chat_template="{{ 7 * 7 }}")
    assert tok.render_chat(msgs, template_kwargs={"enable_thinking": False}).startswith("<|im_start|>user")
