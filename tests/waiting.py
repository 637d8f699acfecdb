"""Waiting in tests for something another process does: the condition's first true value,
or AssertionError naming what did not happen in time; and how long an event loop went
without a turn while a coroutine waited."""

from __future__ import annotations

import asyncio
import time


def wait_until(condition, timeout: float = 30.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


async def ticking(awaitable, every: float = 0.01) -> tuple[object, float]:
    """(what `awaitable` gave, the longest gap between two turns of a ticker that asked to
    run every `every` seconds meanwhile): how long the loop was held up by it."""
    task = asyncio.ensure_future(awaitable)
    gaps, last = [0.0], time.monotonic()
    while not task.done():
        await asyncio.sleep(every)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    return await task, max(gaps)
