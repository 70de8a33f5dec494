"""Speculative decoding vs plain decoding, same run, greedy (so every configuration must print the
same tokens), medians of --rounds with the configurations taking turns.

    .venv/bin/python benchmarks/speculative.py [--target qwen2.5-coder-1.5b-instruct]
        [--draft qwen2.5-coder-0.5b-instruct] [--max-tokens 384] [--rounds 2] [--concurrency 8 32] [--no-draft] [--tag T]

Cases: (a) code editing: the prompt holds ~150 lines of Python (this repository's block manager)
and asks for the whole file back with one method renamed; (b) 8 and 32 such requests at once
(--concurrency; aggregate decode tok/s once every prompt is in); (c) free prose with nothing to look up; (d) the draft model guessing for the target on
(a) and (c). Configurations: plain, ngram (prompt lookup), draft. Then (e): from the measured
acceptance and the bytes each model reads per token, the speed-up to expect for QwQ-32B drafted
by Qwen2.5-0.5B. Writes benchmarks/results/speculative-TARGET[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sugam import LLM, SamplingParams
from sugam.hardware import cpu_label

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CODE = "".join((ROOT / "sugam" / "engine" / "block_manager.py").read_text().splitlines(keepends=True)[:150])
EDIT = [{"role": "user", "content": "Here is a Python module:\n\n```python\n" + CODE + "```\n\nRename the method "
         "`take_blocks` to `allocate_blocks` everywhere (definition and calls). Reply with the complete updated "
         "file in one code block and nothing else."}]
PROSE = [{"role": "user", "content": "Write a short story (about 400 words) about a lighthouse keeper who "
          "finds a message in a bottle. Vivid, original language; no lists, no code."}]
# Weights read per token (GB) of the models in the prediction (Q4_K_M files: QwQ-32B 19.9 GB,
# Qwen2.5-0.5B-Instruct 0.49 GB; the 0.5B reads 0.39 GB a token as its embedding is looked up).
QWQ_GB, DRAFT_05B_GB = 19.9, 0.39


def stream_decode(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """(tokens, decode tok/s after the first token) of one greedy request."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    first = last = None
    tokens: list[int] = []
    for out in llm.stream_outputs(prompt, params):
        now = time.perf_counter()
        first = first or now
        last, tokens = now, out.outputs[0].token_ids
    assert first is not None and last is not None
    return tokens, (len(tokens) - 1) / (last - first) if last > first else 0.0


