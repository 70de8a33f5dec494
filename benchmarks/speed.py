"""Single-stream speed on the same GGUF file: sugam vs llama.cpp vs transformers.

    .venv/bin/python benchmarks/speed.py [--model qwen2.5-coder-0.5b-instruct] [--engines sugam llamacpp transformers]

Engines: sugam (default: the GGUF's own precision, weights stay quantized), sugam-int4 (every
matrix requantized to int4: faster, lower quality; see benchmarks/quality.py), sugam-pytorch (sugam's
own kernels off: PyTorch's int8/int4 kernels, the path of CPUs without AVX-512), sugam-avx2-emulated
(that path as an AVX2 CPU takes it, fp32 compute, with ATen, oneDNN and MKL held to AVX2 on this CPU:
an approximation of an AVX2 machine, not a measurement of one), llama.cpp, transformers. For each engine, in a fresh process (so peak RSS is its own): prefill tok/s of a 512-token prompt,
time to first token, decode tok/s over 128 tokens (EOS ignored), peak RSS; medians of --repeats.
"Bandwidth achieved" = bytes of weights read per decoded token x decode tok/s, printed next to the
machine's bandwidth measured in the same run (median of probes taken before each engine and after). llama.cpp comes from `pip install llama-cpp-python`
(built from its source); engines that are not installed are skipped. --threads (default 2) for every
engine and for the bandwidth probe.
Writes benchmarks/results/speed-MODEL.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT_LEN, DECODE_LEN = 512, 128


def prompt_ids(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(PROMPT_LEN)]


def peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM starts afresh at exec; ru_maxrss would carry the parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def bench_sugam(path: str, repeats: int, quantization: str = "auto", dtype: str = "auto") -> dict:
    from sugam import LLM, SamplingParams

    llm = LLM(path, max_num_seqs=1, max_model_len=2048, enable_prefix_caching=False, quantization=quantization,
              dtype=dtype)
    weight_bytes = _sugam_bytes_read_per_token(llm.engine.runner.model)
    ids = prompt_ids()
    prefill, ttft, decode = [], [], []
    for r in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        t_prefill = time.perf_counter() - start
        start, first, n = time.perf_counter(), None, 0
        for out in llm.stream_outputs(ids[:16], SamplingParams(temperature=0, max_tokens=DECODE_LEN, ignore_eos=True)):
            if first is None:
                first = time.perf_counter()
            n = len(out.outputs[0].token_ids)
        end = time.perf_counter()
        if r:
            prefill.append(PROMPT_LEN / t_prefill)
            ttft.append(t_prefill)
            decode.append((n - 1) / (end - first))
    return {"prefill_tok_s": statistics.median(prefill), "ttft_512_s": statistics.median(ttft),
            "decode_tok_s": statistics.median(decode), "weight_bytes": weight_bytes}


def bench_llamacpp(path: str, repeats: int) -> dict:
    from llama_cpp import Llama

    threads = int(os.environ["OMP_NUM_THREADS"])
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    ids = prompt_ids()
    prefill, decode = [], []
    for r in range(repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        t_prefill = time.perf_counter() - start
        llm.reset()
        llm.eval(ids[:16])
        start = time.perf_counter()
        for _ in range(DECODE_LEN - 1):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([token])
        end = time.perf_counter()
        if r:
            prefill.append(PROMPT_LEN / t_prefill)
            decode.append((DECODE_LEN - 1) / (end - start))
    return {"prefill_tok_s": statistics.median(prefill), "ttft_512_s": PROMPT_LEN / statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), "weight_bytes": _gguf_tensor_bytes(path)}


def bench_llama_bench(path: str, repeats: int) -> dict:
    """llama.cpp's own llama-bench binary (SUGAM_LLAMA_BENCH, e.g. a build held to AVX2: see
    ../shared/peers/llama-cpp.md): pp512 and tg128, medians of its samples."""
    binary = os.environ["SUGAM_LLAMA_BENCH"]
    out = subprocess.run([binary, "-m", path, "-p", str(PROMPT_LEN), "-n", str(DECODE_LEN), "-t", os.environ["OMP_NUM_THREADS"],
                          "-r", str(repeats), "-o", "json"], capture_output=True, text=True, check=True)
    runs = json.loads(out.stdout)
    speed = {("pp" if r["n_prompt"] else "tg"): statistics.median(r["samples_ts"]) for r in runs}
    return {"prefill_tok_s": speed["pp"], "ttft_512_s": PROMPT_LEN / speed["pp"], "decode_tok_s": speed["tg"],
            "weight_bytes": _gguf_tensor_bytes(path), "build": runs[0].get("cpu_info", "")}


def bench_transformers(path: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.bfloat16).eval()
    weight_bytes = _bytes_read_per_token(model)
    ids = torch.tensor([prompt_ids()])
    prefill, decode = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):
            start = time.perf_counter()
            model(ids)
            t_prefill = time.perf_counter() - start
            short = ids[:, :16]
            start = time.perf_counter()
            model.generate(short, max_new_tokens=1, do_sample=False, pad_token_id=0)
            t_first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(short, max_new_tokens=DECODE_LEN, min_new_tokens=DECODE_LEN, do_sample=False, pad_token_id=0)
            t_all = time.perf_counter() - start
            if r:
                prefill.append(PROMPT_LEN / t_prefill)
                decode.append((DECODE_LEN - 1) / (t_all - t_first))
    return {"prefill_tok_s": statistics.median(prefill), "ttft_512_s": PROMPT_LEN / statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), "weight_bytes": weight_bytes}


def _gguf_tensor_bytes(path: str) -> int:
    """Bytes of the tensors a decode step reads: all but the input embedding (one row of it is
    read), unless the LM head is tied to it."""
    from sugam.loader.gguf import GGUFFile

    tensors = GGUFFile(Path(path)).tensors
    skip = {"token_embd.weight"} if "output.weight" in tensors else set()
    return sum(t.raw.nbytes for name, t in tensors.items() if name not in skip)


def _sugam_bytes_read_per_token(model) -> int:
    """Weight bytes a sugam decode step reads: every parameter and quantized buffer except an
    untied input embedding (one row of it is read)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if model.config.tie_word_embeddings:
        return total
    embed = model.model.embed_tokens
    return total - sum(t.numel() * t.element_size() for t in [*embed.parameters(), *embed.buffers()])


