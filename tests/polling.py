"""Waiting for something to happen in a test: poll a condition until a deadline instead of sleeping
a fixed time and hoping (a fixed sleep is too short on a loaded 2-core machine and wasted on an idle
one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.02) -> T:
    """Call `condition` until it returns something truthy, and return that; AssertionError naming
    `what` when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(interval)


async def wait_until_async(condition: Callable[[], T], what: str, timeout: float = 30.0,
                           interval: float = 0.02) -> T:
    """`wait_until` inside an event loop: sleeps with asyncio, so the loop's other tasks run."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        await asyncio.sleep(interval)
