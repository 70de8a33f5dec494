"""Starts a real `sugam serve` process on a free loopback port (test helper)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
from polling import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, *args: str, timeout: float = 240.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yields (base URL, process) once /health answers 200; stops the server afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sugam", "serve", model, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric(base: str, name: str) -> float:
    """The value of one unlabelled metric from /metrics."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_idle(base: str, timeout: float = 30.0) -> None:
    """Until no request runs or waits and no KV block is in use (aborts land between steps)."""
    wait_until(lambda: (metric(base, "sugam_requests_running") == 0 and metric(base, "sugam_requests_waiting") == 0
                        and metric(base, "sugam_kv_cache_usage_ratio") == 0),
               "the server returns to idle (else a request or KV block leaked)", timeout=timeout, interval=0.2)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """Parse an SSE stream fully; checks the framing as it goes."""
    import json

    events: list[dict | str] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
