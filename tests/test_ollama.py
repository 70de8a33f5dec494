"""The Ollama API (/api/*) and the router metrics, against real server processes.

Fast tests use a tiny random model (the text is noise, the behaviour is real): NDJSON framing line
by line, Ollama's error shape and status for every bad input (never a 500), the API key, thinking,
embeddings (against transformers' hidden states), pull progress and the vllm:* gauges. The slow
tests drive the real 0.5B model with the official `ollama` Python package."""

from __future__ import annotations

import json
import math
import re
import threading

import httpx
import pytest
from conftest import build_hf_model, forbid_tokens
from server_harness import running_server, wait_idle
from test_lora import make_peft_adapter

from sugam import registry

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Tools and thinking, as Qwen3's template has them: `enable_thinking=false` closes the thought in the
# prompt, otherwise the prompt opens it (so a random model's whole output is its "thinking").
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}")
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
DURATIONS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
             "eval_duration")
PULLED = "smollm2-135m-instruct"  # "cached" in the test's SUGAM_HOME as a sparse file of the right size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model, adapter folder, SUGAM_HOME)."""
    root = tmp_path_factory.mktemp("ollama")
    model = build_hf_model(root / "m", "qwen2")
    (root / "m" / "chat_template.jinja").write_text(TEMPLATE)
    make_peft_adapter(model, root / "a1", seed=1)
    home = root / "home"
    source = registry.MODELS[PULLED]
    (home / "models").mkdir(parents=True)
    with open(home / "models" / source.filename, "wb") as f:
        f.truncate(source.size)  # sparse: no disk, but is_cached() sees the pinned size
    return root / "m", model, root / "a1", home


@pytest.fixture(scope="module")
def server(tiny):
    folder, _, adapter, home = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUGAM_HOME", str(home))
        with running_server(str(folder), "--api-key", KEY, "--dtype", "float32", "--served-model-name", "tiny",
                            "--lora", f"a1={adapter}") as (base, _):
            yield base


def api(base, path, body=None, **kw):
    kw.setdefault("headers", AUTH)
    if body is None:
        return httpx.get(f"{base}/api/{path}", timeout=120, **kw)
    return httpx.post(f"{base}/api/{path}", json=body, timeout=120, **kw)


def ndjson(response: httpx.Response) -> list[dict]:
    """Every line one JSON object, none empty; checks the framing as it goes."""
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.text.split("\n")
    assert lines[-1] == "", "the stream ends with a newline"
    return [json.loads(line) for line in lines[:-1]]


