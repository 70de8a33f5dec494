"""Decode speed of sugam on a synthetic GGUF with Qwen3-30B-A3B's layer shapes (hidden 2048, 128
experts of width 768, 8 routed per token, 32/4 heads of 128), a few layers, random weights, and the
bytes a token reads against the active-parameter count.

    python benchmarks/moe_decode.py [--layers 2] [--type Q8_0] [--tokens 32] [--out /tmp/moe.gguf]

The file is written with gguf-py (its quantizer); the tokenizer is the tests' tiny BPE. Not a
comparison with llama.cpp (benchmarks/speed.py does that for dense files).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

H, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, USED, WIDTH = 2048, 32, 4, 128, 128, 8, 768


def write(path: Path, layers: int, qtype: gguf.GGMLQuantizationType) -> None:
    from conftest import train_tokenizer
    from gguf_writer import add_tokenizer, write_out

    rng = np.random.default_rng(0)
    arch = "qwen3moe"
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", layers), ("context_length", 4096), ("embedding_length", H),
                       ("feed_forward_length", 6144), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("attention.key_length", HEAD_DIM),
                       ("expert_count", EXPERTS), ("expert_used_count", USED), ("expert_feed_forward_length", WIDTH)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    vocab = add_tokenizer(w, train_tokenizer())

    def matrix(name: str, *shape: int) -> None:
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    matrix("token_embd.weight", vocab, H)
    vector("output_norm.weight", H)
    matrix("output.weight", vocab, H)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(layers):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", H)
        vector(b + "ffn_norm.weight", H)
        vector(b + "attn_q_norm.weight", HEAD_DIM)
        vector(b + "attn_k_norm.weight", HEAD_DIM)
        matrix(b + "attn_q.weight", q, H)
        matrix(b + "attn_k.weight", kv, H)
        matrix(b + "attn_v.weight", kv, H)
        matrix(b + "attn_output.weight", H, q)
        w.add_tensor(b + "ffn_gate_inp.weight", rng.standard_normal((EXPERTS, H), dtype=np.float32))
        matrix(b + "ffn_gate_exps.weight", EXPERTS, WIDTH, H)
        matrix(b + "ffn_up_exps.weight", EXPERTS, WIDTH, H)
        matrix(b + "ffn_down_exps.weight", EXPERTS, H, WIDTH)
    write_out(w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--type", default="Q8_0", choices=["Q8_0", "Q4_0"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/sugam-moe-synthetic.gguf")
    args = ap.parse_args()
    qtype = gguf.GGMLQuantizationType[args.type]
    path = Path(args.out)
    if not path.exists():
        start = time.perf_counter()
        write(path, args.layers, qtype)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")

    import torch

    from sugam import LLM, SamplingParams
    from sugam.quant.gguf_pack import packed_row_bytes

    torch.set_num_threads(args.threads)
    llm = LLM(str(path), dtype="bfloat16")
    runner = llm.engine.runner
    print("weights:", runner.execution_path()["weights"])
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([[5, 17, 42]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    out = llm.generate([[5, 17, 42, 99]], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    n = len(out.outputs[0].token_ids)
    cfg = runner.config
    row = packed_row_bytes(args.type, H)
    expert_bytes = 2 * WIDTH * row + H * packed_row_bytes(args.type, WIDTH)   # gate + up + down
    attn_bytes = (HEADS + 2 * KV_HEADS) * HEAD_DIM * row + H * packed_row_bytes(args.type, HEADS * HEAD_DIM)
    head_bytes = cfg.vocab_size * row
    per_token = cfg.num_hidden_layers * (attn_bytes + USED * expert_bytes + EXPERTS * H * 4) + head_bytes
    held = cfg.num_hidden_layers * (attn_bytes + EXPERTS * expert_bytes + EXPERTS * H * 4) + head_bytes
    total, active = cfg.expert_params()
    print(f"{cfg.num_hidden_layers} layers, {args.type}: {n} tokens in {elapsed:.2f} s = {n / elapsed:.1f} tok/s "
          f"(prompt included), {elapsed / n * 1e3:.1f} ms a token")
    print(f"bytes read per token {per_token / 1e6:.1f} MB of {held / 1e6:.1f} MB held "
          f"({per_token / held:.1%}); expert parameters active {active / 1e6:.1f}M of {total / 1e6:.1f}M "
          f"({active / total:.1%}); effective {per_token * n / elapsed / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
