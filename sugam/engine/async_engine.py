"""An asyncio front for the engine: `generate()` is an async stream per request, `abort()` stops one.

The engine is not thread-safe, so one background task owns it: it runs `step()` in a worker thread
(keeping the event loop free for I/O), and applies requests and aborts that arrived meanwhile
between steps. Requests are validated in the caller's task, so a bad one fails at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from ..sampling_params import SamplingParams
from .llm_engine import EngineStats, LLMEngine
from .sequence import RequestOutput, Sequence


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()          # guards the two inboxes below
        self._new: list[Sequence] = []
        self._aborts: set[str] = set()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs as the request advances; the last one has `finished=True`.
        Leaving the loop early (or being cancelled, e.g. a client disconnect) aborts the request."""
        seq = self.engine.create_sequence(prompt, params, request_id)
        if seq.request_id in self._queues:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[seq.request_id] = queue
        with self._lock:
            self._new.append(seq)
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(seq.request_id, None)
            if not finished:
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        with self._lock:
            self._aborts.add(request_id)
        self._ensure_loop()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def num_queued(self) -> int:
        """Requests accepted but not yet running (including those not yet handed to the engine)."""
        return max(0, len(self._queues) - len(self.engine.running))

    def _ensure_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # e.g. a generator finalised after its loop ended: the inbox keeps the abort
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())
        self._wake.set()

    def _apply_inboxes(self) -> None:
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, set()
        for seq in new:
            if seq.request_id in aborts:
                aborts.discard(seq.request_id)
            else:
                self.engine.waiting.append(seq)
        for request_id in aborts:
            self.engine.abort_request(request_id)

    def _step(self) -> list[RequestOutput]:
        self._apply_inboxes()
        return self.engine.step()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    outputs = await asyncio.to_thread(self._step)
                except Exception as exc:  # fail the requests in flight, keep serving new ones
                    for request_id, queue in list(self._queues.items()):
                        queue.put_nowait(exc)
                        self.engine.abort_request(request_id)
                    break
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                with self._lock:
                    pending = bool(self._new or self._aborts)
                if not pending and not self.engine.has_unfinished():
                    break
