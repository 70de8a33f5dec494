"""Decode deep into the context: sugam with each KV cache format vs llama-bench -d, same run.

    .venv/bin/python benchmarks/depth.py [--model qwen2.5-coder-0.5b-instruct] [--depths 0 4096 8192]
        [--kv auto bf16 int8] [--llama-bench PATH] [--tag T]

Each configuration in its own process (2 threads): for every depth D, a random D-token prompt is
prefilled, then 64 tokens are decoded greedily (EOS ignored): decode tok/s, median of the tokens'
rate after the first, and the prefill's tok/s (prompt in, first token out). llama-bench runs
`-p 0 -n 64 -d D` and `-p D -n 0` on the same file. Beside each number, the
bytes a token reads (weights + K/V at that depth in that format) and the roofline they allow at the
machine's measured bandwidth (a torch sum over 2 GiB, 2 threads, sampled before each engine).
Writes benchmarks/results/depth-MODEL[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DECODE = 64


def child(model: str, kv: str, depths: list[int]) -> dict:
    from sugam import LLM, SamplingParams
    from sugam.hardware import cpu_label

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import _sugam_bytes_read_per_token

    llm = LLM(model, max_model_len=max(depths) + DECODE + 16, kv_cache_dtype=kv, enable_prefix_caching=False)
    runner = llm.engine.runner
    cache = runner.kv_caches[0]
    kv_bytes_per_token = len(runner.kv_caches) * sum(
        t.element_size() * t[0, 0].numel() for t in (cache.keys, cache.values, cache.key_scales, cache.value_scales)
        if t is not None)
    out = {"cpu": cpu_label(), "compute_dtype": str(runner.dtype).removeprefix("torch."),
           "cache_dtype": str(cache.keys.dtype).removeprefix("torch."), "weight_bytes": _sugam_bytes_read_per_token(runner.model),
           "kv_bytes_per_token": kv_bytes_per_token,
           "kv_elements_per_token": len(runner.kv_caches) * 2 * cache.keys[0, 0].numel(), "depths": {}}
    rng = random.Random(0)
    for depth in depths:
        prompt = [rng.randrange(1000, 100000) for _ in range(max(depth, 1))]
        times = []
        start = time.perf_counter()
        for _ in llm.stream_outputs(prompt, SamplingParams(temperature=0, max_tokens=DECODE, ignore_eos=True)):
            times.append(time.perf_counter())
        gaps = [b - a for a, b in zip(times, times[1:])]
        prefill_s = times[0] - start  # the prompt and the first token: time to first token
        out["depths"][str(depth)] = {"decode_tok_s": 1 / statistics.median(gaps), "prefill_s": prefill_s,
                                     "prefill_tok_s": depth / prefill_s}
        print(kv, depth, out["depths"][str(depth)], file=sys.stderr, flush=True)
    return out


def llama_bench(binary: str, path: str, depths: list[int]) -> dict:
    """Decode of 64 tokens after -d D tokens (2 repetitions), and prompt processing of D tokens (pp D)."""
    def run(*flags: str) -> list[dict]:
        out = subprocess.run([binary, "-m", path, *flags, "-t", "2", "-o", "json"], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    result = {"depths": {str(r["n_depth"]): {"decode_tok_s": statistics.median(r["samples_ts"])}
                         for r in run("-p", "0", "-n", str(DECODE), "-d", ",".join(map(str, depths)), "-r", "2")}}
    prompts = [d for d in depths if d > 0]
    if prompts:
        for r in run("-p", ",".join(map(str, prompts)), "-n", "0", "-r", "1"):
            result["depths"][str(r["n_prompt"])]["prefill_tok_s"] = statistics.median(r["samples_ts"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096, 8192])
    ap.add_argument("--kv", nargs="+", default=["auto", "bf16", "int8"])
    ap.add_argument("--llama-bench", default="")
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", nargs=2, metavar=("KV", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(args.model, args.child[0], args.depths)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import machine_bandwidth_samples

    from sugam.registry import resolve

    env = dict(os.environ, OMP_NUM_THREADS="2")
    bandwidth: list[float] = []
    results: dict[str, dict] = {}
    for kv in args.kv:
        bandwidth += machine_bandwidth_samples(2, 2)
        out = RESULTS / f".depth-{kv}.json"
        subprocess.run([sys.executable, __file__, "--model", args.model, "--depths", *map(str, args.depths),
                        "--child", kv, str(out)], env=env, check=True)
        results[f"sugam kv {kv}"] = json.loads(out.read_text())
        out.unlink()
    if args.llama_bench:
        bandwidth += machine_bandwidth_samples(2, 2)
        results["llama.cpp (f16 K/V)"] = llama_bench(args.llama_bench, str(resolve(args.model)), args.depths)
    bw = statistics.median(bandwidth)
    first = next(iter(results.values()))
    weights = first["weight_bytes"]
    lines = [f"# Decode at depth: {args.model}, {first['cpu']}, compute {first['compute_dtype']}, 2 threads, "
             f"machine bandwidth {bw:.1f} GB/s (median of {len(bandwidth)} probes)", "",
             "| engine | K/V format | depth | decode tok/s | × llama.cpp | bytes a token reads | roofline tok/s | share of roofline |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    llama = results.get("llama.cpp (f16 K/V)")
    for name, r in results.items():
        for depth in map(str, args.depths):
            tok_s = r["depths"][depth]["decode_tok_s"]
            if "kv_bytes_per_token" in r:
                fmt, per = r["cache_dtype"], r["kv_bytes_per_token"]
            else:  # llama.cpp's default cache: f16 K and V, the same shapes as sugam's
                fmt, per = "f16", first["kv_elements_per_token"] * 2
            read = weights + per * int(depth)
            roof = bw * 1e9 / read
            ratio = f"{tok_s / llama['depths'][depth]['decode_tok_s']:.2f}" if llama and name != "llama.cpp (f16 K/V)" else "–"
            lines.append(f"| {name} | {fmt} | {depth} | {tok_s:.1f} | {ratio} | {read / 1e6:.0f} MB | {roof:.0f} | "
                         f"{tok_s / roof:.0%} |")
    lines += ["", "Bytes a token reads: sugam's weights (without the input embedding) plus K/V of every layer at "
              "that depth in the format named; llama.cpp's row assumes the same weight bytes."]
    if llama and any("prefill_tok_s" in v for v in llama["depths"].values()):
        lines += ["", "Prefill of a D-token prompt (sugam: prompt in, first token out, chunked as the engine "
                  "schedules it; llama.cpp: llama-bench pp D):", "",
                  "| engine | K/V format | prompt tokens | prefill tok/s | × llama.cpp |", "|---|---|---:|---:|---:|"]
        for name, r in results.items():
            for depth in (str(d) for d in args.depths if d > 0):
                tok_s = r["depths"][depth].get("prefill_tok_s")
                if tok_s is None:
                    continue
                fmt = r.get("cache_dtype", "f16")
                ratio = f"{tok_s / llama['depths'][depth]['prefill_tok_s']:.2f}" if name != "llama.cpp (f16 K/V)" else "–"
                lines.append(f"| {name} | {fmt} | {depth} | {tok_s:.0f} | {ratio} |")
    stem = f"depth-{args.model}" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"bandwidth_gb_s": bw, "results": results}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
