"""Old build vs new build, same run: single-stream decode (speed.py's measurement) and aggregate
throughput at 32 concurrent requests (throughput.py's), the builds taking turns.

    .venv/bin/python benchmarks/compare_builds.py --old REV [--new REV_OR_FOLDER] [--rounds 3] [--single-stream] [--tag T]

Revisions are unpacked into a temporary folder (so that edits made while it runs do not leak in);
`--new` may also be a folder (default: this working tree). Each measurement runs in a fresh process whose `import sugam` is that build's.
Writes benchmarks/results/compare-builds-MODEL.json and .md (medians of the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Aggregate: throughput.py's run_batch over 32 prompts of 128-512 tokens, 128 tokens each, 32 at once.
THROUGHPUT_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import sugam, throughput
from sugam import LLM
assert sugam.__file__.startswith(sys.argv[1]), sugam.__file__
llm = LLM(sys.argv[2], max_num_seqs=32, enable_prefix_caching=False)
prompts = throughput.random_prompts(32, 128, 512, 0)
throughput.run_batch(llm, prompts[:2], 4)
elapsed, tokens = throughput.run_batch(llm, prompts, 128)
print("RESULT " + json.dumps({"aggregate_tok_s": tokens / elapsed}))
"""


# Single stream: speed.py's own child (a 512-token prompt, then 128 tokens decoded; medians of 3).
SPEED_CHILD = """
import sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import sugam, speed
assert sugam.__file__.startswith(sys.argv[1]), sugam.__file__
speed.child("sugam", sys.argv[2], 3)
"""


def unpack(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(tree: Path, model: str, aggregate: bool = True) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="2")
    result: dict[str, float] = {}
    # The speed child prints which sugam it imported, so that a wrong path cannot go unnoticed.
    speed = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(tree), model],
                           capture_output=True, text=True, env=env, cwd=tree)
    outs = [speed]
    if aggregate:
        outs.append(subprocess.run([sys.executable, "-c", THROUGHPUT_CHILD, str(tree), model],
                                   capture_output=True, text=True, env=env, cwd=tree))
    for out in outs:
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{tree}: no result\n{out.stderr[-2000:]}")
        result.update(json.loads(line[7:]))
    return {k: result.get(k, float("nan")) for k in ("decode_tok_s", "prefill_tok_s", "aggregate_tok_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision of the baseline")
    ap.add_argument("--new", default=str(ROOT), help="revision or folder of the build to compare (default: this tree)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-stream", action="store_true", help="skip the 32-request aggregate (the slow part)")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. the kernels' build)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from sugam.hardware import cpu_label
    from sugam.registry import pull

    model = str(pull(args.model))
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        new = Path(args.new) if Path(args.new).is_dir() else unpack(args.new, Path(tmp) / "new")
        trees = {"old": unpack(args.old, Path(tmp) / "old"), "new": new}
        for _ in range(args.rounds):  # turns: a machine whose speed drifts hurts both alike
            for name, tree in trees.items():
                runs[name].append(measure(tree, model, not args.single_stream))
                print(name, runs[name][-1], flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratios = {k: medians["new"][k] / medians["old"][k] for k in medians["new"]}
    new_rev = args.new if not Path(args.new).is_dir() else subprocess.run(
        ["git", "-C", args.new, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    cpu = cpu_label()
    isa = os.environ.get("SUGAM_NATIVE_ISA", "the CPU's best")
    lines = [f"# Old vs new build: {args.model}, {cpu}, kernels: {isa}, 2 threads, medians of {args.rounds} rounds in turns", "",
             f"old = `{args.old}`, new = `{new_rev}`", "",
             "| build | decode tok/s (1 stream) | prefill tok/s (512) | aggregate tok/s (32 concurrent) |",
             "|---|---:|---:|---:|"]
    for name in ("old", "new"):
        m = medians[name]
        lines.append(f"| {name} | {m['decode_tok_s']:.1f} | {m['prefill_tok_s']:.0f} | {m['aggregate_tok_s']:.1f} |")
    lines.append(f"| new / old | {ratios['decode_tok_s']:.3f} | {ratios['prefill_tok_s']:.3f} | "
                 f"{ratios['aggregate_tok_s']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    stem = f"compare-builds-{Path(model).stem}" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"model": args.model, "cpu": cpu, "old": args.old, "new": new_rev, "runs": runs, "medians": medians,
         "new_over_old": ratios}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