def batch_decode(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """(tokens of each request, aggregate decode tok/s): tokens generated once every prompt is in,
    over the time from then to the end (speculation does not change prefill, which would otherwise
    dominate eight 1,500-token prompts)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    start = None
    at_start = 0
    while engine.has_unfinished():
        engine.step()
        if start is None and all(s.output_token_ids for s in seqs):
            start, at_start = time.perf_counter(), sum(len(s.output_token_ids) for s in seqs)
    elapsed = time.perf_counter() - start
    tokens = [list(s.output_token_ids) for s in seqs]
    return tokens, (sum(map(len, tokens)) - at_start) / elapsed


def acceptance(llm: LLM) -> tuple[int, int, int]:
    """(guesses verified, guesses accepted, verification steps) so far."""
    spec = llm.engine.speculator
    return (spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens, spec.stats.num_drafts) if spec else (0, 0, 0)


def predicted_speedup(alpha: float, k: int, verify_cost: float) -> float:
    """Leviathan et al.: a step emits (1 - alpha^(k+1)) / (1 - alpha) tokens on average and costs one
    target step (times verify_cost, k+1 rows against 1) plus k draft steps; both bandwidth-bound."""
    emitted = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return emitted / (verify_cost + k * DRAFT_05B_GB / QWQ_GB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32],
                    help="concurrent code edits in the batch cases (aggregate decode)")
    ap.add_argument("--no-draft", action="store_true", help="skip the draft-model configuration")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. the machine)")
    args = ap.parse_args()

    configs = {"plain": None, "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4},
               "draft": {"model": args.draft, "num_speculative_tokens": 4}}
    if args.no_draft:
        del configs["draft"]
    llms = {name: LLM(args.target, max_num_seqs=max(args.concurrency), speculative_config=spec)
            for name, spec in configs.items()}
    plain = llms["plain"]
    prompts = {"code editing": plain.chat_prompt(EDIT), "free prose": plain.chat_prompt(PROSE)}
    for llm in llms.values():  # warm-up: kernels built, caches touched
        stream_decode(llm, prompts["free prose"], 8)

    rows: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for case, prompt in prompts.items():
            for name, llm in llms.items():
                drafted, accepted, steps = acceptance(llm)
                tokens, speed = stream_decode(llm, prompt, args.max_tokens)
                d, a, st = acceptance(llm)
                rows.setdefault((case, name), []).append(
                    {"tok_s": speed, "tokens": tokens, "drafted": d - drafted, "accepted": a - accepted,
                     "steps": st - steps})
                print(case, name, f"{speed:.1f} tok/s", f"accepted {a - accepted}/{d - drafted}", flush=True)
        for concurrency in args.concurrency:
            batch = [prompts["code editing"]] * concurrency
            for name, llm in llms.items():
                if name == "draft":
                    continue
                drafted, accepted, steps = acceptance(llm)
                tokens, speed = batch_decode(llm, batch, args.max_tokens)
                d, a, st = acceptance(llm)
                rows.setdefault((f"{concurrency} x code editing", name), []).append(
                    {"tok_s": speed, "tokens": tokens[0], "drafted": d - drafted, "accepted": a - accepted,
                     "steps": st - steps})
                print(concurrency, "x code editing", name, f"{speed:.1f} tok/s aggregate decode", flush=True)

    table = [f"# Speculative decoding: {args.target}, {cpu_label()}, greedy, {args.max_tokens} tokens, "
             f"medians of {args.rounds} rounds", "",
             "| case | method | tok/s | × plain | guesses accepted | same tokens as plain |",
             "|---|---|---:|---:|---:|---|"]
    summary = {}
    for (case, name), runs in rows.items():
        speed = statistics.median(r["tok_s"] for r in runs)
        base = statistics.median(r["tok_s"] for r in rows[(case, "plain")])
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        steps = sum(r["steps"] for r in runs)
        same = all(r["tokens"] == rows[(case, "plain")][0]["tokens"] for r in runs)
        summary[f"{case} / {name}"] = {"tok_s": speed, "ratio": speed / base, "drafted": drafted,
                                       "accepted": accepted, "steps": steps, "same_tokens": same}
        rate = f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "–"
        table.append(f"| {case} | {name} | {speed:.1f} | {speed / base:.2f} | {rate} | {'yes' if same else 'NO'} |")

    # (e) QwQ-32B drafted by Qwen2.5-0.5B, from the acceptance measured with the 0.5B drafting here,
    # and what a verification step costs against a plain one on this machine: prompt lookup's steps
    # on the code edit emit `emitted` tokens each at `ratio` times plain speed, so a step of
    # (guesses + 1) rows costs emitted / ratio plain steps (bandwidth alone would make it ~1).
    ngram = summary.get("code editing / ngram")
    verify_cost = None
    if ngram and ngram["steps"]:
        emitted = (ngram["accepted"] + ngram["steps"]) / ngram["steps"]
        verify_cost = emitted / ngram["ratio"]
        table += ["", f"A verification step of prompt lookup on the code edit ({ngram['drafted'] / ngram['steps']:.1f} "
                  f"guesses + 1 rows) emitted {emitted:.1f} tokens and cost {verify_cost:.1f} plain steps here."]
    table += ["", "Expected for QwQ-32B (Q4_K_M, 19.9 GB a token) drafted by Qwen2.5-0.5B (0.39 GB a token), "
              "k = 4, if the 32B accepts the 0.5B's guesses as often as the 1.5B did here; a verification "
              "step costing 1.2 plain steps (bandwidth-bound: enough cores for the kernels' arithmetic) or "
              + (f"{verify_cost:.1f} (this machine's measured cost)" if verify_cost else "this machine's cost") + ":", ""]
    for key, v in summary.items():
        if key.endswith("/ draft") and v["drafted"]:
            alpha = v["accepted"] / v["drafted"]
            line = f"- {key.split(' / ')[0]}: acceptance {alpha:.0%} → {predicted_speedup(alpha, 4, 1.2):.2f}×"
            if verify_cost:
                line += f" (bandwidth-bound) or {predicted_speedup(alpha, 4, verify_cost):.2f}× (this machine)"
            table.append(line)
    RESULTS.mkdir(exist_ok=True)
    stem = f"speculative-{args.target}" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"target": args.target, "draft": args.draft, "cpu": cpu_label(),
                                                      "max_tokens": args.max_tokens, "results": summary}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
