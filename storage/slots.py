"""Commit slots: how many of a process's shards commit at once (Store, Shard.commit_slots).

A semaphore that hands a slot let go to the thread that has waited longest. threading's
Semaphore lets the thread that lets go take the slot straight back, before the one it woke
runs: a shard's committer, finding more requests queued, would then commit again and again
while another shard's waited, and a message to sixteen shards waits for the slowest.

The slots only spare the CPU (the committers' fight for the GIL), so a wait for one is
bounded: a committer that waited `stall` seconds goes on without a slot. Its holders are
then waiting on something else, a disk or another process's writer lock (a cluster's hung
volume, say), and that must hold back no other shard for longer.
"""

from __future__ import annotations

import threading
from collections import deque

STALL = 0.25  # seconds: far above a slot's usual hold (a batch's record, 1-3 ms)


class CommitSlots:
    def __init__(self, slots: int, *, stall: float = STALL):
        if slots < 1:
            raise ValueError("at least one slot")
        self._free = slots
        self._stall = stall
        self._lock = threading.Lock()
        self._waiting: deque[threading.Lock] = deque()

    def take(self) -> bool:
        """Wait for a slot, `stall` seconds at most: whether one was taken (then `give_back`)."""
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        if turn.acquire(timeout=self._stall):  # released by the give_back that hands the slot over
            return True
        with self._lock:
            try:
                self._waiting.remove(turn)
                return False
            except ValueError:
                pass  # handed over meanwhile: taken
        turn.acquire()
        return True

    def give_back(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()  # the slot passes on, never freed between
            else:
                self._free += 1
