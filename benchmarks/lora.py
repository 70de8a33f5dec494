"""LoRA serving cost, same run, medians of --rounds with the configurations taking turns (greedy).

    .venv/bin/python benchmarks/lora.py [--model qwen2.5-coder-0.5b-instruct] [--rank 8] [--rounds 3]

(a) single-stream decode: the base model on an engine without LoRA vs one adapter (rank --rank, all
seven projections) on an engine with LoRA on, three pairs in turns per round; (b) aggregate decode of 16 concurrent requests: all
on the base model vs spread over 4 adapters (4 each, one batch); (c) training tokens/s of `sugam
finetune` on the same model (CPU) when --train is given. The adapters are random (the cost does not
depend on the values). Writes benchmarks/results/lora-MODEL.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sugam import LLM, LoRARequest, SamplingParams
from sugam.hardware import cpu_label
from sugam.lora.adapter import TARGET_MODULES, LoRAAdapter, LoRAWeights, save_peft

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ["a linked list", "binary search", "a REST API", "recursion", "a hash map", "unit tests", "git branches",
          "SQL joins", "Python generators", "big-O notation", "a mutex", "TCP vs UDP", "JSON", "regular expressions",
          "Docker", "caching"]


def random_adapter(llm: LLM, rank: int, seed: int) -> LoRAAdapter:
    cfg = llm.engine.model_config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    gen = torch.Generator().manual_seed(seed)
    weights = {(layer, m): LoRAWeights(torch.randn(rank, shapes[m][1], generator=gen) * 0.01,
                                       torch.randn(shapes[m][0], rank, generator=gen) * 0.01, 2.0)
               for layer in range(cfg.num_hidden_layers) for m in TARGET_MODULES}
    return LoRAAdapter(weights, rank, 2.0 * rank)


def stream_decode(llm: LLM, prompt: list[int], max_tokens: int, lora: LoRARequest | None) -> float:
    """Decode tok/s after the first token of one greedy request."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    first = last = None
    n = 0
    for out in llm.stream_outputs(prompt, params, lora_request=lora):
        now = time.perf_counter()
        first = first or now
        last, n = now, len(out.outputs[0].token_ids)
    return (n - 1) / (last - first)


def batch_decode(llm: LLM, prompts: list[list[int]], max_tokens: int, loras: list[LoRARequest | None]) -> float:
    """Aggregate decode tok/s once every prompt is in (prefill excluded)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine = llm.engine
    seqs = [engine.add_request(p, params, lora_request=lora) for p, lora in zip(prompts, loras)]
    start, at_start = None, 0
    while engine.has_unfinished():
        engine.step()
        if start is None and all(s.output_token_ids for s in seqs):
            start, at_start = time.perf_counter(), sum(len(s.output_token_ids) for s in seqs)
    return (sum(len(s.output_token_ids) for s in seqs) - at_start) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--train", help="training data (JSONL or folder): also measure `sugam finetune` tokens/s on it")
    parser.add_argument("--train-steps", type=int, default=12)
    args = parser.parse_args()

    base = LLM(args.model)
    lora = LLM(args.model, enable_lora=True)
    folder = Path(tempfile.mkdtemp(prefix="sugam-lora-bench-"))
    requests = []
    for i in range(4):
        save_peft(random_adapter(lora, args.rank, seed=i), folder / f"a{i}")
        requests.append(LoRARequest(f"a{i}", i + 1, str(folder / f"a{i}")))
        lora.engine.add_lora(requests[-1])
    prompts = [base.chat_prompt([{"role": "user", "content": f"Explain {t} to a beginner, with an example."}])
               for t in TOPICS]
    for llm in (base, lora):  # warm up (kernels, allocations)
        stream_decode(llm, prompts[0], 8, requests[0] if llm is lora else None)

    runs: dict[str, list[float]] = {k: [] for k in ("single_base", "single_lora", "batch16_base", "batch16_4loras")}
    for r in range(args.rounds):
        for _ in range(3):  # a single stream is short and this machine drifts: three pairs in turns a round
            runs["single_base"].append(stream_decode(base, prompts[0], args.max_tokens, None))
            runs["single_lora"].append(stream_decode(lora, prompts[0], args.max_tokens, requests[0]))
        runs["batch16_base"].append(batch_decode(base, prompts, args.max_tokens, [None] * 16))
        runs["batch16_4loras"].append(batch_decode(lora, prompts, args.max_tokens, [requests[i % 4] for i in range(16)]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "model": args.model, "cpu": cpu_label(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "rank": args.rank, "max_lora_rank": lora.engine.config.max_lora_rank,
        "rounds": args.rounds, "max_tokens": args.max_tokens, "tok_s": runs, "median_tok_s": med,
        "single_ratio": med["single_lora"] / med["single_base"],
        "batch16_ratio": med["batch16_4loras"] / med["batch16_base"],
        "execution_path": lora.engine.runner.execution_path(),
    }
    if args.train:
        from sugam.lora.finetune import finetune

        del base, lora  # the serving engines' memory back before training
        out = finetune(args.model, args.train, folder / "trained", iters=args.train_steps, batch_size=4,
                       eval_every=10**9, save_every=10**9)
        result["training"] = {"data": args.train, "steps": out.steps, "batch_size": 4, "tokens": out.tokens,
                              "seconds": out.seconds, "tokens_per_second": out.tokens_per_second}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"lora-{Path(args.model).name.removesuffix('.gguf')}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# LoRA serving cost: {args.model}", "",
             f"CPU: {result['cpu']} (PyTorch capability {result['cpu_capability']}), {result['threads']} threads. "
             f"Adapters: rank {args.rank}, all 7 projections, engine default --max-lora-rank "
             f"{result['max_lora_rank']}. Greedy, {args.max_tokens} tokens, medians of {args.rounds} rounds "
             "(configurations in turns).", "",
             "| case | base (tok/s) | with adapters (tok/s) | ratio | target |", "|---|---:|---:|---:|---:|",
             f"| single stream, 1 adapter | {med['single_base']:.1f} | {med['single_lora']:.1f} | "
             f"{result['single_ratio']:.2f} | ≥ 0.85 |",
             f"| 16 concurrent, 4 adapters | {med['batch16_base']:.1f} | {med['batch16_4loras']:.1f} | "
             f"{result['batch16_ratio']:.2f} | ≥ 0.80 |"]
    if "training" in result:
        t = result["training"]
        lines += ["", f"Training (`sugam finetune` on {t['data']}, rank 8, all projections, batch 4, "
                      f"{t['steps']} steps, base in its GGUF blocks, bf16): {t['tokens_per_second']:.0f} tokens/s "
                      f"({t['tokens']} tokens in {t['seconds']:.0f} s)."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
