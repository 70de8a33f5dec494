"""Where batches of rows should leave sugam's packed GGUF kernels for dequantize + GEMM.

    .venv/bin/python benchmarks/packed_gemm.py [--isa avx2] [--dtype float32] [--model qwen2.5-coder-0.5b-instruct]

Times, for every distinct body matrix of the model (its real packed weights), the packed kernel
(int8 activations times the file's blocks) against dequantize + dense GEMM in the compute dtype, at
1-256 rows, 2 threads, medians. --isa picks the kernels' build (SUGAM_NATIVE_ISA); --emulate-avx2 also
holds ATen, oneDNN and MKL to AVX2 (their GEMMs as an AVX2 CPU runs them: an approximation of one).
Writes benchmarks/results/packed-gemm-MODEL-ISA.json and .md.
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

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 4, 16, 32, 64, 128, 256)
_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def child(model: str, dtype_name: str, repeats: int) -> dict:
    import torch

    from sugam import native
    from sugam.hardware import cpu_label
    from sugam.llm import LLM
    from sugam.quant.linear import QuantizedLinear

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    llm = LLM(model, max_num_seqs=1, max_model_len=256, dtype=dtype_name, quantization="gguf")
    layer = llm.engine.runner.model.model.layers[0]
    mats = {name: m for name, m in layer.named_modules()
            if isinstance(m, QuantizedLinear) and m.weight_format == "packed"}

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    rows_out = []
    for rows in ROWS:
        kernel = dense = 0.0
        for m in mats.values():
            x = torch.randn(rows, m.in_features).to(dtype)
            kernel += median_ms(lambda: native.gguf_matmul(x, m.packed, m.qtype, m.in_features))
            buf = torch.empty(m.out_features, m.in_features, dtype=dtype)
            dense += median_ms(lambda: x @ native.gguf_dequantize(m.packed, m.qtype, m.in_features, buf).t())
        rows_out.append({"rows": rows, "kernel_ms": kernel, "dequant_gemm_ms": dense})
        print(rows, round(kernel, 2), round(dense, 2), flush=True)
    return {"cpu": cpu_label(), "isa": native.isa(), "dtype": dtype_name,
            "matrices": {n: f"{m.qtype} {m.in_features}->{m.out_features}" for n, m in mats.items()},
            "rows": rows_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--isa", default="")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--emulate-avx2", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.model, args.dtype, args.repeats)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="2", **(_AVX2_ENV if args.emulate_avx2 else {}))
    if args.isa:
        env["SUGAM_NATIVE_ISA"] = args.isa
    out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--dtype", args.dtype,
                          "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(out.stderr[-3000:])
    r = json.loads(line[7:])
    gemm = "dequantize + GEMM" + (" (ATen/oneDNN/MKL held to AVX2)" if args.emulate_avx2 else "")
    table = [f"# Packed kernels vs dequantize + GEMM: {args.model}, one layer's matrices, {r['cpu']}, "
             f"sugam {r['isa']} kernels, {r['dtype']} activations, 2 threads, medians of {args.repeats}", "",
             f"| rows | packed kernels ms | {gemm} ms | kernels / GEMM |", "|---:|---:|---:|---:|"]
    for row in r["rows"]:
        table.append(f"| {row['rows']} | {row['kernel_ms']:.2f} | {row['dequant_gemm_ms']:.2f} | "
                     f"{row['kernel_ms'] / row['dequant_gemm_ms']:.2f} |")
    table += ["", "Matrices: " + ", ".join(f"{n} {s}" for n, s in r["matrices"].items())]
    RESULTS.mkdir(exist_ok=True)
    model = Path(args.model).stem if Path(args.model).exists() else args.model
    stem = f"packed-gemm-{model}-{r['isa']}{'-avx2-gemm' if args.emulate_avx2 else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
