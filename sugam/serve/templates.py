"""Chat templates rendered in worker processes, so that a slow or hostile render costs its own
request only.

A render in a thread of the server holds the GIL for as long as it runs (up to the 5 s limit of
sugam/chat_template.py), and the engine thread, which gives the GIL up inside every torch op,
waits up to the switch interval each time it wants it back: a normal request beside a hostile
render took 3 s instead of 0.06 s. In a separate process the render has its own interpreter.

The workers are spawned (never forked: the server has torch threads) and import only this module
and sugam.chat_template (jinja2, no torch: sugam/__init__.py imports its public names lazily), so
starting one takes a fraction of a second. When the server runs as a console script, spawn also
re-imports that script in each worker (sugam.cli, which imports no torch at the top either);
`python -m sugam` is not re-imported. Each worker keeps its compiled templates by source
(`compile_template` is cached).

The render limits still apply inside the worker and end a runaway render by themselves; as a
second guard, a render that has not answered within its wall-clock limit plus a grace gets the
pool terminated and replaced. A worker that dies (killed, out of memory) is replaced as well.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..chat_template import (
    DEFAULT_LIMITS,
    ChatTemplateError,
    TemplateLimitError,
    TemplateLimits,
    render_template,
)

log = logging.getLogger(__name__)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TemplateRenderer:
    """A small pool of render processes for the server. `start()` spawns and warms them; `render()`
    is awaited from the event loop; `close()` stops them."""

    def __init__(self, workers: int = 2, grace: float = 2.0):
        self.workers = max(1, workers)
        self.grace = grace
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_worker_init)
        # Workers are spawned on demand: one trivial render per worker, submitted at once, starts
        # them all now rather than in front of a request.
        for _ in range(self.workers):
            pool.submit(render_template, "", {}, DEFAULT_LIMITS)
        return pool

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ChatTemplateError("the server is shutting down")
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    def start(self) -> float:
        """Spawn the workers and wait for them to render once; returns the seconds it took."""
        began = time.monotonic()
        pool = self._current()
        futures = [pool.submit(render_template, "{{ x }}", {"x": "ok"}, DEFAULT_LIMITS) for _ in range(self.workers)]
        for future in futures:
            future.result(timeout=120)
        return time.monotonic() - began

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Terminate `pool`'s workers (a render stuck past its limits, or a dead worker) and let the
        next render start a fresh pool."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        _terminate(pool)

    def submit(self, source: str, variables: Mapping[str, Any],
               limits: TemplateLimits = DEFAULT_LIMITS) -> tuple[ProcessPoolExecutor, Future[str]]:
        pool = self._current()
        try:
            return pool, pool.submit(render_template, source, variables, limits)
        except (BrokenProcessPool, RuntimeError):  # broken since the last render: one new pool, once
            self._discard(pool)
            pool = self._current()
            return pool, pool.submit(render_template, source, variables, limits)

    async def render(self, source: str, variables: Mapping[str, Any],
                     limits: TemplateLimits = DEFAULT_LIMITS) -> str:
        """Render in a worker. Raises ChatTemplateError (TemplateLimitError for a limit) like
        `render_template`, and ChatTemplateError when the worker dies."""
        pool, future = self.submit(source, variables, limits)
        try:
            # The deadline counts from submission: a render queued behind two slow ones may be
            # stopped early, which is the price of two workers.
            return await asyncio.wait_for(asyncio.wrap_future(future), limits.max_seconds + self.grace)
        except TimeoutError:
            log.warning("a chat template render did not stop within its limits; restarting the render workers")
            await asyncio.to_thread(self._discard, pool)
            raise TemplateLimitError("time", f"it ran longer than {limits.max_seconds:g} s") from None
        except BrokenProcessPool:
            log.warning("a chat template render worker died; restarting the render workers")
            await asyncio.to_thread(self._discard, pool)
            raise ChatTemplateError("the chat template render worker died while rendering these messages "
                                    "(out of memory?)") from None

    def pids(self) -> list[int]:
        pool = self._pool
        return list(getattr(pool, "_processes", None) or {}) if pool is not None else []

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            _terminate(pool)


def _terminate(pool: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no way to stop a running call (terminate_workers is Python 3.14):
    # signal its processes, then let it reap them.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=2)
        if process.is_alive():
            process.kill()
