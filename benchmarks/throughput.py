"""Aggregate throughput at several concurrencies, and time-to-first-token with a cached vs cold prefix.

    .venv/bin/python benchmarks/throughput.py [--model ALIAS] [--num-requests 64] [--concurrency 1 8 32]

Every concurrency level runs the same requests (random prompts of 128-512 tokens, 128 output tokens
each, EOS ignored) in the same process, so the ratios between them are what to read. Results go to
benchmarks/results/throughput-MODEL[-QUANTIZATION].json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from sugam import LLM, SamplingParams

RESULTS = Path(__file__).parent / "results"


def random_prompts(n: int, lo: int, hi: int, seed: int, vocab: tuple[int, int] = (1000, 30000)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_batch(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def time_to_first_token(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    for _ in llm.stream_outputs(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)):
        break
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[128, 512])
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="TTFT measurements per case (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantization", default="auto", help="weights in memory (see docs/QUANTIZATION.md)")
    args = ap.parse_args()

    prompts = random_prompts(args.num_requests, *args.prompt_len, args.seed)
    runs = []
    for c in args.concurrency:
        llm = LLM(args.model, max_num_seqs=c, enable_prefix_caching=False, quantization=args.quantization)
        run_batch(llm, prompts[:2], 4)  # warm-up
        elapsed, tokens = run_batch(llm, prompts, args.output_len)
        runs.append({"concurrency": c, "seconds": round(elapsed, 2), "output_tokens": tokens,
                     "output_tok_s": round(tokens / elapsed, 2)})
        print(runs[-1], flush=True)
        del llm
    base = runs[0]["output_tok_s"]
    for r in runs:
        r["ratio_vs_first"] = round(r["output_tok_s"] / base, 2)

    # Decode-bound, as llama-batched-bench's generation figure: the largest concurrency, every
    # request a 16-token prompt, so that the time is nearly all batched decode steps.
    c = max(args.concurrency)
    llm = LLM(args.model, max_num_seqs=c, enable_prefix_caching=False, quantization=args.quantization)
    short = random_prompts(c, 16, 16, args.seed + 3)
    run_batch(llm, short[:2], 4)
    elapsed, tokens = run_batch(llm, short, args.output_len)
    decode_bound = {"concurrency": c, "prompt_len": 16, "seconds": round(elapsed, 2), "output_tokens": tokens,
                    "output_tok_s": round(tokens / elapsed, 2)}
    print(decode_bound, flush=True)
    del llm

    prefix = random_prompts(1, args.prefix_len, args.prefix_len, args.seed + 1)[0]
    suffixes = random_prompts(args.repeats + 1, 16, 16, args.seed + 2)
    cold_llm = LLM(args.model, enable_prefix_caching=False, quantization=args.quantization)
    time_to_first_token(cold_llm, suffixes[0])  # warm-up
    cold = [time_to_first_token(cold_llm, prefix + s) for s in suffixes[1:]]
    del cold_llm
    warm_llm = LLM(args.model, quantization=args.quantization)
    time_to_first_token(warm_llm, prefix + suffixes[0])  # fills the prefix cache
    cached = [time_to_first_token(warm_llm, prefix + s) for s in suffixes[1:]]
    ttft = {"prefix_tokens": args.prefix_len, "cold_s": round(statistics.median(cold), 3),
            "cached_s": round(statistics.median(cached), 3)}
    ttft["cached_over_cold"] = round(ttft["cached_s"] / ttft["cold_s"], 3)
    print(ttft, flush=True)

    result = {"model": args.model, "quantization": args.quantization, "num_requests": args.num_requests, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "throughput": runs, "decode_bound": decode_bound, "ttft": ttft}
    RESULTS.mkdir(exist_ok=True)
    name = Path(args.model).stem if Path(args.model).exists() else args.model
    stem = f"throughput-{name}" + ("" if args.quantization == "auto" else f"-{args.quantization}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Throughput: {args.model} (--quantization {args.quantization}), {args.num_requests} requests, prompts {args.prompt_len[0]}-"
             f"{args.prompt_len[1]} tokens, {args.output_len} output tokens", "",
             f"| concurrency | seconds | output tok/s | × concurrency {args.concurrency[0]} |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['seconds']} | {r['output_tok_s']} | {r['ratio_vs_first']} |" for r in runs]
    lines += ["", f"Decode-bound: {decode_bound['concurrency']} concurrent requests with 16-token prompts and "
              f"{args.output_len} output tokens each: {decode_bound['output_tok_s']} output tok/s."]
    lines += ["", f"Time to first token with a {args.prefix_len}-token prefix (median of {args.repeats}): "
              f"cold {ttft['cold_s']} s, cached {ttft['cached_s']} s ({ttft['cached_over_cold']:.0%} of cold)."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
