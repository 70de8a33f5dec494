"""The `sugam` command as a user runs it: real subprocesses, real exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def sugam(*args: str, stdin: str = "", home=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["SUGAM_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "sugam", *args], input=stdin, check=False, capture_output=True,
                          text=True, timeout=300, env=env)


def test_run_streams_and_reports_speed(tiny_models):
    folder = str(tiny_models["qwen2"][0])
    raw = sugam("run", folder, "Hello world", "--raw", "--max-tokens", "6", "--temperature", "0")
    assert raw.returncode == 0, raw.stderr
    assert "tok/s" in raw.stderr and "6 tokens" in raw.stderr
    again = sugam("run", folder, "Hello world", "--raw", "--max-tokens", "6", "--temperature", "0")
    assert again.stdout == raw.stdout and raw.stdout.strip()
    chat = sugam("run", folder, "Hello world", "--system", "be brief", "--max-tokens", "6", "--seed", "1")
    assert chat.returncode == 0 and "prompt tokens" in chat.stderr


def test_chat_repl_keeps_history_and_resets(tiny_models):
    folder = str(tiny_models["qwen2"][0])
    out = sugam("chat", folder, "--max-tokens", "4", "--temperature", "0",
                stdin="hello\nand again\n/reset\nhello\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("prompt tokens") == 3
    prompt_sizes = [int(line.split()[0].strip("[")) for line in out.stderr.splitlines() if "prompt tokens" in line]
    assert prompt_sizes[1] > prompt_sizes[0]      # the second turn carries the first
    assert prompt_sizes[2] == prompt_sizes[0]     # /reset forgot it
    assert "conversation cleared" in out.stderr


@pytest.mark.parametrize("args,needle", [
    (("run", "no-such-model", "hi"), "unknown model 'no-such-model'"),
    (("pull", "no-such-model"), "qwen2.5-coder-0.5b-instruct"),
])
def test_user_errors_are_one_line(args, needle, tmp_path):
    out = sugam(*args, home=tmp_path)
    assert out.returncode == 1
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_corrupted_gguf_is_named_in_the_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 10)
    out = sugam("run", str(bad), "hi")
    assert out.returncode == 1 and "broken.gguf" in out.stderr and "Traceback" not in out.stderr


def test_models_lists_the_cache(tmp_path):
    out = sugam("models", home=tmp_path)
    assert out.returncode == 0 and "no models" in out.stdout
    known = sugam("models", "--known", home=tmp_path)
    assert "smollm2-135m-instruct" in known.stdout


def test_pull_takes_local_paths_and_hub_ids(tmp_path):
    model = tmp_path / "local.gguf"
    model.write_bytes(b"GGUF")
    out = sugam("pull", str(model), home=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == str(model), out.stderr
    assert "nothing to download" in out.stderr and "not a file" not in out.stderr
    env_offline = dict(os.environ, HF_HUB_OFFLINE="1", SUGAM_HOME=str(tmp_path))
    hub = subprocess.run([sys.executable, "-m", "sugam", "pull", "hf:acme/missing"], check=False,
                         capture_output=True, text=True, timeout=300, env=env_offline)
    assert hub.returncode == 1 and "hf:acme/missing: not found" in hub.stderr, hub.stderr
    assert "use hf:ORG/NAME" not in hub.stderr and "Traceback" not in hub.stderr


def test_a_corrupted_gguf_is_one_line_naming_the_file_and_field(tmp_path):
    import struct

    from conftest import train_tokenizer
    from gguf_layout import KV, read_layout, tiny_gguf, write_layout

    layout = read_layout(tiny_gguf(tmp_path / "good.gguf", train_tokenizer()).read_bytes())
    layout.kvs = [KV(kv.key, 4, struct.pack("<I", 0)) if kv.key == "qwen2.attention.head_count" else kv
                  for kv in layout.kvs]
    bad = tmp_path / "heads.gguf"
    bad.write_bytes(write_layout(layout))
    out = sugam("run", str(bad), "hi")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert str(bad) in lines[0] and "attention.head_count must be a positive integer" in lines[0]
