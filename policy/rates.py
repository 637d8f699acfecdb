"""Rate limits as token buckets: per client address (connections, messages, recipients a
minute) and per authenticated user (messages, recipients an hour and a day), [rates].

A bucket holds up to `limit` tokens and refills at `limit / per` tokens a second, so a
client may burst `limit` at once and then goes at the steady rate; `take` spends `count`
tokens or, when fewer are left, spends none and says no. A bucket is named by its key and
its period, so "user:alice" an hour and "user:alice" a day are two buckets. `limit` 0 is
no limit (the config's "0 turns a limit off"). A `count` over `limit` never passes.

Shared by every process of a data dir: given a path, the buckets are a small LMDB
environment there (`<data_dir>/rates.lmdb`), so mtad's SO_REUSEPORT workers, among which
the kernel spreads one client's connections, spend from one bucket: a client gains
nothing by landing on another worker. Each `take` is one write transaction (read, refill,
spend, write back): LMDB lets one writer at a time in across processes, so two takes at
once never both spend the last token. Not synced to disk: a crash may refill some buckets,
which gives a client at most one more burst. Times are wall-clock, the one clock all
processes share; a clock that steps back refills nothing. The table is bounded: past
MAX_TRACKED buckets, full ones (as good as absent) and then the oldest are dropped, so a
flood of addresses cannot grow it. Without a path (tests of a core) the buckets live in
this process alone. Open it in the process that uses it (LMDB forbids use across fork):
mtad's workers build theirs after they are forked.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from pathlib import Path

import lmdb

from policy.shared_table import open_shared

MAX_TRACKED = 200_000
_MAP_SIZE = 128 << 20  # MAX_TRACKED buckets of ~80 bytes need ~30 MiB; sparse on Linux
_ENTRY = struct.Struct("<ddd")  # tokens, time they were counted, the period (for trimming)
# Refills are sums of float quotients: 7 tokens a minute, 60/7 s later, may come to
# 0.9999999999 of a token. Such dust counts as the token it is.
_DUST = 1e-9


def _refill(entry: tuple[float, float, float] | None, now: float, per: float, limit: int) -> float:
    """The tokens in a bucket at `now`."""
    if entry is None:
        return float(limit)
    tokens, last, _ = entry
    return min(float(limit), tokens + max(0.0, now - last) * limit / per)


class RateLimiter:
    def __init__(self, path: Path | None = None, clock=time.time):
        self._clock = clock
        self._table: _MemoryTable | _SharedTable = _SharedTable(path) if path is not None else _MemoryTable()

    def take(self, key: str, per: float, limit: int, count: int = 1) -> bool:
        """Spend `count` tokens of the bucket (`key`, `per` seconds, `limit` tokens) if it
        has them: True. Else spend nothing: False."""
        if limit <= 0:
            return True
        if per <= 0:
            raise ValueError(f"a rate's period must be positive, got {per!r}")
        return self._table.take(f"{key}\0{per:g}", self._clock(), per, limit, count)

    @property
    def wants_trim(self) -> bool:
        """The table is past MAX_TRACKED buckets: trim() it, off the event loop (a scan of
        every bucket), which take() itself never does, so that it can run on the loop."""
        return self._table.wants_trim

    def trim(self) -> None:
        self._table.trim(self._clock())

    def close(self) -> None:
        self._table.close()


class _MemoryTable:
    """This process's buckets: name -> (tokens, time, per), the least recently used first."""

    wants_trim = False  # it drops the least recently used bucket as it goes

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()

    def take(self, name: str, now: float, per: float, limit: int, count: int) -> bool:
        tokens = _refill(self._buckets.get(name), now, per, limit)
        if tokens + _DUST < count:
            return False
        self._buckets[name] = (max(0.0, tokens - count), now, per)
        self._buckets.move_to_end(name)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return True

    def trim(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


class _SharedTable:
    """The buckets of every process of the data dir, in LMDB: name -> (tokens, time, per)."""

    def __init__(self, path: Path):
        self._env = open_shared(path, _MAP_SIZE)
        self.wants_trim = False

    def take(self, name: str, now: float, per: float, limit: int, count: int) -> bool:
        """One unsynced write transaction, about 10 us: mtad calls it on its event loop.
        LMDB's writer lock is held as briefly by whichever process holds it."""
        key = name.encode()
        with self._env.begin(write=True) as txn:
            raw = txn.get(key)
            tokens = _refill(None if raw is None else _ENTRY.unpack(raw), now, per, limit)
            if tokens + _DUST < count:
                return False  # nothing written: the stored count and time still hold
            txn.put(key, _ENTRY.pack(max(0.0, tokens - count), now, per))
            if raw is None and txn.stat()["entries"] > MAX_TRACKED:
                self.wants_trim = True
        return True

    def trim(self, now: float) -> None:
        self.wants_trim = False
        with self._env.begin(write=True) as txn:
            if txn.stat()["entries"] > MAX_TRACKED:
                _trim(txn, now)

    def close(self) -> None:
        self._env.close()


def _trim(txn: lmdb.Transaction, now: float) -> None:
    """Drop the full buckets (refilled: the same as none), then the oldest, down to 90% of
    MAX_TRACKED: one scan per MAX_TRACKED / 10 new buckets at most."""
    entries = []
    for key, raw in txn.cursor():
        _, last, per = _ENTRY.unpack(raw)
        entries.append((last + per > now, last, key))  # full ones first, then by age
    entries.sort()
    excess = len(entries) - MAX_TRACKED * 9 // 10
    for i, (filling, _, key) in enumerate(entries):
        if i >= excess and filling:
            break
        txn.delete(key)
