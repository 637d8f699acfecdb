"""Commit slots: how many of a process's shards commit at once (Store, Shard.commit_slots).

A semaphore that hands a slot let go to the thread that has waited longest. threading's
Semaphore lets the thread that lets go take the slot straight back, before the one it woke
runs: a shard's committer, finding more requests queued, would then commit again and again
while another shard's waited, and a message to sixteen shards waits for the slowest.
"""

from __future__ import annotations

import threading
from collections import deque


class CommitSlots:
    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError("at least one slot")
        self._free = slots
        self._lock = threading.Lock()
        self._waiting: deque[threading.Lock] = deque()

    def __enter__(self) -> CommitSlots:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return self
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        turn.acquire()  # released by the exit that hands this thread its slot
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()  # the slot passes on, never freed between
            else:
                self._free += 1
