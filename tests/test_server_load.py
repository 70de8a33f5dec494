"""Bounded load test and API fuzzing against a real server process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from conftest import build_hf_model
from server_harness import running_server

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from load_test import run  # noqa: E402


def test_load_with_disconnects_tiny_model(tmp_path):
    build_hf_model(tmp_path / "m", "qwen2")
    with running_server(str(tmp_path / "m"), "--dtype", "float32") as (base, proc):
        report = asyncio.run(run(base, clients=32, rounds=4, max_tokens=48, disconnect_share=0.3,
                                 api_key=None, pid=proc.pid))
    assert report["server_errors"] == 0 and report["malformed_streams"] == 0
    rounds = report["rounds_detail"]
    assert all(r["kv_usage_after"] == 0 for r in rounds)
    assert all(r["completed"] == r["well_formed"] > 0 for r in rounds)
    # memory settles after the first round instead of growing with traffic
    rss = [r["server_rss_mb"] for r in rounds]
    assert rss[-1] <= rss[1] * 1.10 + 20, rss


def test_fuzzing_the_api_finds_no_server_error(tmp_path):
    """schemathesis generates requests from the server's own OpenAPI schema, valid and not."""
    import os
    import shutil
    import subprocess

    st = shutil.which("st", path=os.path.dirname(sys.executable))
    assert st, "schemathesis is a test dependency"
    build_hf_model(tmp_path / "m", "qwen2")
    with running_server(str(tmp_path / "m"), "--dtype", "float32", "--api-key", "k") as (base, proc):
        out = subprocess.run([st, "run", f"{base}/openapi.json", "-H", "Authorization: Bearer k",
                              "--checks", "not_a_server_error", "--max-examples", "60", "--seed", "1234",
                              "--no-color"], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:]
        assert proc.poll() is None  # still serving