def stream(base, path, body) -> list[dict]:
    with httpx.stream("POST", f"{base}/api/{path}", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        r.read()
        return ndjson(r)


def check_final(final: dict, model: str) -> None:
    assert final["done"] is True and final["done_reason"] in ("stop", "length") and final["model"] == model
    assert all(isinstance(final[k], int) and final[k] >= 0 for k in DURATIONS), final
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


# ---- fast: tiny model -------------------------------------------------------------------------------

def test_auth_guards_the_ollama_api(server):
    for path, body in (("tags", None), ("version", None), ("chat", {"model": "tiny"}), ("embed", {"model": "tiny"})):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = api(server, path, body, headers=headers)
            assert r.status_code == 401 and set(r.json()) == {"error"} and "API key" in r.json()["error"]
    version = api(server, "version").json()
    assert re.match(r"^\d+\.\d+\.\d+$", version["version"])


def test_tags_show_and_ps(server, tiny):
    from sugam.config import ModelConfig
    from sugam.serve.ollama import human_number, parameter_count

    _, model, adapter, _ = tiny
    models = api(server, "tags").json()["models"]
    assert [m["name"] for m in models] == ["tiny:latest", "a1:latest"]
    base, lora = models
    params = sum(p.numel() for p in model.parameters())
    assert parameter_count(ModelConfig.from_hf(model.config.to_dict())) == params  # the formula is exact
    assert base["details"] == {"parent_model": "", "format": "safetensors", "family": "qwen2", "families": ["qwen2"],
                               "parameter_size": human_number(params), "quantization_level": "F32"}
    assert base["size"] == (tiny[0] / "model.safetensors").stat().st_size and re.match(r"^[0-9a-f]{64}$", base["digest"])
    assert lora["details"]["parent_model"] == "tiny:latest" and lora["size"] > 0 and lora["digest"] != base["digest"]
    assert base["modified_at"].endswith("Z")

    for name in ("tiny", "tiny:latest"):
        shown = api(server, "show", {"model": name}).json()
        assert shown["capabilities"] == ["completion", "tools", "thinking"]  # no FIM tokens: no "insert"
        assert shown["template"] == TEMPLATE and shown["details"] == base["details"]
        info = shown["model_info"]
        assert info["general.architecture"] == "qwen2" and info["qwen2.block_count"] == 2
        assert info["qwen2.context_length"] == 512 and info["qwen2.embedding_length"] == 64
        assert f"{'num_ctx':<30} 512" in shown["parameters"].splitlines()
    assert api(server, "show", {"name": "a1"}).json()["details"]["parent_model"] == "tiny:latest"
    r = api(server, "show", {"model": "nope:7b"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope:7b' not found"}

    ps = api(server, "ps").json()["models"]
    assert [m["name"] for m in ps] == ["tiny:latest", "a1:latest"]
    assert ps[0]["size"] > base["size"] and ps[0]["size_vram"] == 0 and ps[0]["context_length"] == 512


def test_chat_streams_ndjson_and_matches_the_single_object(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "think": False,
            "options": {"temperature": 0, "num_predict": 8}}
    chunks = stream(server, "chat", body)
    *pieces, final = chunks
    assert pieces and all(c["done"] is False and c["message"]["role"] == "assistant" for c in pieces)
    assert all(CREATED_AT.match(c["created_at"]) and c["model"] == "tiny" for c in chunks)
    assert all("thinking" not in c["message"] for c in chunks)  # think: false
    check_final(final, "tiny")
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] <= 8 and (final["done_reason"] == "stop" or final["eval_count"] == 8)
    one = api(server, "chat", {**body, "stream": False}).json()
    check_final(one, "tiny")
    assert one["message"]["content"] == "".join(c["message"]["content"] for c in pieces)
    assert one["eval_count"] == final["eval_count"] and one["prompt_eval_count"] == final["prompt_eval_count"]
    wait_idle(server)


def test_thinking_is_split_shown_or_turned_off(server):
    ask = {"model": "tiny:latest", "messages": [{"role": "user", "content": "hi"}], "stream": False,
           "options": {"temperature": 0, "num_predict": 6}}
    default = api(server, "chat", ask).json()  # the template opens <think>: the noise is all thought
    assert default["message"]["thinking"] and default["message"]["content"] == ""
    streamed = stream(server, "chat", {**ask, "stream": True})
    assert "".join(c["message"].get("thinking", "") for c in streamed) == default["message"]["thinking"]
    low = api(server, "chat", {**ask, "think": "low"}).json()
    assert low["message"]["thinking"] == default["message"]["thinking"]
    off = api(server, "chat", {**ask, "think": False}).json()
    assert "thinking" not in off["message"] and off["message"]["content"]
    # the same through /api/generate, and earlier thinking in messages goes back without its thought
    gen = api(server, "generate", {"model": "tiny", "prompt": "hi", "stream": False, "options": ask["options"]}).json()
    assert gen["thinking"] == default["message"]["thinking"] and gen["response"] == ""
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "ok", "thinking": "secret"},
               {"role": "user", "content": "again"}]
    assert api(server, "chat", {**ask, "messages": history}).status_code == 200


