"""The server with the real 0.5B model, through the official `openai` client (slow)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import jsonschema
import pytest
from server_harness import running_server, wait_idle

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from load_test import run as load_run  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def server():
    with running_server(MODEL, "--api-key", "secret", "--max-model-len", "4096") as (base, proc):
        yield base, proc


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="secret", max_retries=0)


def test_chat_and_completions(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=60, messages=[
        {"role": "user", "content": "Write a Python function that returns the sum of a list."}])
    assert "def " in r.choices[0].message.content and r.usage.completion_tokens > 0
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, stream=True, messages=[
            {"role": "user", "content": "Write a Python function that returns the sum of a list."}]) if chunk.choices)
    assert text == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                  logprobs=3, stop=["\n\n"])
    assert c.choices[0].text and "\n\n" not in c.choices[0].text
    assert len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs)


def test_n_seeds_and_logprobs(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=10,
               temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=2)
    a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].logprobs.content[0].top_logprobs


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string"}, "temps": {"type": "array", "items": {"type": "number"},
     "minItems": 2, "maxItems": 4}, "unit": {"enum": ["C", "F"]}}, "required": ["city", "temps", "unit"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["id", "tags"], "additionalProperties": False}, "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_outputs_validate(client, schema):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=120, messages=[
        {"role": "user", "content": "Reply with a JSON example for a weather app user."}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_tool_call_round_trip(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What's the weather in Paris right now?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                       temperature=0, max_tokens=60)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "sunny"})}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0, max_tokens=60)
    assert final.choices[0].message.content and "21" in final.choices[0].message.content


def test_auth_errors_and_no_leak(server, client):
    from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(BadRequestError, match="exceeds the context of 4096"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    wait_idle(server[0])


def test_load_with_disconnects_real_model(server):
    base, proc = server
    report = asyncio.run(load_run(base, clients=32, rounds=2, max_tokens=32, disconnect_share=0.25,
                                  api_key="secret", pid=proc.pid))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds_detail"}))
    assert report["server_errors"] == 0 and report["malformed_streams"] == 0
    assert all(r["kv_usage_after"] == 0 for r in report["rounds_detail"])
