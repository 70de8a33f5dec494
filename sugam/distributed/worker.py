"""Starting a tensor-parallel group: the worker processes of one machine, and what each rank runs.

`start_group` (rank 0, one machine) starts ranks 1..N-1 as processes of its own, joins them in a
process group and watches them; `run_worker` is what every rank other than 0 runs, whether started
here or by torchrun: load its share of the model, check it loaded the same file as rank 0, then run
the steps rank 0 sends until it says stop.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import torch

from .parallel import TensorParallel, cpu_sets, fingerprint, free_port, pin_to

log = logging.getLogger(__name__)


_started: TensorParallel | None = None   # the group this process started (one at a time)
_torchrun: TensorParallel | None = None  # the group torchrun started this process in (python -m sugam.serve)


def started_group() -> TensorParallel | None:
    return _started


def torchrun_group() -> TensorParallel | None:
    return _torchrun


def join_torchrun_group(tp: TensorParallel) -> None:
    global _torchrun
    _torchrun = tp


def start_group(world_size: int, path: Path, dtype: str | torch.dtype, device: torch.device, quantization: str,
                cpus_per_rank: int | None = None, timeout: float = 60.0) -> TensorParallel:
    """Rank 0 on this machine: start the other ranks and join them. A group this process started
    before (an earlier LLM) is stopped first: a process belongs to one group at a time."""
    global _started
    if _started is not None:
        _started.shutdown()
        _started = None
    init_method = f"tcp://127.0.0.1:{free_port()}"
    cpus = cpu_sets(world_size, cpus_per_rank) if device.type == "cpu" else [[]] * world_size
    context = multiprocessing.get_context("spawn")
    workers = []
    for rank in range(1, world_size):
        proc = context.Process(target=_worker_process, name=f"sugam-tp-rank{rank}", daemon=True,
                               args=(rank, world_size, init_method, str(path), str(dtype), str(device),
                                     quantization, cpus[rank], timeout, logging.getLogger().level))
        proc.start()
        workers.append(proc)
    if cpus[0]:
        pin_to(cpus[0])
    tp = TensorParallel.initialize(0, world_size, device, init_method, timeout)
    tp.workers = workers
    _started = tp
    tp.watch_workers()
    tp.check_same_model(fingerprint(path))
    log.info("tensor parallelism: %d ranks on this machine (%s), CPUs per rank %s", world_size,
             "gloo" if device.type != "cuda" else "nccl", [len(c) for c in cpus] if cpus[0] else "-")
    return tp


def run_worker(tp: TensorParallel, path: Path, dtype: str | torch.dtype, device: torch.device,
               quantization: str) -> None:
    """A rank other than 0: its share of the model, then rank 0's steps until it stops."""
    from ..llm import pick_dtype
    from ..loader import open_checkpoint
    from ..quant.policy import checkpoint_mode

    tp.check_same_model(fingerprint(path))
    checkpoint = open_checkpoint(path)
    mode = quantization
    if mode == "auto" and dtype != "auto" and pick_dtype(dtype, device) == torch.float32:
        mode = "none"  # as load_engine decides on rank 0
    mode = checkpoint_mode(mode, checkpoint.info, device.type)
    from ..engine.runner import ModelRunner

    runner = ModelRunner(checkpoint, device, pick_dtype(dtype, device, quantized=mode != "none"), mode, tp=tp)
    runner.follow()


def _worker_process(rank: int, world_size: int, init_method: str, path: str, dtype: str, device: str,
                    quantization: str, cpus: list[int], timeout: float, log_level: int) -> None:
    logging.basicConfig(level=log_level or logging.WARNING, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    _exit_with_parent()
    if cpus:
        pin_to(cpus)
    dev = torch.device(device)
    try:
        tp = TensorParallel.initialize(rank, world_size, dev, init_method, timeout)
        run_worker(tp, Path(path), dtype if dtype in ("auto", "float32", "bfloat16", "float16") else
                   dtype.removeprefix("torch."), dev, quantization)
    except BaseException as exc:  # noqa: BLE001 - any failure ends this rank; rank 0 sees it and stops
        log.error("rank %d failed: %s", rank, exc)
        os._exit(1)   # not a clean teardown: tearing down a group with a dead peer can hang
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _exit_with_parent() -> None:
    """A worker whose rank 0 is gone (killed, crashed) must not linger: it exits within a second."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="sugam-tp-parent", daemon=True).start()
