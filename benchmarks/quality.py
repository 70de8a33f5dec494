"""Quality of the quantized paths: perplexity vs transformers' fp32 on the same GGUF, same text and windows.

    .venv/bin/python benchmarks/quality.py [--models qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct]

Reference: transformers loads the GGUF (dequantized to fp32) and scores the text in the same
windows (context 512, stride 256) as `sugam perplexity`. sugam is run in each --quantization mode:
none (fp32, dense), gguf (the default on CPU: the file's own precision), int8 and int4, and on each
CPU path this machine can take: sugam's kernels, PyTorch's (SUGAM_NATIVE_KERNELS=0), bf16 or fp32
compute, and ATen's kernels forced to AVX2 (ATEN_CPU_CAPABILITY=avx2, whose int4 packing differs).
Each run is its own process. Writes benchmarks/results/quality.json and .md; rows measured on another
CPU (the `cpu` column) are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent / "data" / "quality.txt"
CONTEXT, STRIDE = 512, 256
NO_KERNELS = {"SUGAM_NATIVE_KERNELS": "0"}
AVX2 = {**NO_KERNELS, "ATEN_CPU_CAPABILITY": "avx2"}
# (label, --quantization, --dtype, environment); "auto" dtype is what this CPU picks
MODES = [("none", "none", "float32", {}), ("gguf", "gguf", "auto", {}), ("gguf-decode", "gguf", "auto", {}),
         ("int8", "int8", "auto", {}), ("int4", "int4", "auto", {}),
         ("gguf, PyTorch kernels", "gguf", "auto", NO_KERNELS),
         ("gguf, PyTorch kernels, fp32", "gguf", "float32", NO_KERNELS),
         ("gguf, ATen AVX2, fp32", "gguf", "float32", AVX2),
         ("int4, ATen AVX2, fp32", "int4", "float32", AVX2)]


def run_sugam(path: str, mode: str, dtype: str) -> dict:
    from sugam import LLM

    if mode == "gguf-decode":
        # Score every window through the decode kernels (int8 activations x the file's blocks) instead
        # of the dequantize + GEMM that long prompts take: each row gets exactly the arithmetic of
        # a decoded token, so this is the quality of generation, not only of prompt processing.
        os.environ["SUGAM_PACKED_KERNEL_MAX_ROWS"] = str(1 << 30)
        mode = "gguf"
    llm = LLM(path, dtype=dtype, quantization=mode, max_num_seqs=1, max_model_len=CONTEXT)
    start = time.perf_counter()
    result = llm.perplexity(TEXT.read_text(encoding="utf-8"), context=CONTEXT, stride=STRIDE)
    runner = llm.engine.runner
    return {"mean_nll": result.mean_nll, "tokens": result.tokens_scored, "seconds": time.perf_counter() - start,
            "weight_mb": runner.weight_bytes / 1e6, "compute": str(runner.dtype).removeprefix("torch."),
            "path": runner.execution_path()}


def run_transformers(path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sugam import LLM
    from sugam.evaluate import window_spans

    ids = LLM(path, max_num_seqs=1, max_model_len=CONTEXT).get_tokenizer().encode(TEXT.read_text(encoding="utf-8"))
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    total, count, start_time = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for start, end, first in window_spans(len(ids), CONTEXT, STRIDE):
            logprobs = model(torch.tensor([ids[start:end]])).logits[0].float().log_softmax(-1)
            targets = torch.tensor(ids[first:end])
            total -= float(logprobs[first - start - 1:end - start - 1].gather(1, targets[:, None]).sum())
            count += end - first
    return {"mean_nll": total / count, "tokens": count, "seconds": time.perf_counter() - start_time}


def child(kind: str, path: str, label: str, dtype: str) -> None:
    mode = next((m[1] for m in MODES if m[0] == label), label)
    if label == "gguf-decode":
        mode = label
    result = run_transformers(path) if kind == "transformers" else run_sugam(path, mode, dtype)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from sugam.hardware import cpu_label
    from sugam.registry import resolve

    cpu = cpu_label()
    rows = []
    for model in args.models:
        path = str(resolve(model))
        runs = [("transformers", "fp32", "fp32", "float32", {})] + [("sugam", *m) for m in MODES]
        reference = None
        for kind, label, _mode, dtype, env in runs:
            out = subprocess.run([sys.executable, __file__, "--child", kind, path, label, dtype],
                                 capture_output=True, text=True, env={**os.environ, **env})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{kind} {label} failed on {model}")
            r = json.loads(line[7:])
            reference = reference or r
            path_info = r.get("path", {})
            row = {"cpu": cpu, "model": model, "engine": kind, "mode": label, "dtype": r.get("compute", dtype),
                   "kernels": path_info.get("kernels", ""), "aten": path_info.get("cpu_capability", ""),
                   "tokens": r["tokens"], "perplexity": round(math.exp(r["mean_nll"]), 4),
                   "vs_transformers_fp32_pct": round((math.exp(r["mean_nll"] - reference["mean_nll"]) - 1) * 100, 3),
                   "weight_mb": round(r.get("weight_mb", 0)), "tok_s": round(r["tokens"] / r["seconds"], 1)}
            rows.append(row)
            print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "quality.json"
    if previous.is_file():  # keep the rows of models (or CPUs) not re-run this time
        kept = [r for r in json.loads(previous.read_text())
                if r["model"] not in args.models or r.get("cpu", cpu) != cpu]
        rows = kept + rows
    (RESULTS / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"Text: benchmarks/data/quality.txt, windows of {CONTEXT} tokens, stride {STRIDE}.", ""]
    for cpu_name in dict.fromkeys(r.get("cpu", "unnamed CPU (before the cpu column)") for r in rows):
        lines += [f"**{cpu_name}**", "",
                  "| model | engine | weights | kernels | ATen | compute | weights in memory MB | perplexity "
                  "| vs transformers fp32 | tok/s scored |", "|---|---|---|---|---|---|---:|---:|---:|---:|"]
        for r in rows:
            if r.get("cpu", "unnamed CPU (before the cpu column)") == cpu_name:
                lines.append(f"| {r['model']} | {r['engine']} | {r['mode']} | {r.get('kernels', '')} | "
                             f"{r.get('aten', '')} | {r['dtype']} | {r['weight_mb'] or ''} | {r['perplexity']:.3f} | "
                             f"{r['vs_transformers_fp32_pct']:+.2f} % | {r['tok_s']} |")
        lines.append("")
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
