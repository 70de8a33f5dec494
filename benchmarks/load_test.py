"""A bounded load test of a running `sugam serve`: concurrent streaming clients, some of which hang up.

    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 [--clients 32 --rounds 3]

Each round starts `clients` streaming chat requests at once; a share of them disconnect after a
few chunks. It checks what a server must never do under load: answer 5xx, send a malformed or
unterminated stream, keep KV blocks after the round, or grow its memory from round to round.
Prints and (with --out) writes requests, output tok/s and TTFT percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

QUESTIONS = ["Write a haiku about {}.", "Explain {} in two sentences.", "Give three facts about {}.",
             "Write a Python function related to {}."]
TOPICS = ["rivers", "compilers", "tea", "prime numbers", "sorting", "the moon", "bicycles", "HTTP"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def server_rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await client.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, rng: random.Random, max_tokens: int,
                      disconnect: bool) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS).format(rng.choice(TOPICS))}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(10**6), "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result: dict[str, Any] = {"status": None, "ttft": None, "tokens": 0, "well_formed": False, "disconnected": disconnect}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        result["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return result
        chunks, done = 0, False
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                return result
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                result["error"] = event["error"]
                continue
            if event.get("usage"):
                result["tokens"] = event["usage"]["completion_tokens"]
            delta = event["choices"][0]["delta"] if event.get("choices") else {}
            if result["ttft"] is None and (delta.get("content") or delta.get("reasoning_content")):
                result["ttft"] = time.perf_counter() - start
            chunks += 1
            if disconnect and chunks >= 4:
                return result  # leaving the context manager closes the connection mid-stream
        result["well_formed"] = done and "error" not in result
    result["seconds"] = time.perf_counter() - start
    return result


async def run(url: str, clients: int, rounds: int, max_tokens: int, disconnect_share: float, api_key: str | None,
              pid: int | None, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    report: dict[str, Any] = {"clients": clients, "rounds": rounds, "max_tokens": max_tokens, "rounds_detail": []}
    all_results = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        for round_no in range(rounds):
            start = time.perf_counter()
            tasks = [one_request(client, url, headers, rng, max_tokens, rng.random() < disconnect_share)
                     for _ in range(clients)]
            results = await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
            for _ in range(100):  # aborted requests are freed between engine steps
                if await metric(client, url, "sugam_kv_cache_usage_ratio") == 0 and \
                        await metric(client, url, "sugam_requests_running") == 0:
                    break
                await asyncio.sleep(0.1)
            kv = await metric(client, url, "sugam_kv_cache_usage_ratio")
            completed = [r for r in results if not r["disconnected"] and r["status"] == 200]
            report["rounds_detail"].append({
                "round": round_no, "seconds": round(elapsed, 2),
                "statuses": {str(s): sum(1 for r in results if r["status"] == s) for s in {r["status"] for r in results}},
                "completed": len(completed), "well_formed": sum(r["well_formed"] for r in completed),
                "output_tokens": sum(r["tokens"] for r in completed),
                "output_tok_s": round(sum(r["tokens"] for r in completed) / elapsed, 2),
                "kv_usage_after": kv, "server_rss_mb": (server_rss_bytes(pid) or 0) / 2**20})
            all_results += results
            print(report["rounds_detail"][-1], flush=True)
    ttfts = [r["ttft"] for r in all_results if r["ttft"] is not None and not r["disconnected"]]
    report["requests"] = len(all_results)
    report["server_errors"] = sum(1 for r in all_results if (r["status"] or 0) >= 500)
    report["malformed_streams"] = sum(1 for r in all_results if not r["disconnected"] and r["status"] == 200
                                      and not r["well_formed"])
    report["ttft_p50_s"] = round(_pct(ttfts, 0.5), 3)
    report["ttft_p90_s"] = round(_pct(ttfts, 0.9), 3)
    report["output_tok_s_median"] = statistics.median(r["output_tok_s"] for r in report["rounds_detail"])
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--disconnect-share", type=float, default=0.25)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--pid", type=int, default=None, help="server process id, to track its RSS")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("load tests only target this machine (loopback addresses)")
    report = asyncio.run(run(args.url, args.clients, args.rounds, args.max_tokens, args.disconnect_share,
                             args.api_key, args.pid))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds_detail"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
