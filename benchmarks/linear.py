"""Decode GEMV kernels on CPU at Qwen2.5-0.5B / 1.5B shapes: weight bytes read per second.

    .venv/bin/python benchmarks/linear.py

bf16 F.linear; int8 weight-only (`_weight_int8pack_mm`, per-channel scales, bf16 activations);
int4 weight-only (`_weight_int4pack_mm_for_cpu`, group 32). One token (M=1) and a batch of 32.
Writes benchmarks/results/linear.json and .md. This chooses the in-memory formats of quantized weights.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
SHAPES = [(896, 4864), (4864, 896), (1536, 8960), (8960, 1536), (896, 151936)]  # (in, out)


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for k, n in SHAPES:
            w = torch.randn(n, k) * 0.02
            wb = w.bfloat16()
            scales = w.abs().amax(1) / 127
            w8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
            group = 32
            wg = w.view(n, k // group, group)
            mn, mx = wg.amin(-1), wg.amax(-1)
            scale4 = ((mx - mn) / 15).clamp(min=1e-8)
            q4 = torch.round((wg - mn[..., None]) / scale4[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
            zeros = mn + scale4 * 8
            packed = torch._convert_weight_to_int4pack_for_cpu(q4, 1)
            sz = torch.stack([scale4.t(), zeros.t()], -1).bfloat16().contiguous()  # [k/group, n, 2]
            for m in (1, 32):
                x = torch.randn(m, k).bfloat16()
                ref = x.float() @ w.t()
                t_bf16 = timed(lambda: F.linear(x, wb))
                t_int8 = timed(lambda: torch._weight_int8pack_mm(x, w8, scales.bfloat16()))
                t_int4 = timed(lambda: torch._weight_int4pack_mm_for_cpu(x, packed, group, sz))
                err8 = (torch._weight_int8pack_mm(x, w8, scales.bfloat16()).float() - ref).abs().max().item()
                err4 = (torch._weight_int4pack_mm_for_cpu(x, packed, group, sz).float() - ref).abs().max().item()
                row = {"in": k, "out": n, "batch": m,
                       "bf16_gb_s": n * k * 2 / t_bf16 / 1e9, "int8_gb_s": n * k / t_int8 / 1e9,
                       "int4_gb_s": n * k / 2 / t_int4 / 1e9,
                       "bf16_us": t_bf16 * 1e6, "int8_us": t_int8 * 1e6, "int4_us": t_int4 * 1e6,
                       "int8_err": err8, "int4_err": err4}
                rows.append({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()})
                print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "linear.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| in × out | batch | bf16 µs | int8 µs | int4 µs | bf16 GB/s | int8 GB/s | int4 GB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['in']}×{r['out']} | {r['batch']} | {r['bf16_us']:.0f} | {r['int8_us']:.0f} | {r['int4_us']:.0f} | "
              f"{r['bf16_gb_s']:.1f} | {r['int8_gb_s']:.1f} | {r['int4_gb_s']:.1f} |" for r in rows]
    (RESULTS / "linear.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
