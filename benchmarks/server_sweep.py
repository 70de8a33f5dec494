"""Servers under load, side by side: sugam serve and llama-server on the same GGUF, the same prompts.

    .venv/bin/python benchmarks/server_sweep.py --engines sugam-avx2 llama-server \\
        --llama-server PEERS/llama.cpp/build-avx2/bin/llama-server [--model qwen2.5-coder-0.5b-instruct]

For each engine (started here, one at a time, 2 threads, measured alone on the machine) and each
concurrency level (1/4/8/16/32 by default): that many streaming /v1/completions requests at once,
each a different 128-token prompt (token ids, so both servers read the same tokens) and 128 output
tokens with EOS ignored and no prompt cache. Aggregate output tok/s (all tokens / wall time of the
level) and time to first token (p50, p90). Engines: sugam (the CPU's own path), sugam-avx2 (what an AVX2
CPU runs: sugam's AVX2 kernels, fp32, PyTorch held to AVX2), llama-server (`-np 32 -c 32768 -t 2
--cont-batching`; build it as ../shared/peers/llama-cpp.md says). Writes
benchmarks/results/server-sweep-MODEL[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
_AVX2 = {"SUGAM_NATIVE_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
         "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def server_command(engine: str, path: str, port: int, llama_server: str, slots: int) -> tuple[list[str], dict]:
    if engine == "llama-server":
        return [llama_server, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c",
                str(1024 * slots), "-t", "2", "--cont-batching", "--no-webui"], {}
    cmd = [str(ROOT / ".venv" / "bin" / "sugam"), "serve", path, "--port", str(port), "--threads", "2",
           "--no-prefix-caching", "--max-num-seqs", str(slots)]
    if engine == "sugam-avx2":  # an explicit float32 asks for dense weights unless gguf is named
        return cmd + ["--dtype", "float32", "--quantization", "gguf"], _AVX2
    return cmd, {}


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, ids: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "cache_prompt": False, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": (first or time.perf_counter()) - start, "tokens": tokens,
            "prompt_tokens": usage["prompt_tokens"] if usage else None}


async def level(url: str, batch: list[list[int]], max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, model, ids, max_tokens) for ids in batch))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": len(batch), "seconds": wall, "output_tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "prompt_tokens": [r["prompt_tokens"] for r in results][:1]}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--engines", nargs="+", default=["sugam", "llama-server"])
    ap.add_argument("--llama-server", default="")
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from sugam.hardware import cpu_label
    from sugam.registry import pull, resolve

    path = str(pull(args.model) if not Path(args.model).exists() else resolve(args.model))
    slots = max(args.levels)
    results: dict[str, list[dict]] = {}
    for engine in args.engines:
        cmd, env = server_command(engine, path, args.port, args.llama_server, slots)
        proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="2", **env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_ready(url, proc)
            asyncio.run(level(url, prompts(2, args.prompt_tokens, seed=99), 8))  # warm-up
            rows = []
            for i, clients in enumerate(args.levels):
                row = asyncio.run(level(url, prompts(clients, args.prompt_tokens, seed=i), args.max_tokens))
                print(engine, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                rows.append(row)
            results[engine] = rows
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    cpu = cpu_label()
    base = results.get("llama-server")
    table = [f"# Servers under load: {args.model}, {cpu}, 2 threads; {args.prompt_tokens}-token prompts (unique), "
             f"{args.max_tokens} output tokens each, EOS ignored, no prompt cache", "",
             "| engine | clients | output tok/s | × llama-server | TTFT p50 s | × llama-server | TTFT p90 s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for engine, rows in results.items():
        for i, r in enumerate(rows):
            b = base[i] if base else None
            ratio_t = f"{r['tok_s'] / b['tok_s']:.2f}" if b else "–"
            ratio_f = f"{r['ttft_p50_s'] / b['ttft_p50_s']:.2f}" if b else "–"
            table.append(f"| {engine} | {r['clients']} | {r['tok_s']:.1f} | {ratio_t} | {r['ttft_p50_s']:.2f} | "
                         f"{ratio_f} | {r['ttft_p90_s']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    name = (Path(args.model).stem if Path(args.model).exists() else args.model) + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"server-sweep-{name}.json").write_text(json.dumps({"model": args.model, "cpu": cpu, "engines": results},
                                                                  indent=2) + "\n")
    (RESULTS / f"server-sweep-{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