def _bytes_read_per_token(model) -> int:
    """Parameter bytes a decode step reads: all but an untied input embedding."""
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") \
        else model.model.embed_tokens.weight
    head = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None else getattr(getattr(model, "lm_head", None), "weight", embed)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = head.data_ptr() == embed.data_ptr()
    return total if tied else total - embed.numel() * embed.element_size()


def machine_bandwidth_samples(threads: int = 2, n: int = 3) -> list[float]:
    """GB/s of a torch sum over 2 GiB with this many threads. The shared machine's reading moves a lot
    (30-77 GB/s seen), so it is sampled before each engine and after the last, and the median is used."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**29, dtype=torch.float32)  # 2 GiB
    x.sum()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        x.sum()
        samples.append(x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return samples


ENGINES = {"sugam": bench_sugam, "sugam-int4": lambda path, repeats: bench_sugam(path, repeats, "int4"),
           "sugam-pytorch": bench_sugam,
           "sugam-avx2-emulated": lambda path, repeats: bench_sugam(path, repeats, "gguf", "float32"),
           "sugam-avx2": lambda path, repeats: bench_sugam(path, repeats, "gguf", "float32"),
           "sugam-avx2-kernels": bench_sugam,
           "llamacpp": bench_llamacpp, "llama-bench": bench_llama_bench, "transformers": bench_transformers}
_NO_KERNELS = {"SUGAM_NATIVE_KERNELS": "0"}
_ATEN_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ENGINE_ENV = {"sugam-pytorch": _NO_KERNELS,
              "sugam-avx2-emulated": {**_NO_KERNELS, **_ATEN_AVX2},
              # what an AVX2 CPU runs by default: sugam's AVX2 kernels, fp32 compute, PyTorch's GEMMs in AVX2
              "sugam-avx2": {"SUGAM_NATIVE_ISA": "avx2", **_ATEN_AVX2},
              # sugam's AVX2 kernels on an AVX-512 CPU, everything else as it is (what an AVX-512 CPU
              # without AVX-512 BF16 ran before the AVX-512 build stopped needing it)
              "sugam-avx2-kernels": {"SUGAM_NATIVE_ISA": "avx2"}}


def child(engine: str, path: str, repeats: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    result = ENGINES[engine](path, repeats)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--engines", nargs="+", default=["sugam", "sugam-int4", "llamacpp", "transformers"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix of the result files (keeps another run's tables)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every engine, in turns; the table has medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bench", default="", help="llama-bench binary for the llama-bench engine")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.repeats)

    from sugam.registry import pull, resolve
    path = str(pull(args.model) if not Path(args.model).exists() else resolve(args.model))
    probe = []
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # engines take turns: a machine whose speed drifts hurts them alike
        for engine in args.engines:
            probe += machine_bandwidth_samples(args.threads)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), SUGAM_LLAMA_BENCH=args.llama_bench, **ENGINE_ENV.get(engine, {}))
            out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--child", engine, path],
                                 capture_output=True, text=True, env=env)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{engine}: skipped ({(out.stderr.strip().splitlines() or ['no output'])[-1][:200]})")
                continue
            r = json.loads(line[7:])
            r["bandwidth_gb_s"] = r["weight_bytes"] * r["decode_tok_s"] / 1e9
            runs.setdefault(engine, []).append(r)
            print(engine, {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    rows = {engine: {k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], (int, float)) else rs[0][k]
                     for k in rs[0]} for engine, rs in runs.items()}
    probe += machine_bandwidth_samples(args.threads)
    bandwidth = statistics.median(probe)
    base = rows.get("llamacpp") or rows.get("llama-bench")
    from sugam.hardware import cpu_label

    cpu = cpu_label()
    table = [f"# Single-stream speed: {args.model}, {cpu}, {args.threads} thread(s), machine bandwidth {bandwidth:.1f} GB/s "
             f"(median of {len(probe)} probes, {min(probe):.0f}-{max(probe):.0f}); medians of {args.rounds} round(s) "
             f"of the engines in turn", "",
             "| engine | decode tok/s | × llama.cpp | prefill tok/s (512) | × llama.cpp | weights read/token | "
             "bandwidth achieved | peak RSS |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ratio_d = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "–"
        ratio_p = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}" if base else "–"
        table.append(f"| {name} | {r['decode_tok_s']:.1f} | {ratio_d} | {r['prefill_tok_s']:.0f} | {ratio_p} | "
                     f"{r['weight_bytes'] / 1e9:.2f} GB | {r['bandwidth_gb_s']:.1f} GB/s "
                     f"({r['bandwidth_gb_s'] / bandwidth:.0%}) | {r['peak_rss_mb']:.0f} MB |")
    RESULTS.mkdir(exist_ok=True)
    name = (Path(args.model).stem if Path(args.model).exists() else args.model) + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"speed-{name}.json").write_text(json.dumps(
        {"model": args.model, "cpu": cpu, "machine_bandwidth_gb_s": bandwidth, "bandwidth_probes_gb_s": probe, "engines": rows}, indent=2) + "\n")
    (RESULTS / f"speed-{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
