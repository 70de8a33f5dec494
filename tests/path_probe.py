"""Run in a child process by test_cpu_paths.py, so that each run gets its own ATen CPU capability and
kernel switches (they are fixed when a process starts). Prints one JSON line.

    python tests/path_probe.py int4                   # int4 packing vs the kernel, on this capability
    python tests/path_probe.py model MODEL DTYPE QUANT [CHARS]   # a real model's perplexity and an answer
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HELD_OUT = Path(__file__).parent.parent / "benchmarks" / "data" / "quality.txt"
README_QUESTION = "Write a one-line Python expression that reverses a string s."


def int4_check() -> dict:
    """Int4Weight.dequantize() and the prompt path's dequantize + GEMM against what the kernel itself
    multiplies by (the product with the identity, in fp32: exact)."""
    from sugam.quant import linear
    from sugam.quant.formats import int4_layout, quantize_int4

    torch.manual_seed(0)
    weight = quantize_int4(torch.randn(192, 256))
    kernel_w = torch._weight_int4pack_mm_for_cpu(torch.eye(256), weight.packed, weight.group,
                                                 weight.scales_zeros.float()).t()
    x = torch.randn(linear.KERNEL_MAX_ROWS + 8, 256)
    whole = linear.quantized_matmul(x, weight)
    linear.DEQUANT_CHUNK_VALUES = 64 * 256  # the row-chunked path too
    chunked = linear.quantized_matmul(x, weight)
    reference = x @ kernel_w.t()
    scale = reference.abs().max().item()
    layout = int4_layout()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "layout": str(layout),
            "dequantize_equals_kernel": torch.equal(weight.dequantize(), kernel_w),
            "prompt_path_error": max((whole - reference).abs().max().item(),
                                     (chunked - reference).abs().max().item()) / scale}


def model_check(model: str, dtype: str, quantization: str, chars: int) -> dict:
    from sugam import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, quantization=quantization, max_num_seqs=1, max_model_len=1024)
    text = HELD_OUT.read_text(encoding="utf-8")[:chars]
    result = llm.perplexity(text, context=512, stride=256)
    answer = llm.chat([{"role": "user", "content": README_QUESTION}],
                      SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    return {"path": llm.engine.runner.execution_path(), "perplexity": result.perplexity,
            "tokens": result.tokens_scored, "answer": answer}


if __name__ == "__main__":
    if sys.argv[1] == "int4":
        print(json.dumps(int4_check()))
    else:
        print(json.dumps(model_check(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5
                                     else 1700)))
