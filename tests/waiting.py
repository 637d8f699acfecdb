"""Waiting in tests for something another process does: the condition's first true value,
or AssertionError naming what did not happen in time."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float = 30.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")
