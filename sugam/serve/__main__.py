"""`python -m sugam.serve MODEL [sugam serve's options]`: the server as torchrun starts it.

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 -m sugam.serve qwen2.5-coder-0.5b-instruct --port 8000

Every process joins torchrun's group (gloo on CPUs, NCCL on CUDA); the tensor-parallel size is the
group's size. Rank 0 loads its share of the model and serves HTTP (only it listens); every other
rank loads its share and runs the steps rank 0 sends (docs/DISTRIBUTED.md). Without torchrun's
environment this is plain `sugam serve`.
"""

from __future__ import annotations

import logging
import os
import sys

from ..cli import build_parser
from ..cli import main as cli_main
from ..errors import SugamError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or "RANK" not in os.environ:
        return cli_main(["serve", *argv])
    rank = int(os.environ["RANK"])
    args = build_parser().parse_args(["serve", *argv])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    import torch

    from ..distributed.parallel import TensorParallel
    from ..llm import pick_device

    if args.threads or args.cpus_per_rank:
        torch.set_num_threads(args.threads or args.cpus_per_rank)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        tp = TensorParallel.initialize(rank, world_size, device, "env://", args.distributed_timeout)
        from ..distributed.worker import join_torchrun_group

        join_torchrun_group(tp)
        if rank == 0:
            args.tensor_parallel_size = world_size
            from ..cli import cmd_serve

            cmd_serve(args)
            return 0
        from ..distributed.worker import run_worker
        from ..registry import resolve

        run_worker(tp, resolve(args.model), args.dtype, device, args.quantization)
        return 0
    except SugamError as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
