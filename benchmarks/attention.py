"""Decode attention over a paged KV cache on CPU: which way of computing it is fastest?

    .venv/bin/python benchmarks/attention.py

Shapes of Qwen2.5-0.5B (14 query heads, 2 KV heads, head_dim 64), bf16, 16-token blocks, one layer;
batches of 1, 8 and 32 sequences with contexts of 128-640 tokens. Options:
  grouped   per sequence: gather its blocks, one SDPA call with the query heads of each KV head
            folded into the query axis (what sugam uses for decode)
  loop      the same with SDPA's enable_gqa instead of folding
  batched   one gather of all block tables padded to the longest, one SDPA call with a padding mask
  flex      torch.compile'd flex_attention on the same padded gather, padding as a mask_mod
Writes benchmarks/results/attention.json and .md (median of repeated timings).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
HQ, HKV, D, BS = 14, 2, 64, 16
DTYPE = torch.bfloat16


def make_case(batch: int, seed: int = 0):
    rng = random.Random(seed)
    lens = [rng.randint(128, 640) for _ in range(batch)]
    blocks = sum(-(-n // BS) for n in lens) + 8
    k_cache = torch.randn(blocks, BS, HKV, D, dtype=DTYPE)
    v_cache = torch.randn(blocks, BS, HKV, D, dtype=DTYPE)
    ids = list(range(blocks))
    rng.shuffle(ids)
    tables, at = [], 0
    for n in lens:
        nb = -(-n // BS)
        tables.append(torch.tensor(ids[at:at + nb]))
        at += nb
    q = torch.randn(batch, HQ, D, dtype=DTYPE)
    return q, k_cache, v_cache, tables, lens


def loop(q, k_cache, v_cache, tables, lens):
    out = torch.empty_like(q)
    for i, (table, n) in enumerate(zip(tables, lens)):
        k = k_cache[table].view(-1, HKV, D)[:n].transpose(0, 1).unsqueeze(0)
        v = v_cache[table].view(-1, HKV, D)[:n].transpose(0, 1).unsqueeze(0)
        out[i] = F.scaled_dot_product_attention(q[i].unsqueeze(0).unsqueeze(2), k, v, enable_gqa=True)[0, :, 0]
    return out


def grouped(q, k_cache, v_cache, tables, lens):
    out = torch.empty_like(q)
    for i, (table, n) in enumerate(zip(tables, lens)):
        k = k_cache[table].view(-1, HKV, D)[:n].transpose(0, 1)
        v = v_cache[table].view(-1, HKV, D)[:n].transpose(0, 1)
        out[i] = F.scaled_dot_product_attention(q[i].view(HKV, -1, D), k, v).reshape(HQ, D)
    return out


def padded_inputs(tables, lens):
    width = max(len(t) for t in tables)
    padded = torch.zeros(len(tables), width, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, :len(t)] = t
    mask = torch.arange(width * BS)[None, :] < torch.tensor(lens)[:, None]
    return padded, mask


def batched(q, k_cache, v_cache, padded, mask):
    b = q.shape[0]
    k = k_cache[padded].view(b, -1, HKV, D).transpose(1, 2)
    v = v_cache[padded].view(b, -1, HKV, D).transpose(1, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                          enable_gqa=True)[:, :, 0]


def make_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q, k_cache, v_cache, padded, mask):
        b = q.shape[0]
        lens = mask.sum(-1)
        k = k_cache[padded].view(b, -1, HKV, D).transpose(1, 2)
        v = v_cache[padded].view(b, -1, HKV, D).transpose(1, 2)

        def keep(bi, h, qi, ki):
            return ki < lens[bi]

        block_mask = create_block_mask(keep, b, None, 1, k.shape[2], device="cpu")
        return compiled(q.unsqueeze(2), k, v, block_mask=block_mask, enable_gqa=True)[:, :, 0]

    return flex


def timed(fn, *args, repeats: int = 30) -> float:
    for _ in range(3):
        fn(*args)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    rows = []
    flex = None
    try:
        flex = make_flex()
    except Exception as exc:  # flex_attention needs a recent torch and a compiler
        print(f"flex_attention unavailable: {exc}")
    with torch.inference_mode():
        for batch in (1, 8, 32):
            q, kc, vc, tables, lens = make_case(batch)
            padded, mask = padded_inputs(tables, lens)
            ref = loop(q, kc, vc, tables, lens)
            row = {"batch": batch, "loop_us": timed(loop, q, kc, vc, tables, lens)}
            assert (grouped(q, kc, vc, tables, lens).float() - ref.float()).abs().max() < 2e-2
            row["grouped_us"] = timed(grouped, q, kc, vc, tables, lens)
            got = batched(q, kc, vc, padded, mask)
            assert (got.float() - ref.float()).abs().max() < 2e-2
            row["batched_us"] = timed(batched, q, kc, vc, padded, mask)
            if flex is not None:
                try:
                    got = flex(q, kc, vc, padded, mask)
                    assert (got.float() - ref.float()).abs().max() < 5e-2
                    row["flex_us"] = timed(flex, q, kc, vc, padded, mask)
                except Exception as exc:
                    print(f"flex_attention failed at batch {batch}: {type(exc).__name__}: {exc}"[:300])
            rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention.json").write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                        "rows": rows}, indent=2) + "\n")
    cols = [c for c in ("grouped_us", "loop_us", "batched_us", "flex_us") if any(c in r for r in rows)]
    lines = ["| batch | " + " | ".join(c.replace("_us", " (µs)") for c in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    lines += ["| {} | {} |".format(r["batch"], " | ".join(str(r.get(c, "–")) for c in cols)) for r in rows]
    (RESULTS / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
