"""LoRA adapters through the server and the CLI, as real processes: /v1/models lists them, a request's
`model` picks one (the same greedy text as the Python API with that adapter), vLLM's runtime
load/unload endpoints and their refusals, the vllm:lora_requests_info metric, and `--lora` on
run / chat / serve."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from server_harness import running_server, sse_events
from test_cli import sugam
from test_lora import make_peft_adapter

from sugam import LLM, LoRARequest, SamplingParams
from sugam.serve.chat import ReplyFormat

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 8]
MESSAGES = [{"role": "user", "content": "hello"}]
STEPS = 10


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """Adapters for the tiny qwen2 model: a1, a2 (rank 4), big (rank 32), and one made for qwen3
    (other head_dim: wrong shapes for qwen2)."""
    root = tmp_path_factory.mktemp("loras")
    _, qwen2 = tiny_models["qwen2"]
    make_peft_adapter(qwen2, root / "a1", seed=1)
    make_peft_adapter(qwen2, root / "a2", seed=2)
    make_peft_adapter(qwen2, root / "big", seed=3, rank=32)
    make_peft_adapter(tiny_models["qwen3"][1], root / "qwen3", seed=4)
    return root


@pytest.fixture(scope="module")
def expected(tiny_models, adapters):
    """Greedy completions and chat answers of the Python API: the base, a1 and a2."""
    llm = LLM(str(tiny_models["qwen2"][0]), dtype="float32", enable_lora=True)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    out = {}
    for name, lora in (("base", None), ("a1", LoRARequest("a1", 1, str(adapters / "a1"))),
                       ("a2", LoRARequest("a2", 2, str(adapters / "a2")))):
        text = llm.generate([PROMPT], params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
        answer = llm.chat(MESSAGES, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
        out[name] = (text, ReplyFormat().split(answer))
    assert len({text for text, _ in out.values()}) == 3  # each adapter changes the answer, so the tests can fail
    return out


@pytest.fixture(scope="module")
def server(tiny_models, adapters):
    with running_server(str(tiny_models["qwen2"][0]), "--api-key", KEY, "--dtype", "float32",
                        "--served-model-name", "tiny", "--lora", f"a1={adapters / 'a1'}",
                        "--lora", f"a2={adapters / 'a2'}", "--max-lora-rank", "8", "--allow-runtime-lora") as (base, _):
        yield base


def post(base, path, body, headers=AUTH):
    return httpx.post(f"{base}/v1/{path}", json=body, headers=headers, timeout=120)


def complete(base, model, **extra):
    return post(base, "completions", {"model": model, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0,
                                      "ignore_eos": True, **extra})


def model_ids(base):
    return [m["id"] for m in httpx.get(f"{base}/v1/models", headers=AUTH, timeout=10).json()["data"]]


def test_models_lists_the_adapters_with_their_parent(server, adapters):
    data = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in data] == ["tiny", "a1", "a2"]
    assert data[0]["parent"] is None and data[0]["max_model_len"] > 0
    for model, name in zip(data[1:], ("a1", "a2")):
        assert model == {"id": name, "object": "model", "created": 0, "owned_by": "sugam",
                         "root": str((adapters / name).resolve()), "parent": "tiny"}


def test_model_picks_the_adapter(server, expected):
    for model, name in (("tiny", "base"), (None, "base"), ("a1", "a1"), ("a2", "a2")):
        r = complete(server, model)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[name][0], model
        assert r.json()["model"] == (model or "tiny")
        r = post(server, "chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": STEPS,
                                              "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["content"] == expected[name][1].content, model
        assert message.get("reasoning_content") == expected[name][1].reasoning


def test_streaming_with_an_adapter(server, expected):
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "a2", "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all(e["model"] == "a2" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected["a2"][0]
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "a1", "messages": MESSAGES, "max_tokens": STEPS, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        chunks = sse_events(r)[:-1]
    assert {c["model"] for c in chunks} == {"a1"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected["a1"][1].content


def test_unknown_model_is_404(server):
    for path, body in (("completions", {"prompt": "hi"}), ("chat/completions", {"messages": MESSAGES})):
        r = post(server, path, {"model": "nope", **body})
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "'nope'" in error["message"] and "'a1'" in error["message"]


def test_load_and_unload_at_runtime(server, adapters, expected):
    r = post(server, "load_lora_adapter", {"lora_name": "again", "lora_path": str(adapters / "a1")})
    assert r.status_code == 200 and "again" in r.text, r.text
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"]}
    assert models["again"]["parent"] == "tiny" and models["again"]["root"] == str(adapters / "a1")
    assert complete(server, "again").json()["choices"][0]["text"] == expected["a1"][0]  # a1's weights, a new name

    r = post(server, "load_lora_adapter", {"lora_name": "again", "lora_path": str(adapters / "a2")})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]

    r = post(server, "unload_lora_adapter", {"lora_name": "again"})
    assert r.status_code == 200 and "again" in r.text
    assert "again" not in model_ids(server)
    assert complete(server, "again").status_code == 404
    r = post(server, "unload_lora_adapter", {"lora_name": "again"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert complete(server, "a1").json()["choices"][0]["text"] == expected["a1"][0]  # the others are untouched


@pytest.mark.parametrize("name,path,reason", [
    ("big", "big", "rank 32 is above the limit --max-lora-rank 8"),
    ("shapes", "qwen3", "do not fit the model's"),
    ("missing", "no-such-adapter", "no adapter at"),
    ("tiny", "a1", "the base model's name"),
])
def test_bad_loads_are_400_with_the_reason(server, adapters, name, path, reason):
    r = post(server, "load_lora_adapter", {"lora_name": name, "lora_path": str(adapters / path)})
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"]
    assert model_ids(server) == ["tiny", "a1", "a2"]  # nothing half-loaded
    if name != "tiny":
        assert complete(server, name).status_code == 404


def test_bad_bodies_are_400(server):
    assert post(server, "load_lora_adapter", {"lora_name": "x"}).status_code == 400
    assert post(server, "load_lora_adapter", {"lora_name": "", "lora_path": "/x"}).status_code == 400
    assert post(server, "unload_lora_adapter", {}).status_code == 400


def test_the_api_key_guards_the_endpoints(server, adapters):
    body = {"lora_name": "sneaky", "lora_path": str(adapters / "a1")}
    for path in ("load_lora_adapter", "unload_lora_adapter"):
        r = post(server, path, body, headers={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "sneaky" not in model_ids(server)


def lora_info(base):
    lines = [line for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
             if line.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1, lines
    labels = dict(re.findall(r'(\w+)="([^"]*)"', lines[0]))
    return labels, float(lines[0].rsplit(" ", 1)[1])


def test_metrics_report_the_adapters_in_use(server):
    labels, value = lora_info(server)
    assert labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(value - time.time()) < 60  # vLLM's value: when it was set
    assert "sugam_requests_running" in httpx.get(f"{server}/metrics").text  # the usual metrics stay

    done = threading.Event()

    def long_request():
        try:
            post(server, "completions", {"model": "a2", "prompt": PROMPT, "max_tokens": 480, "temperature": 0,
                                         "ignore_eos": True})
        finally:
            done.set()

    threading.Thread(target=long_request, daemon=True).start()
    seen = set()
    while not done.is_set():
        labels, _ = lora_info(server)
        seen.add(labels["running_lora_adapters"])
        time.sleep(0.02)
    assert "a2" in seen


def test_runtime_endpoints_are_off_unless_allowed(tiny_models, adapters, monkeypatch):
    body = {"lora_name": "a1", "lora_path": str(adapters / "a1")}
    with running_server(str(tiny_models["qwen2"][0]), "--dtype", "float32", "--enable-lora") as (base, _):
        for path in ("load_lora_adapter", "unload_lora_adapter"):
            r = post(base, path, body)
            assert r.status_code == 404 and "--allow-runtime-lora" in r.json()["error"]["message"]
        assert "vllm:lora_requests_info{" in httpx.get(f"{base}/metrics").text
    # Allowed (here by vLLM-style environment variable) but LoRA off: 400 saying how to turn it on.
    monkeypatch.setenv("SUGAM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    with running_server(str(tiny_models["qwen2"][0]), "--dtype", "float32") as (base, _):
        r = post(base, "load_lora_adapter", body)
        assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
        assert post(base, "completions", {"model": "a1", "prompt": "hi"}).status_code == 404
        assert "vllm:lora_requests_info" not in httpx.get(f"{base}/metrics").text


# ---- the CLI ------------------------------------------------------------------------------------

def test_run_and_chat_with_lora(tiny_models, adapters):
    folder = str(tiny_models["qwen2"][0])
    args = ("run", folder, "Hello world", "--raw", "--max-tokens", "8", "--temperature", "0", "--dtype", "float32")
    base = sugam(*args)
    tuned = sugam(*args, "--lora", str(adapters / "a1"))
    assert base.returncode == 0 and tuned.returncode == 0, tuned.stderr
    assert "LoRA a1 (rank 4)" in tuned.stderr and "8 tokens" in tuned.stderr
    assert tuned.stdout.strip() and tuned.stdout != base.stdout
    chat = sugam("chat", folder, "--max-tokens", "4", "--temperature", "0", "--lora", str(adapters / "a2"),
                 stdin="hello\n/exit\n")
    assert chat.returncode == 0 and "LoRA a2" in chat.stderr and "prompt tokens" in chat.stderr, chat.stderr


@pytest.mark.parametrize("args,needle", [
    (("run", "{model}", "hi", "--lora", "{root}/no-such-adapter"), "no adapter at"),
    (("run", "{model}", "hi", "--lora", "{root}/big", "--max-lora-rank", "8"), "rank 32 is above the limit"),
    (("run", "{model}", "hi", "--lora", "{root}/qwen3"), "do not fit the model's"),
    (("serve", "{model}", "--lora", "x={root}/no-such-adapter"), "no adapter at"),
    (("serve", "{model}", "--lora", "big={root}/big"), "--lora big="),
    (("serve", "{model}", "--lora", "a={root}/a1", "--lora", "a={root}/a2"), "given twice"),
])
def test_bad_lora_is_one_line_and_exits_1(tiny_models, adapters, args, needle):
    fill = {"model": str(tiny_models["qwen2"][0]), "root": str(adapters)}
    out = sugam(*(a.format(**fill) for a in args), "--port", "1") if args[0] == "serve" else \
        sugam(*(a.format(**fill) for a in args))
    assert out.returncode == 1, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
