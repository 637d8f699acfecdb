"""Slowing down password guessing: a delay per client address that grows with its failed
logins (IMAP, POP3, submission), and a cap on concurrent password checks.

The delay is applied before a failure is answered, so a client that guesses in one session
waits as long as one that reconnects. It doubles with each failure from the same address
(1 s, 2 s, 4 s … up to MAX_DELAY) and is forgotten FORGET_AFTER seconds after the last
failure; a successful login clears it. The table is bounded: past MAX_TRACKED addresses the
oldest entries go first (an attacker with many addresses is slowed per address, never
able to grow the table).

argon2id costs ~64 MiB and ~100 ms per check, so concurrent checks are capped: a flood of
logins queues instead of exhausting memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

FIRST_DELAY = 1.0
MAX_DELAY = 15.0
FORGET_AFTER = 600.0
MAX_TRACKED = 100_000
CONCURRENT_CHECKS = 4


class LoginThrottle:
    def __init__(self, *, clock=time.monotonic, concurrent_checks: int = CONCURRENT_CHECKS):
        self._clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # ip -> (count, last failure)
        self.checks = asyncio.Semaphore(concurrent_checks)

    def failures(self, ip: str) -> int:
        entry = self._failures.get(ip)
        if entry is None:
            return 0
        count, last = entry
        if self._clock() - last > FORGET_AFTER:
            del self._failures[ip]
            return 0
        return count

    def failed(self, ip: str) -> float:
        """Record a failure; the seconds to wait before answering it."""
        count = self.failures(ip) + 1
        self._failures[ip] = (count, self._clock())
        self._failures.move_to_end(ip)
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)
        return min(MAX_DELAY, FIRST_DELAY * 2 ** (count - 1))

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)
