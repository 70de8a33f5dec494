"""Tensor parallelism over torch.distributed: the process group, the per-step messages, the
all-reduces, the workers, and what happens when a rank fails.

Rank 0 owns everything a request touches (HTTP, scheduler, KV block manager, sampler). Each step it
sends the step's batch (the scheduler's BatchEntry list, as JSON bytes) to the other ranks, and every
rank runs its share of the model over the same tokens; the partial products of o and down are
summed by an all-reduce (in fp32), so every rank holds the full hidden state after each layer. Only
rank 0 computes logits.

Processes: `sugam serve --tensor-parallel-size N` (or `LLM(..., tensor_parallel_size=N)`) starts
N - 1 worker processes itself on this machine (gloo on CPUs, NCCL on CUDA); under torchrun every
process is started by torchrun and `python -m sugam.serve` decides by its rank what to be.

Faults: a rank that exits makes rank 0 fail at once (a monitor thread watches the workers it
started; torchrun stops the others itself); a rank that hangs makes the next collective time out
(`timeout`). Either way rank 0 calls its failure hooks (the server answers 503, logs the reason and
exits non-zero) instead of waiting forever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SugamError

if TYPE_CHECKING:
    from ..models.qwen2 import CausalLM

log = logging.getLogger(__name__)

STOP, BATCH, KV_CACHE = 0, 1, 2      # what rank 0 sends: the kinds of message


class DistributedFailure(SugamError):
    """A rank died, hung past the timeout, or disagrees with rank 0."""


class TensorParallel:
    """This process's place in the tensor-parallel group."""

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout: float):
        self.rank, self.world_size, self.device, self.timeout = rank, world_size, device, timeout
        self.failed: str | None = None
        self._failure_hooks: list[Callable[[str], None]] = []
        self.workers: list = []              # processes this rank started (rank 0, one box)
        self._closed = False
        self.shared: SharedMemoryAllReduce | None = None
        self.all_reduce_seconds = 0.0        # time spent in all-reduces (rank 0), for benchmarks
        self.all_reduce_calls = 0

    @classmethod
    def initialize(cls, rank: int, world_size: int, device: torch.device, init_method: str = "env://",
                   timeout: float = 60.0) -> TensorParallel:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
        tp = cls(rank, world_size, device, timeout)
        tp.shared = SharedMemoryAllReduce.create(tp)
        return tp

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ---- failure ---------------------------------------------------------------------------------

    def on_failure(self, hook: Callable[[str], None]) -> None:
        self._failure_hooks.append(hook)

    def fail(self, reason: str) -> DistributedFailure:
        if self.failed is None:
            self.failed = reason
            log.error("tensor parallelism failed: %s", reason)
            for hook in self._failure_hooks:
                hook(reason)
        return DistributedFailure(reason)

    def _collective(self, what: str, fn: Callable[[], object]) -> object:
        if self.failed is not None:
            raise DistributedFailure(self.failed)
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as exc:  # a peer gone, or the timeout
            dead = self._dead_worker(wait=0.5)
            if dead:
                raise self.fail(dead) from exc
            detail = str(exc).splitlines()[0][:160]
            raise self.fail(f"{what} failed on rank {self.rank} ({detail}): a rank died or hung "
                            f"(timeout {self.timeout:.0f} s)") from exc

    def _dead_worker(self, wait: float = 0.0) -> str | None:
        """Which worker this rank started has exited, if any (waiting up to `wait` s for the OS to say)."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.exitcode is not None:
                    return f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
            if time.monotonic() >= deadline or not self.workers:
                return None
            time.sleep(0.05)

    # ---- the model's collectives ------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks in place (in fp32: gloo has no bf16 sum, and fp32 keeps the sum exact-er)."""
        start = time.perf_counter()
        buf = x if x.dtype == torch.float32 else x.float()
        if self.shared is not None and buf.numel() <= self.shared.max_elements:
            self.shared.all_reduce(buf, self)
        else:
            self._collective("all-reduce", lambda: dist.all_reduce(buf))
        if buf is not x:
            x.copy_(buf)
        self.all_reduce_seconds += time.perf_counter() - start
        self.all_reduce_calls += 1
        return x

    # ---- rank 0 -> the others ---------------------------------------------------------------------

    def send(self, kind: int, payload: dict | None = None) -> None:
        data = json.dumps(payload or {}).encode()
        header = torch.tensor([kind, len(data)], dtype=torch.long)
        self._collective("broadcast", lambda: dist.broadcast(header, src=0))
        if data:
            body = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            self._collective("broadcast", lambda: dist.broadcast(body, src=0))

    def receive(self) -> tuple[int, dict]:
        header = torch.zeros(2, dtype=torch.long)
        self._collective("broadcast", lambda: dist.broadcast(header, src=0))
        kind, size = int(header[0]), int(header[1])
        if size == 0:
            return kind, {}
        body = torch.empty(size, dtype=torch.uint8)
        self._collective("broadcast", lambda: dist.broadcast(body, src=0))
        return kind, json.loads(bytes(body.numpy()).decode())

    def check_same_model(self, fingerprint: str) -> None:
        """Every rank must have loaded the same file: compare sha256 fingerprints, refuse otherwise."""
        mine = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective("model check", lambda: dist.all_gather(gathered, mine))
        differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differ:
            raise self.fail(f"ranks {differ} loaded another model file than rank 0 (fingerprints "
                            f"{gathered[0].numpy().tobytes().hex()[:16]}… vs {gathered[differ[0]].numpy().tobytes().hex()[:16]}…)")

    def shutdown(self) -> None:
        """Stop the other ranks (rank 0) and leave the group; safe to call twice, and after a failure."""
        if self._closed:
            return
        self._closed = True
        if self.is_driver and self.failed is None:
            try:
                self.send(STOP)
            except DistributedFailure:
                pass
        self.failed = self.failed or "the group was shut down"
        if self.shared is not None:
            self.shared.close()
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly; it is gone either way
                pass

    def watch_workers(self) -> None:
        """Rank 0: fail as soon as a worker process this rank started exits."""
        def watch() -> None:
            while self.failed is None:
                dead = self._dead_worker()
                if dead:
                    self.fail(dead)
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, name="sugam-tp-watch", daemon=True).start()


