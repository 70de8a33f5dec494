"""Tensor parallelism on this machine: tp=1 (one process, all cores) vs tp=2 (two gloo processes,
one core each) decoding the same greedy requests, and the time the all-reduces take per token.
Each configuration runs in a fresh process, in turns, for --rounds rounds; medians are reported.

    .venv/bin/python benchmarks/tensor_parallel.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 3]

On a 2-core machine two ranks mostly measure what splitting costs (two all-reduces a layer over
loopback, half the threads per matrix), not what it gains: tensor parallelism pays where one device
cannot hold the model or its memory bandwidth is the limit, and ranks are separate sockets or GPUs.
Writes benchmarks/results/tensor-parallel-MODEL.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ["recursion", "a hash map", "binary search", "a mutex", "JSON", "Docker", "unit tests", "caching"]


def measure(model: str, tp: int, max_tokens: int) -> dict:
    from sugam import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, max_model_len=2048)
    prompts = [llm.chat_prompt([{"role": "user", "content": f"Explain {t} to a beginner."}]) for t in TOPICS]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm up
    result = {}
    for name, batch in (("single", prompts[:1]), ("batch8", prompts)):
        engine = llm.engine
        seqs = [engine.add_request(p, params) for p in batch]
        start, at_start, reduce_before, calls_before = None, 0, 0.0, 0
        while engine.has_unfinished():
            engine.step()
            if start is None and all(s.output_token_ids for s in seqs):
                start, at_start = time.perf_counter(), sum(len(s.output_token_ids) for s in seqs)
                if engine.tp:
                    reduce_before, calls_before = engine.tp.all_reduce_seconds, engine.tp.all_reduce_calls
        elapsed = time.perf_counter() - start
        steps = max(len(s.output_token_ids) for s in seqs) - 1
        result[name] = {"tok_s": (sum(len(s.output_token_ids) for s in seqs) - at_start) / elapsed,
                        "ms_per_step": elapsed / steps * 1000}
        if engine.tp:
            result[name]["all_reduce_ms_per_step"] = (engine.tp.all_reduce_seconds - reduce_before) / steps * 1000
            result[name]["all_reduces_per_step"] = (engine.tp.all_reduce_calls - calls_before) / steps
    if llm.engine.tp:
        llm.engine.tp.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.max_tokens)))
        return

    import torch

    from sugam.hardware import cpu_label

    # (name, tp, environment): tp=2 with the shared-memory all-reduce (the default on one machine)
    # and with gloo's TCP all-reduce (what several machines use)
    configs = [("tp1", 1, {}), ("tp2", 2, {}), ("tp2-gloo", 2, {"SUGAM_TP_SHARED_MEMORY": "0"})]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        for name, tp, env in configs:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(tp),
                                  "--max-tokens", str(args.max_tokens)], capture_output=True, text=True, check=True,
                                 env={**os.environ, **env})
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)

    def med(config: str, case: str, key: str) -> float:
        return statistics.median(run[case][key] for run in runs[config])

    result = {"model": args.model, "cpu": cpu_label(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "rounds": args.rounds, "max_tokens": args.max_tokens, "runs": runs}
    lines = [f"# Tensor parallelism on one 2-core machine: {args.model}", "",
             f"CPU: {result['cpu']} (PyTorch capability {result['cpu_capability']}). tp=1: one process, 2 threads; "
             f"tp=2: two processes, 1 thread each, pinned to their own core, all-reduces through shared memory "
             f"(the default on one machine) or gloo's TCP (`SUGAM_TP_SHARED_MEMORY=0`, what several machines use). "
             f"Default path (GGUF blocks, bf16), greedy {args.max_tokens} tokens, medians of {args.rounds} rounds, "
             "configurations in turns.", "",
             "| case | config | tok/s | vs tp=1 | ms per step | of which all-reduce (ms) | all-reduces per step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, label in (("single", "1 stream"), ("batch8", "8 concurrent")):
        one = med("tp1", case, "tok_s")
        result[case] = {}
        for name, tp, _ in configs:
            tok_s = med(name, case, "tok_s")
            reduce_ms = med(name, case, "all_reduce_ms_per_step") if tp > 1 else 0.0
            result[case][name] = {"tok_s": tok_s, "ratio": tok_s / one, "all_reduce_ms_per_step": reduce_ms}
            lines.append(f"| {label} | {name} | {tok_s:.1f} | {tok_s / one:.2f} | {med(name, case, 'ms_per_step'):.1f} | "
                         + (f"{reduce_ms:.1f} | {med(name, case, 'all_reduces_per_step'):.0f} |" if tp > 1 else "– | – |"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"tensor-parallel-{Path(args.model).name.removesuffix('.gguf')}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
