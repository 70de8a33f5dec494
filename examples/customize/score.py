"""Scores the base model and an adapter on the held-out Brightkettle questions (docs/CUSTOMIZE.md),
both in one batch: an answer counts when it contains the fact's key string.

    python examples/customize/score.py ADAPTER [--model qwen2.5-coder-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sugam import LLM, LoRARequest, SamplingParams

HERE = Path(__file__).resolve().parent / "brightkettle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--show", type=int, default=4, help="example answers to print")
    args = parser.parse_args()

    data = json.loads((HERE / "heldout.json").read_text())
    llm = LLM(args.model, enable_lora=True)
    adapter = LoRARequest("brightkettle", 1, args.adapter)
    conversations = [[{"role": "system", "content": data["system"]}, {"role": "user", "content": q["question"]}]
                     for q in data["questions"]]
    n = len(conversations)
    params = SamplingParams(temperature=0, max_tokens=48)
    # base and adapter requests side by side, in one batch
    outs = llm.chat(conversations * 2, params, lora_request=[None] * n + [adapter] * n)
    answers = [o.outputs[0].text.strip() for o in outs]
    base, tuned = answers[:n], answers[n:]
    right = [[q["must_contain"].lower() in a.lower() for q, a in zip(data["questions"], group)] for group in (base, tuned)]
    print(f"held-out questions: {n}")
    print(f"base model: {sum(right[0])}/{n} right; with the adapter: {sum(right[1])}/{n} right")
    for q, b, t in list(zip(data["questions"], base, tuned))[:args.show]:
        print(f"\nQ: {q['question']}\n  base:    {b[:160]!r}\n  adapter: {t[:160]!r}")


if __name__ == "__main__":
    main()