def test_generate_raw_context_and_load(server):
    body = {"model": "tiny", "prompt": "def add(a, b):", "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 5, "seed": -1}}
    one = api(server, "generate", body).json()
    check_final(one, "tiny")
    assert one["eval_count"] <= 5 and len(one["context"]) == one["prompt_eval_count"] + one["eval_count"]
    chunks = stream(server, "generate", {**body, "stream": True})
    assert "".join(c["response"] for c in chunks) == one["response"] and chunks[-1]["context"] == one["context"]
    assert all(c["done"] is False for c in chunks[:-1]) and "thinking" not in chunks[0]
    follow = api(server, "generate", {**body, "prompt": " return", "context": one["context"]}).json()
    assert follow["prompt_eval_count"] > one["prompt_eval_count"]  # the context came first
    # nothing to generate: Ollama's "load" answer
    assert api(server, "generate", {"model": "tiny"}).json()["done_reason"] == "load"
    loaded = api(server, "chat", {"model": "tiny", "messages": []}).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load" and loaded["message"]["content"] == ""
    # num_ctx below the prompt: refused; above the server's context: capped to it
    assert api(server, "generate", {**body, "options": {"num_ctx": 3}}).status_code == 400
    capped = api(server, "generate", {**body, "options": {"num_ctx": 10**6, "num_predict": 3, "temperature": 0}})
    assert capped.status_code == 200 and capped.json()["eval_count"] <= 3
    # the adapter answers by its name, and differently from the base model
    lora = api(server, "generate", {**body, "model": "a1:latest", "options": {"temperature": 0, "num_predict": 5}})
    assert lora.status_code == 200 and lora.json()["model"] == "a1:latest"
    # a Content-Type other than JSON (as `curl -d` sends) is read as JSON, as Ollama does
    r = httpx.post(f"{server}/api/generate", content=json.dumps(body),
                   headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200 and r.json()["response"] == one["response"]


BAD_REQUESTS = [  # (path, body, status, part of the message)
    ("chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model 'nope' not found"),
    ("generate", {"model": "tiny:7b", "prompt": "x"}, 404, "model 'tiny:7b' not found"),
    ("embed", {"model": "nope", "input": "x"}, 404, "not found"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, 400, "model is required"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "format": "xml"}, 400, "format"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "format": {"type": 5}}, 400, "schema"),
    ("generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": -3}}, 400, "num_predict"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": -100}},
     400, "num_predict"),
    ("generate", {"model": "tiny", "prompt": "x", "options": {"num_ctx": 0}}, 400, "num_ctx"),
    ("generate", {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}, 400, "temperature"),
    ("generate", {"model": "tiny", "prompt": "x", "options": {"temperature": -1}}, 400, "temperature"),
    ("generate", {"model": "tiny", "prompt": "x", "options": {"top_p": 5}}, 400, "top_p"),
    ("generate", {"model": "tiny", "prompt": "x", "options": {"seed": 2**70}}, 400, "seed"),
    ("generate", {"model": "tiny", "prompt": "x", "options": "fast"}, 400, "options"),
    ("generate", {"model": "tiny", "prompt": "x", "stream": "maybe"}, 400, "stream"),
    ("generate", {"model": "tiny", "prompt": "x", "think": "extreme"}, 400, "think"),
    ("generate", {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}, 400, "template"),
    ("generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "insert"),
    ("generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("generate", {"model": "tiny", "prompt": "x", "context": [10**9]}, 400, "token ids"),
    ("chat", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("chat", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "images"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": ["x"]}]}, 400, "content"),
    ("embed", {"model": "tiny", "input": "x", "dimensions": 0}, 400, "dimensions"),
    ("embed", {"model": "a1", "input": "x"}, 400, "base model"),
    ("embed", {"model": "tiny", "input": "word " * 600, "truncate": False}, 400, "context"),
    ("embed", {"model": "tiny", "input": [""]}, 400, "empty"),
    ("embed", {"model": "tiny", "input": 5}, 400, "input"),
    ("show", {}, 400, "model is required"),
    ("pull", {"model": "llama3:8b"}, 404, "registry"),
    ("pull", {"name": 7}, 400, "name"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_ollama_errors(server, path, body, status, message):
    for stream_it in (True, False):  # refused before a stream starts, either way
        r = api(server, path, body if "stream" in body else {**body, "stream": stream_it})
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and message in r.json()["error"], r.text


def test_malformed_bodies_routes_and_sizes(server):
    for content in (b"{not json", b"", b"[1, 2]", b'"text"'):
        r = httpx.post(f"{server}/api/chat", content=content, headers=AUTH, timeout=30)
        assert r.status_code == 400 and set(r.json()) == {"error"}, (content, r.text)
    r = httpx.get(f"{server}/api/nothing", headers=AUTH)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = httpx.get(f"{server}/api/chat", headers=AUTH)
    assert r.status_code == 405 and set(r.json()) == {"error"}
    r = api(server, "generate", {"model": "tiny", "prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413 and set(r.json()) == {"error"}
    assert httpx.get(f"{server}/v1/nothing", headers=AUTH).json() == {"detail": "Not Found"}  # OpenAI side unchanged


def test_embeddings_are_pooled_hidden_states(server, tiny):
    import torch
    from tokenizers import Tokenizer

    folder, model, _, _ = tiny
    texts = ["hello world", "def add(a, b):\n    return a + b"]
    r = api(server, "embed", {"model": "tiny", "input": texts}).json()
    assert r["model"] == "tiny" and len(r["embeddings"]) == 2 and r["prompt_eval_count"] > 0
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, vector in zip(texts, r["embeddings"]):
        assert len(vector) == 64 and math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
        with torch.no_grad():  # the backbone's output: after the final norm, as the LM head sees it
            hidden = model.model(torch.tensor([tok.encode(text).ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        assert torch.nn.functional.cosine_similarity(torch.tensor(vector), expected, dim=0) > 0.9999
    again = api(server, "embed", {"model": "tiny:latest", "input": texts[0]}).json()["embeddings"][0]
    assert again == r["embeddings"][0]  # deterministic
    old = api(server, "embeddings", {"model": "tiny", "prompt": texts[0]}).json()
    assert set(old) == {"embedding"} and old["embedding"] == again
    assert api(server, "embeddings", {"model": "tiny", "prompt": ""}).json() == {"embedding": []}
    cut = api(server, "embed", {"model": "tiny", "input": texts[0], "dimensions": 16}).json()["embeddings"][0]
    assert len(cut) == 16 and math.isclose(math.fsum(x * x for x in cut), 1.0, rel_tol=1e-5)
    long = api(server, "embed", {"model": "tiny", "input": "word " * 600}).json()  # truncated to the context
    assert long["prompt_eval_count"] == 512
    assert api(server, "embed", {"model": "tiny", "input": []}).json()["embeddings"] == []


def test_embeddings_leave_running_requests_alone(server):
    """Embeddings between the steps of a running generation: its greedy text is unchanged and every
    KV block comes back."""
    body = {"model": "tiny", "prompt": "the quick brown fox", "raw": True,
            "options": {"temperature": 0, "num_predict": 60}}
    alone = api(server, "generate", {**body, "stream": False}).json()["response"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(chunks=stream(server, "generate", body)))
    thread.start()
    vectors = [api(server, "embed", {"model": "tiny", "input": f"text {i} " * 40}).json()["embeddings"][0]
               for i in range(6)]
    thread.join(timeout=120)
    assert "".join(c["response"] for c in result["chunks"]) == alone
    assert vectors[0] == api(server, "embed", {"model": "tiny", "input": "text 0 " * 40}).json()["embeddings"][0]
    wait_idle(server)


def test_pull_reports_progress_and_keeps_the_served_model(server):
    source = registry.MODELS[PULLED]
    events = stream(server, "pull", {"model": f"{PULLED}:latest"})
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    layer = events[1]
    assert layer == {"status": f"pulling {source.sha256[:12]}", "digest": f"sha256:{source.sha256}",
                     "total": source.size, "completed": source.size}
    assert any("keeps serving tiny:latest" in s for s in statuses)
    assert api(server, "pull", {"name": PULLED, "stream": False}).json() == {"status": "success"}
    assert [m["name"] for m in api(server, "tags").json()["models"]][0] == "tiny:latest"


def metric_value(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_router_metrics_in_vllm_names(server):
    text = httpx.get(f"{server}/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc"):
        assert f'{name}{{model_name="tiny"}} 0.0' in text, name
    assert "sugam_requests_running 0.0" in text  # sugam's names stay
    seen = {"running": 0.0, "kv": 0.0}
    body = {"model": "tiny", "prompt": "count", "raw": True, "options": {"temperature": 0, "num_predict": 300}}
    with httpx.stream("POST", f"{server}/api/generate", json=body, headers=AUTH, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i % 20 == 5:
                seen["running"] = max(seen["running"], metric_value(server, "vllm:num_requests_running"))
                seen["kv"] = max(seen["kv"], metric_value(server, "vllm:gpu_cache_usage_perc"))
    assert seen["running"] == 1 and 0 < seen["kv"] <= 1
    assert metric_value(server, "vllm:gpu_cache_usage_perc") == metric_value(server, "sugam_kv_cache_usage_ratio")
    wait_idle(server)
    assert metric_value(server, "vllm:num_requests_running") == 0


def never_ending_model(folder):
    """A tiny model that cannot emit an end token: its answers run until a limit stops them."""
    from tokenizers import Tokenizer

    model = build_hf_model(folder, "qwen2", max_position_embeddings=4096)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ends = {model.config.eos_token_id, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")} - {None}
    forbid_tokens(model, ends)
    model.save_pretrained(folder)
    return folder


def test_an_error_mid_stream_is_a_line(tmp_path):
    """Past the request time limit, a stream that already sent its 200 ends with an error line."""
    folder = never_ending_model(tmp_path / "m")
    with running_server(str(folder), "--dtype", "float32", "--request-timeout", "0.3") as (base, _):
        # 4000 tokens take seconds even on a fast machine: the 0.3 s limit always comes first
        body = {"model": folder.name, "prompt": "go", "raw": True, "options": {"temperature": 0, "num_predict": 4000}}
        with httpx.stream("POST", f"{base}/api/generate", json=body, timeout=60) as r:
            assert r.status_code == 200
            r.read()
            lines = ndjson(r)
        assert lines[-1] == {"error": lines[-1]["error"]} and "longer than" in lines[-1]["error"]
        assert all(line.get("done") is False for line in lines[:-1])
        wait_idle(base)


# ---- slow: the real model through the official `ollama` package ------------------------------------

MODEL = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def real():
    import ollama

    with running_server(MODEL, "--api-key", "secret", "--max-model-len", "4096") as (base, _):
        yield base, ollama.Client(host=base, headers={"Authorization": "Bearer secret"})


@pytest.mark.slow
def test_ollama_client_list_show_ps(real):
    import ollama

    base, client = real
    source = registry.MODELS[MODEL]
    (model,) = client.list().models
    assert model.model == f"{MODEL}:latest" and model.size == source.size and model.digest == source.sha256
    assert model.details.family == "qwen2" and model.details.format == "gguf"
    # This GGUF keeps an untied output matrix (630,167,424 weights in its tensors), and its file type
    # (general.file_type 15) is Q4_K_M although most of its matrices are Q5_0: what Ollama shows too.
    assert model.details.parameter_size == "630.17M" and model.details.quantization_level == "Q4_K_M"
    shown = client.show(MODEL)
    assert set(shown.capabilities) == {"completion", "tools", "insert"}  # Qwen2.5-Coder: FIM, no thinking
    assert shown.modelinfo["qwen2.context_length"] == 4096 and shown.modelinfo["qwen2.block_count"] == 24
    assert "<|im_start|>" in shown.template and "temperature" in shown.parameters
    assert client.ps().models[0].model == f"{MODEL}:latest"
    with pytest.raises(ollama.ResponseError) as err:
        client.show("llama3.2")
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=base).list()
    assert err.value.status_code == 401


@pytest.mark.slow
def test_ollama_client_chat_and_generate(real):
    _, client = real
    messages = [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]
    options = {"temperature": 0, "num_predict": 60}
    one = client.chat(model=MODEL, messages=messages, options=options)
    assert "def " in one.message.content and one.done and one.eval_count > 0 and one.done_reason in ("stop", "length")
    parts = list(client.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == one.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].total_duration > 0
    gen = client.generate(model=f"{MODEL}:latest", prompt="Say hello in French, one word.", options=options)
    assert gen.response.strip() and gen.context
    streamed = "".join(p.response for p in client.generate(model=MODEL, prompt="Say hello in French, one word.",
                                                            options=options, stream=True))
    assert streamed == gen.response
    raw = client.generate(model=MODEL, prompt="def fibonacci(n):", raw=True, options={**options, "stop": ["\n\n"]})
    assert raw.response and "\n\n" not in raw.response
    fim = client.generate(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))\n",
                          options={"temperature": 0, "num_predict": 16})
    assert "a + b" in fim.response or "b + a" in fim.response


@pytest.mark.slow
def test_ollama_client_tools_think_and_format(real):
    import jsonschema
    import ollama

    _, client = real
    messages = [{"role": "user", "content": "What's the weather in Paris right now? Use the tool."}]
    r = client.chat(model=MODEL, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 80})
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert "paris" in call.function.arguments["city"].lower()
    messages += [r.message, {"role": "tool", "tool_name": "get_weather", "content": json.dumps({"temp_c": 21})}]
    final = client.chat(model=MODEL, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert "21" in final.message.content

    with pytest.raises(ollama.ResponseError) as err:  # Qwen2.5-Coder does not think: refused, as Ollama does
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], think=True)
    assert err.value.status_code == 400 and "does not support thinking" in err.value.error
    off = client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], think=False,
                      options={"num_predict": 10})
    assert off.message.content and not off.message.thinking

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temps": {
        "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4}},
        "required": ["city", "temps"], "additionalProperties": False}
    r = client.chat(model=MODEL, format=schema, options={"temperature": 0, "num_predict": 120},
                    messages=[{"role": "user", "content": "Give a city and its temperatures this week as JSON."}])
    jsonschema.validate(json.loads(r.message.content), schema)
    r = client.generate(model=MODEL, format="json", prompt="A JSON object with a name and an age.",
                        options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(r.response), dict)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=MODEL, prompt="x", options={"num_predict": -5})
    assert err.value.status_code == 400


@pytest.mark.slow
def test_ollama_client_embed_and_pull(real):
    base, client = real
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.",
             "Quarterly revenue grew five percent on strong cloud demand."]
    r = client.embed(model=MODEL, input=texts)
    vectors = [list(v) for v in r.embeddings]
    assert len(vectors) == 3 and all(len(v) == 896 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)

    def cos(a, b):
        return math.fsum(x * y for x, y in zip(a, b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert list(client.embed(model=MODEL, input=texts[0]).embeddings[0]) == vectors[0]  # deterministic
    assert list(client.embeddings(model=MODEL, prompt=texts[0]).embedding) == vectors[0]

    progress = list(client.pull(MODEL, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.completed == p.total == registry.MODELS[MODEL].size for p in progress)
    assert client.pull(MODEL).status == "success"
    wait_idle(base)