class SharedMemoryAllReduce:
    """All-reduce of small tensors (decode steps) through shared memory, for ranks on one machine.

    gloo's all-reduce goes through TCP on loopback: ~1-2 ms each on the 2-core VM this was built on,
    48 of them a decode step of Qwen2.5-0.5B. Here each rank writes its part into its own slot of a
    shared buffer, raises its sequence number, waits until every rank's has reached it, and sums the
    slots in rank order (the same sum on every rank): ~20 us. Two buffers, used in turns, so that a
    fast rank never overwrites a slot a slow one is still reading. x86 only (its stores are seen in
    order, so a raised sequence number means the data before it is there); elsewhere gloo's.
    """

    max_elements = 1 << 18          # larger tensors (prefill) take gloo: their latency is amortized

    def __init__(self, tp: TensorParallel, name: str):
        import mmap

        import numpy as np

        n, world = self.max_elements, tp.world_size
        size = 64 * world + 2 * world * n * 4
        # A file in /dev/shm (RAM) that every rank maps; rank 0 removes its name once all have it, so
        # nothing is left behind whatever happens to the processes later.
        path = os.path.join("/dev/shm", name)
        if tp.rank == 0:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
            os.close(fd)
        tp._collective("shared memory setup", lambda: dist.barrier())
        fd = os.open(path, os.O_RDWR)
        try:
            self.memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        tp._collective("shared memory setup", lambda: dist.barrier())
        if tp.rank == 0:
            os.unlink(path)
        self.flags = np.frombuffer(self.memory, dtype=np.int64, count=8 * world)[::8]  # one cache line each
        self.slots = torch.frombuffer(self.memory, dtype=torch.float32, offset=64 * world,
                                      count=2 * world * n).view(2, world, n)
        self.rank, self.sequence = tp.rank, 0

    @classmethod
    def create(cls, tp: TensorParallel) -> SharedMemoryAllReduce | None:
        import platform

        if (tp.world_size == 1 or tp.device.type != "cpu" or os.environ.get("SUGAM_TP_SHARED_MEMORY", "1") == "0"
                or platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm")):
            return None
        host = hashlib.sha256(socket.gethostname().encode()).digest()[:8]
        hosts = [torch.empty(8, dtype=torch.uint8) for _ in range(tp.world_size)]
        tp._collective("host check", lambda: dist.all_gather(hosts, torch.tensor(list(host), dtype=torch.uint8)))
        if any(not torch.equal(h, hosts[0]) for h in hosts):
            return None      # ranks on several machines: gloo's TCP
        name = torch.tensor(list(os.urandom(8)), dtype=torch.uint8)
        tp._collective("shared memory setup", lambda: dist.broadcast(name, src=0))
        return cls(tp, f"sugam-tp-{name.numpy().tobytes().hex()}")

    def all_reduce(self, x: torch.Tensor, tp: TensorParallel) -> None:
        n = x.numel()
        self.sequence += 1
        part, flags, sequence = self.sequence & 1, self.flags, self.sequence
        self.slots[part, self.rank, :n].copy_(x.reshape(-1))
        flags[self.rank] = sequence
        spins = 0
        started = None
        while flags.min() < sequence:
            spins += 1
            if spins % 4096 == 0:  # now and then: is a rank gone (watcher) or past the timeout?
                started = started or time.monotonic()
                if tp.failed is not None:
                    raise DistributedFailure(tp.failed)
                if time.monotonic() - started > tp.timeout:
                    waiting = [r for r, f in enumerate(flags) if f < sequence]
                    raise tp.fail(f"ranks {waiting} did not reach an all-reduce within {tp.timeout:.0f} s: "
                                  "a rank died or hung")
        x.view(-1).copy_(self.slots[part, :, :n].sum(0))

    def close(self) -> None:
        del self.flags, self.slots
        try:
            self.memory.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with the process
            pass


class AllReduceOutput(nn.Module):
    """A row-parallel projection (o or down): this rank's partial product, summed over the ranks.

    For sugam's packed GGUF kernels the partial product is taken in fp32 (the kernels quantize the
    activations the same way from fp32 as from bf16) and rounded once after the sum, as one rank
    rounds its single product: bf16 results then match tp=1's but for fp32 summation order."""

    def __init__(self, base: nn.Module, tp: TensorParallel):
        super().__init__()
        self.base = base
        self.tp = tp
        self.fp32_partials = getattr(base, "weight_format", None) == "packed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_partials and x.dtype != torch.float32:
            return self.tp.all_reduce(self.base(x.float())).to(x.dtype)
        return self.tp.all_reduce(self.base(x))


def split_layers(model: CausalLM, tp: TensorParallel) -> None:
    """Wrap each layer's o and down projections with the all-reduce (after fuse_projections)."""
    layer: Any   # nn.ModuleList yields nn.Module: a DecoderLayer here
    for layer in model.model.layers:
        layer.self_attn.o_proj = AllReduceOutput(layer.self_attn.o_proj, tp)
        layer.mlp.down_proj = AllReduceOutput(layer.mlp.down_proj, tp)


def fingerprint(path: Path) -> str:
    """sha256 over each file's name, size and first and last MiB: cheap, and different for any two
    different model files in practice (a GGUF's header holds its whole tensor table)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_sets(world_size: int, cpus_per_rank: int | None) -> list[list[int]]:
    """Disjoint CPU sets, one per rank, in the order the OS numbers them (neighbouring numbers
    usually share a core complex / NUMA node), `cpus_per_rank` each (default: an equal share)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = cpus_per_rank or max(1, len(available) // world_size)
    return [available[(r * per) % len(available):(r * per) % len(available) + per] or available[:1]
            for r in range(world_size)]


def pin_to(cpus: list[int]) -> None:
    torch.set_num_threads(len(cpus))
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
