"""The OpenAI-compatible server, as a real process: API shape, auth, bad input, reasoning and tool
output, aborts and leaks. Uses a tiny random model, so the text is noise but the behaviour is real."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import psutil
import pytest
from conftest import build_hf_model
from polling import wait_until
from server_harness import metric, running_server, sse_events, wait_idle

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# QwQ and DeepSeek-R1-Distill templates open the thought for the model.
PREOPENED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


# A model whose own template turns hostile on cue: the server must stop it and stay responsive.
HOSTILE_TEMPLATE = (
    # 'slow': few steps, each summing 100k numbers, so that the wall-clock limit (seconds) stops it, not the
    # step budget (which a fast idle machine spends in under a second: the test needs the overlap)
    "{% if messages[0]['content'] == 'slow' %}{% for i in range(10**5) %}{{ range(10**5)|sum }}"
    "{% endfor %}{% endif %}{% if messages[0]['content'] == 'huge' %}{{ 'a' * 10**10 }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def regex_for(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}" else ("\\n" if c == "\n" else c) for c in text)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    build_hf_model(root / "qwen3ish", "qwen2")
    (root / "qwen3ish" / "chat_template.jinja").write_text(QWEN3_TEMPLATE)
    shutil.copytree(root / "qwen3ish", root / "preopened")
    (root / "preopened" / "chat_template.jinja").write_text(PREOPENED_TEMPLATE)
    shutil.copytree(root / "qwen3ish", root / "hostile")
    (root / "hostile" / "chat_template.jinja").write_text(HOSTILE_TEMPLATE)
    return root


@pytest.fixture(scope="module")
def server(tiny_folder):
    with running_server(str(tiny_folder / "qwen3ish"), "--api-key", KEY, "--dtype", "float32",
                        "--served-model-name", "tiny") as (base, _):
        yield base


def post(base, path, body, **kw):
    return httpx.post(f"{base}/v1/{path}", json=body, headers=AUTH, timeout=120, **kw)


def chat(base, **body):
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    return post(base, "chat/completions", body)


def test_auth_models_and_health(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # open without a key
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    path = models["data"][0]["sugam_execution"]  # the path chosen at load
    assert path["device"] == "cpu" and path["compute_dtype"] == "float32" and path["weights"]


def test_chat_shape_usage_seed_and_n(server):
    r = chat(server, max_tokens=8, temperature=1.0, seed=42, n=2)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["created"] > 0
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert 2 <= body["usage"]["completion_tokens"] <= 16  # two choices of at most 8 tokens
    again = chat(server, max_tokens=8, temperature=1.0, seed=42, n=2).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_streaming_is_well_formed_and_matches_non_streaming(server):
    plain = chat(server, max_tokens=12, temperature=0, ignore_eos=True).json()
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []


def test_completions_logprobs_echo_and_stop(server):
    r = post(server, "completions", {"prompt": "hello world", "max_tokens": 6, "temperature": 0,
                                     "logprobs": 2, "echo": True, "ignore_eos": True}).json()
    choice = r["choices"][0]
    assert choice["text"].startswith("hello world")
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 6
    assert all(len(t) >= 1 for t in lp["top_logprobs"])
    full = post(server, "completions", {"prompt": "hello", "max_tokens": 10, "temperature": 0,
                                        "ignore_eos": True}).json()["choices"][0]["text"]
    stop = full[3:6]
    cut = post(server, "completions", {"prompt": "hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                                       "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    batch = post(server, "completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "n": 2}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]


def test_json_schema_output_validates(server):
    import jsonschema

    schemas = [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
         "required": ["name", "tags"], "additionalProperties": False},
        {"type": "object", "properties": {"point": {"type": "object", "properties": {
            "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"], "additionalProperties": False},
            "ok": {"type": "boolean"}}, "required": ["point", "ok"], "additionalProperties": False},
    ]
    for seed, schema in enumerate(schemas * 2):
        r = chat(server, max_tokens=200, temperature=1.0, seed=seed,
                 response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    # Any object: a random model may write one endless string, so only a finished answer must parse.
    for seed in range(3):
        choice = chat(server, max_tokens=100, temperature=1.0, seed=seed,
                      response_format={"type": "json_object"}).json()["choices"][0]
        assert choice["message"]["content"].startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize("template,output,kwargs,reasoning,content", [
    # Qwen3 / QwQ writing the tags themselves
    ("qwen3ish", "<think>\nI add 2 and 2.\n</think>\n\nThe answer is 4.", {}, "I add 2 and 2.", "The answer is 4."),
    # a thought that spans lines keeps its inner newlines
    ("qwen3ish", "<think>\nFirst 2.\n\nThen 2.\n</think>\n\n4", {}, "First 2.\n\nThen 2.", "4"),
    # Qwen3 with thinking off: the template writes an empty thought; the model only answers
    ("qwen3ish", "The answer is 4.", {"chat_template_kwargs": {"enable_thinking": False}}, None, "The answer is 4."),
    # DeepSeek-R1-Distill / QwQ: the template opened <think>; the model only closes it
    ("preopened", "I add 2 and 2.\n</think>\n\nThe answer is 4.", {}, "I add 2 and 2.", "The answer is 4."),
])
def test_reasoning_is_split_end_to_end(tiny_folder, server, template, output, kwargs, reasoning, content):
    def run(base, headers):
        body = {"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 60, "temperature": 0,
                "guided_regex": regex_for(output), **kwargs}
        message = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        message = message["choices"][0]["message"]
        assert message.get("reasoning_content") == reasoning and message.get("reasoning") == reasoning
        assert message["content"] == content
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                          headers=headers, timeout=60) as r:
            deltas = [e["choices"][0]["delta"] for e in sse_events(r)[:-1] if e["choices"]]
        streamed_reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        assert streamed_reasoning == (reasoning or "")
        assert "".join(d.get("content") or "" for d in deltas) == content

    if template == "qwen3ish":
        run(server, AUTH)
    else:
        with running_server(str(tiny_folder / template), "--dtype", "float32") as (base, _):
            run(base, {})


def test_tool_calls_streamed_and_not(server):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    output = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": tools, "max_tokens": 80,
            "temperature": 0, "guided_regex": regex_for(output)}
    choice = post(server, "chat/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] == "Checking."
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        chunks = [e for e in sse_events(r)[:-1] if e["choices"]]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the result goes back through the template
    followup = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 20}"}]
    assert post(server, "chat/completions", {"messages": followup, "tools": tools, "max_tokens": 4}).status_code == 200


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "gpt-4"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "exceeds the context of 512"),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, 400, "context holds 512"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, 400, "schema"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema":
      {"schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}}, 400, "schema"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    ({"messages": [{"role": "user", "content": "x"}], "unknown_field": 1, "max_tokens": 1}, 200, ""),
    # a request never supplies the template, by any name
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}},
     400, "chat_template_kwargs.chat_template"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs.messages"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 7 * 7 }}"}, 400, "chat_template"),
])
def test_bad_requests_get_clear_4xx(server, body, status, needle):
    r = post(server, "chat/completions", body)
    assert r.status_code == status, r.text
    if status != 200:
        error = r.json()["error"]
        assert needle in error["message"] or needle == error.get("param")


def test_malformed_json_and_huge_bodies(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={**AUTH, "Content-Type":
                                                                                    "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    r = post(server, "chat/completions", big)
    assert r.status_code == 413
    assert post(server, "completions", {"prompt": [10**9]}).status_code == 400
    assert post(server, "completions", {"prompt": "x", "suffix": "y"}).status_code == 400


def test_disconnect_mid_stream_frees_everything(server):
    for _ in range(3):
        with httpx.stream("POST", f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"messages": [{"role": "user", "content": "go"}], "max_tokens": 400,
                                "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        # leaving the block closed the connection mid-stream
    wait_idle(server)
    wait_idle(server)
    assert metric(server, "sugam_kv_cache_usage_ratio") == 0


def test_metrics_count_requests_and_latencies(server):
    chat(server, max_tokens=3)
    text = httpx.get(f"{server}/metrics").text
    assert 'sugam_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'status="400"' in text and 'status="401"' in text
    for name in ("sugam_time_to_first_token_seconds_count", "sugam_inter_token_latency_seconds_count",
                 "sugam_prompt_tokens_total", "sugam_generation_tokens_total", "sugam_prefix_cache_hit_rate"):
        assert name in text
    assert metric(server, "sugam_time_to_first_token_seconds_count") > 0
    assert 'sugam_execution_info{' in text and 'compute_dtype="float32"' in text


def test_queue_limit_429_and_timeout(tiny_folder):
    with running_server(str(tiny_folder / "qwen3ish"), "--dtype", "float32", "--max-num-seqs", "1",
                        "--max-waiting", "1") as (base, _):
        results = []

        def long_request():
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 500, "ignore_eos": True},
                           timeout=120)
            results.append(r)

        threads = [threading.Thread(target=long_request) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["Retry-After"] and busy.json()["error"]["type"] == "rate_limit_error"
        wait_idle(base)
    with running_server(str(tiny_folder / "qwen3ish"), "--dtype", "float32", "--request-timeout", "0.2") as (base, _):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 500, "ignore_eos": True},
                       timeout=120)
        assert r.status_code == 408 and "longer than" in r.json()["error"]["message"]
        wait_idle(base)


def test_streaming_n2_interleaves_two_complete_choices(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0, "seed": 3,
            "n": 2, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        chunks = [e for e in sse_events(r)[:-1] if e["choices"]]
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        choice = c["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length"}
    plain = post(server, "chat/completions", {**body, "stream": False}).json()
    assert [c["message"]["content"] for c in plain["choices"]] == [texts[0], texts[1]]


def test_streamed_completions_for_several_prompts_and_samples(server):
    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "n": 2, "stream": True, "echo": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    finished = sorted(c["choices"][0]["index"] for c in events[:-1] if c["choices"] and c["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3]
    assert events[-2]["usage"]["prompt_tokens"] == 5 and events[-2]["usage"]["completion_tokens"] == 12


def test_a_hostile_template_costs_its_own_request_only(tiny_folder):
    """The model's own template runs away on cue. That request gets a 400 naming the limit; a
    health check and a normal chat sent meanwhile complete in normal time."""
    with running_server(str(tiny_folder / "hostile"), "--dtype", "float32") as (base, proc):
        normal = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base}/v1/chat/completions", json=normal, timeout=120).status_code == 200  # warm up
        start = time.monotonic()
        assert httpx.post(f"{base}/v1/chat/completions", json=normal, timeout=60).status_code == 200
        baseline = time.monotonic() - start

        huge = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "huge"}]})
        assert huge.status_code == 400 and "10,000,000,000 characters" in huge.json()["error"]["message"]

        # The render worker processes (children of the server) and the CPU time each has used so far.
        workers = psutil.Process(proc.pid).children()
        used = {w.pid: sum(w.cpu_times()[:2]) for w in workers}
        slow_result: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: slow_result.append(httpx.post(
            f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "slow"}]}, timeout=60)))
        slow.start()
        wait_until(lambda: any(sum(w.cpu_times()[:2]) - used[w.pid] > 0.2 for w in workers),
                   "a render worker is busy with the slow render", timeout=4)  # it runs for 5 s
        start = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        health = time.monotonic() - start
        start = time.monotonic()
        assert httpx.post(f"{base}/v1/chat/completions", json=normal, timeout=60).status_code == 200
        chat_time = time.monotonic() - start
        assert slow.is_alive(), "the hostile render should still be running"
        slow.join()
        error = slow_result[0].json()["error"]
        assert slow_result[0].status_code == 400 and error["code"] == "chat_template_limit", error
        assert "chat template stopped" in error["message"]
        # Margins for a loaded 2-core machine, where the render holds one core; a render in the
        # server's own process (holding the GIL) made the chat take 3 s.
        assert health < 1.0, health
        assert chat_time < max(3 * baseline, baseline + 2.0), (chat_time, baseline)


def test_speculative_server_streams_the_same_tokens_and_counts_guesses(tiny_folder):
    """`serve --speculative` (here the model drafting for itself: every guess right) answers as the
    plain server does, streamed or not, and /metrics counts the guesses."""
    body = {"model": "tiny", "prompt": "hello hello hello", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with running_server(str(tiny_folder / "qwen3ish"), "--dtype", "float32", "--served-model-name", "tiny") as (base, _):
        expected = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    folder = str(tiny_folder / "qwen3ish")
    with running_server(folder, "--dtype", "float32", "--served-model-name", "tiny", "--speculative-config",
                        json.dumps({"model": folder, "num_speculative_tokens": 3})) as (base, _):
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == expected
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            streamed = "".join(e["choices"][0]["text"] for e in sse_events(r) if e != "[DONE]" and e["choices"])
        assert streamed == expected
        wait_idle(base)
        drafted = metric(base, "sugam_spec_decode_num_draft_tokens")
        assert drafted > 0 and metric(base, "sugam_spec_decode_num_accepted_tokens") == drafted
        assert metric(base, "sugam_spec_decode_num_emitted_tokens") > drafted
