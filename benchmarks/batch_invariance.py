"""Batch invariance: what it changes and what it costs, same run.

    .venv/bin/python benchmarks/batch_invariance.py [--model qwen2.5-coder-0.5b-instruct] [--prompts 20]
        [--max-tokens 48] [--rounds 2]

For the engine with batch invariance off (default) and on: (a) greedy chat answers to --prompts
different questions, each alone and all at once: how many are identical token for token, and how
many have bit-identical log-probabilities; (b) the cost: prefill of a 512-token prompt, single-stream
decode, and the wall time of the batched run (all prompts at once, aggregate tok/s). Medians of
--rounds, the two engines taking turns. Writes benchmarks/results/batch-invariance-MODEL.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from sugam import LLM, SamplingParams
from sugam.hardware import cpu_label

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["a linked list", "binary search", "a REST API", "recursion", "a hash map", "unit tests", "git branches",
          "SQL joins", "Python generators", "big-O notation", "a mutex", "TCP vs UDP", "JSON", "regular expressions",
          "Docker", "caching", "threads", "closures", "a heap", "sorting", "a trie", "dynamic programming",
          "garbage collection", "a deadlock", "HTTP caching", "a bloom filter", "virtual memory", "a B-tree",
          "OAuth", "a message queue", "consistent hashing", "a race condition"]


def answers(llm: LLM, prompts: list[list[int]], params: SamplingParams, together: bool) -> tuple[list, float]:
    start = time.perf_counter()
    if together:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return [o.outputs[0] for o in outs], time.perf_counter() - start


def logprob_bits(out) -> list[float]:
    return [entry[token].logprob for token, entry in zip(out.token_ids, out.logprobs)]


def prefill_tok_s(llm: LLM, seed: int, length: int = 512) -> float:
    rng = random.Random(seed)  # a prompt of its own: nothing served by the prefix cache
    prompt = [rng.randrange(1000, 100000) for _ in range(length)]
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return length / (time.perf_counter() - start)


def decode_tok_s(llm: LLM, prompt: list[int], tokens: int = 64) -> float:
    first = last = None
    count = 0
    for out in llm.stream_outputs(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)):
        now = time.perf_counter()
        first = first or now
        last, count = now, len(out.outputs[0].token_ids)
    assert first is not None and last is not None
    return (count - 1) / (last - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    engines = {mode: LLM(args.model, max_model_len=2048, batch_invariant=mode == "on") for mode in ("off", "on")}
    first = engines["off"]
    prompts = [first.chat_prompt([{"role": "user", "content": f"Explain {t} to a beginner, with an example."}])
               for t in (TOPICS * 4)[:args.prompts]]
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                            logprobs=0)
    rows: dict[str, dict] = {mode: {"prefill": [], "decode": [], "batch_s": []} for mode in engines}
    for round_ in range(args.rounds):
        for mode, llm in engines.items():
            r = rows[mode]
            if round_ == 0:
                alone, alone_s = answers(llm, prompts, params, together=False)
                r["alone_s"] = alone_s
            together, batch_s = answers(llm, prompts, params, together=True)
            if round_ == 0:
                r["same_tokens"] = sum(a.token_ids == b.token_ids for a, b in zip(alone, together))
                r["same_bits"] = sum(logprob_bits(a) == logprob_bits(b) for a, b in zip(alone, together))
            r["batch_s"].append(batch_s)
            r["prefill"].append(prefill_tok_s(llm, seed=round_ * 2 + (mode == "on")))
            r["decode"].append(decode_tok_s(llm, prompts[0]))
            print(mode, round_, {k: v for k, v in r.items()}, flush=True)

    path = first.engine.runner.execution_path()
    result = {"model": args.model, "cpu": cpu_label(), "compute_dtype": path["compute_dtype"],
              "kernels": path.get("kernels"), "threads": torch.get_num_threads(), "prompts": args.prompts,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "modes": {}}
    for mode, r in rows.items():
        result["modes"][mode] = {
            "same_tokens": r["same_tokens"], "same_bits": r["same_bits"],
            "prefill_512_tok_s": statistics.median(r["prefill"]), "decode_tok_s": statistics.median(r["decode"]),
            "batch_tok_s": args.prompts * args.max_tokens / statistics.median(r["batch_s"]),
            "batch_s": statistics.median(r["batch_s"])}
    off, on = result["modes"]["off"], result["modes"]["on"]
    lines = [f"# Batch invariance: {args.model}, {result['cpu']}, {path['compute_dtype']} compute, "
             f"{result['kernels']}, {result['threads']} threads, medians of {args.rounds}", "",
             f"{args.prompts} greedy chat answers of {args.max_tokens} tokens, each alone and all at once.", "",
             "| batch invariance | identical answers | bit-identical log-probs | prefill 512 tok/s | "
             "decode tok/s (1 stream) | all at once: aggregate tok/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, m in result["modes"].items():
        lines.append(f"| {mode} | {m['same_tokens']}/{args.prompts} | {m['same_bits']}/{args.prompts} | "
                     f"{m['prefill_512_tok_s']:.0f} | {m['decode_tok_s']:.1f} | {m['batch_tok_s']:.1f} |")
    lines += ["", f"Cost of `--batch-invariant` (on / off): prefill {on['prefill_512_tok_s'] / off['prefill_512_tok_s']:.2f}x, "
              f"decode {on['decode_tok_s'] / off['decode_tok_s']:.2f}x, batch {on['batch_tok_s'] / off['batch_tok_s']:.2f}x."]
    stem = f"batch-invariance-{args.model}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
