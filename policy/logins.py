"""Slowing down password guessing: a delay per client address that grows with its failed
logins (IMAP, POP3, submission), and a cap on concurrent password checks.

The delay is applied before a failure is answered, so a client that guesses in one session
waits as long as one that reconnects. It doubles with each failure from the same address
(1 s, 2 s, 4 s … up to MAX_DELAY) and is forgotten FORGET_AFTER seconds after the last
failure; a successful login clears it. The table is bounded: past MAX_TRACKED addresses the
oldest entries go first (an attacker with many addresses is slowed per address, never
able to grow the table).

Shared by every process of a data dir: given a path, the table is a small LMDB environment
there (`<data_dir>/logins.lmdb`), so failures counted by imapd, pop3d, mtad and each of
mtad's SO_REUSEPORT workers add up: a guesser gains nothing by landing on another process
or protocol. A failure is one read-modify-write transaction (LMDB serializes writers across
processes, so two failures at once both count), not synced to disk: a crash may forget
some failures, which costs the guesser nothing it could not get by waiting FORGET_AFTER.
Times are wall-clock, the one clock all processes share. Without a path (tests of a core)
the table lives in this process alone.

argon2id costs ~64 MiB and ~100 ms per check, so concurrent checks are capped: a flood of
logins queues instead of exhausting memory.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import OrderedDict
from pathlib import Path

import lmdb

from policy.shared_table import open_shared

FIRST_DELAY = 1.0
MAX_DELAY = 15.0
FORGET_AFTER = 600.0
MAX_TRACKED = 100_000
CONCURRENT_CHECKS = 4
_MAP_SIZE = 64 << 20  # MAX_TRACKED entries of ~60 bytes need a few MiB; sparse on Linux
_ENTRY = struct.Struct("<Id")  # failures, time of the last one


class LoginThrottle:
    def __init__(self, path: Path | None = None, *, clock=time.time, concurrent_checks: int = CONCURRENT_CHECKS):
        self._clock = clock
        self._table: _MemoryTable | _SharedTable = _SharedTable(path) if path is not None else _MemoryTable()
        self.checks = asyncio.Semaphore(concurrent_checks)

    def failures(self, ip: str) -> int:
        return self._table.count(ip, self._clock() - FORGET_AFTER)

    def failed(self, ip: str) -> float:
        """Record a failure; the seconds to wait before answering it."""
        count = self._table.add_failure(ip, self._clock())
        return min(MAX_DELAY, FIRST_DELAY * 2 ** (count - 1))

    def succeeded(self, ip: str) -> None:
        self._table.forget(ip)

    def close(self) -> None:
        self._table.close()


class _MemoryTable:
    """This process's failures: ip -> (count, last failure), oldest first."""

    def __init__(self) -> None:
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def count(self, ip: str, since: float) -> int:
        entry = self._failures.get(ip)
        return entry[0] if entry is not None and entry[1] >= since else 0

    def add_failure(self, ip: str, now: float) -> int:
        count = self.count(ip, now - FORGET_AFTER) + 1
        self._failures[ip] = (count, now)
        self._failures.move_to_end(ip)
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)
        return count

    def forget(self, ip: str) -> None:
        self._failures.pop(ip, None)

    def close(self) -> None:
        pass


class _SharedTable:
    """The failures of every process of the data dir, in LMDB: ip -> (count, last failure)."""

    def __init__(self, path: Path):
        self._env = open_shared(path, _MAP_SIZE)

    def count(self, ip: str, since: float) -> int:
        with self._env.begin() as txn:
            raw = txn.get(ip.encode())
        if raw is None:
            return 0
        count, last = _ENTRY.unpack(raw)
        return count if last >= since else 0

    def add_failure(self, ip: str, now: float) -> int:
        key = ip.encode()
        with self._env.begin(write=True) as txn:
            raw = txn.get(key)
            count = 0
            if raw is not None:
                count, last = _ENTRY.unpack(raw)
                if last < now - FORGET_AFTER:
                    count = 0
            count += 1
            txn.put(key, _ENTRY.pack(count, now))
            if raw is None and txn.stat()["entries"] > MAX_TRACKED:
                _trim(txn, now)
        return count

    def forget(self, ip: str) -> None:
        key = ip.encode()
        with self._env.begin() as txn:
            if txn.get(key) is None:
                return  # the common case, a login with no failure before: no write
        with self._env.begin(write=True) as txn:
            txn.delete(key)

    def close(self) -> None:
        self._env.close()


def _trim(txn: lmdb.Transaction, now: float) -> None:
    """Drop what is forgotten anyway, then the oldest, down to 90% of MAX_TRACKED: one
    scan per MAX_TRACKED / 10 new addresses at most."""
    entries = [(_ENTRY.unpack(raw)[1], key) for key, raw in txn.cursor()]
    entries.sort()
    excess = len(entries) - MAX_TRACKED * 9 // 10
    for i, (last, key) in enumerate(entries):
        if i >= excess and last >= now - FORGET_AFTER:
            break
        txn.delete(key)
