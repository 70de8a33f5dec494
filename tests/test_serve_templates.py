"""The server's chat-template worker processes: same text as the in-process render, limit errors
across the process boundary, and recovery when a worker dies or a render will not stop."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from concurrent.futures import Future

import pytest
from polling import wait_until, wait_until_async
from test_chat_template import QWEN_SHAPED

from sugam.chat_template import (
    ChatTemplateError,
    TemplateLimitError,
    TemplateLimits,
    render_template,
)
from sugam.serve.templates import TemplateRenderer

SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
VARIABLES = {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                 {"role": "assistant", "content": "<think>\nhm\n</think>\n\nhi"},
                 {"role": "user", "content": "what is 2+2?"}],
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
    "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>", "enable_thinking": False,
}


@pytest.fixture(scope="module")
def renderer():
    r = TemplateRenderer(workers=2)
    r.start()
    yield r
    r.close()


def test_limit_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(TemplateLimitError("time", "it ran longer than 5 s")))
    assert isinstance(err, TemplateLimitError) and err.limit == "time"
    assert str(err) == "chat template stopped: it ran longer than 5 s"


def test_worker_renders_like_render_template(renderer):
    assert asyncio.run(renderer.render(QWEN_SHAPED, VARIABLES)) == render_template(QWEN_SHAPED, VARIABLES)
    with pytest.raises(ChatTemplateError, match="no"):
        asyncio.run(renderer.render("{{ raise_exception('no') }}", {}))


def test_hostile_render_stops_with_the_limit_error(renderer):
    pids = renderer.pids()
    start = time.monotonic()
    with pytest.raises(TemplateLimitError) as info:
        asyncio.run(renderer.render(SLOW, {}, TemplateLimits(max_seconds=0.5)))
    assert info.value.limit in ("time", "steps") and time.monotonic() - start < 5
    assert renderer.pids() == pids  # stopped by its own limits: the workers stay


def test_a_render_that_will_not_stop_gets_its_workers_replaced():
    r = TemplateRenderer(workers=1, grace=-0.8)  # the guard fires long before the render's own limit
    try:
        r.start()
        before = r.pids()
        with pytest.raises(TemplateLimitError, match="longer than 1 s"):
            asyncio.run(r.render(SLOW, {}, TemplateLimits(max_seconds=1.0)))
        assert asyncio.run(r.render("{{ 1 + 1 }}", {})) == "2"
        assert r.pids() and r.pids() != before
    finally:
        r.close()


def test_a_killed_worker_is_replaced(renderer, monkeypatch):
    submitted: list[Future[str]] = []
    submit = renderer.submit

    def recording_submit(*args):
        pool, future = submit(*args)
        submitted.append(future)
        return pool, future

    monkeypatch.setattr(renderer, "submit", recording_submit)

    async def kill_during_render() -> None:
        task = asyncio.ensure_future(renderer.render(SLOW, {}, TemplateLimits(max_seconds=3.0)))
        await wait_until_async(lambda: submitted and submitted[0].running(), "the slow render is under way")
        for pid in renderer.pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(ChatTemplateError, match="worker died"):
            await task

    asyncio.run(kill_during_render())
    assert asyncio.run(renderer.render("{{ 'still' }} {{ 'here' }}", {})) == "still here"
    # killed while idle: the next render finds the pool broken and starts a fresh one
    for pid in renderer.pids():
        os.kill(pid, signal.SIGKILL)
    # ProcessPoolExecutor's own thread notices the deaths and marks the pool broken (a private flag,
    # the only sign there is); a render submitted before that would be lost with the old pool.
    wait_until(lambda: getattr(renderer._pool, "_broken", False), "the pool knows its workers died")
    assert asyncio.run(renderer.render("{{ 'again' }}", {})) == "again"


def test_close_stops_the_workers():
    r = TemplateRenderer(workers=1)
    r.start()
    (pid,) = r.pids()
    r.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ChatTemplateError, match="shutting down"):
        asyncio.run(r.render("x", {}))
