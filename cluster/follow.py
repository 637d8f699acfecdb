"""A daemon process's side of a shard's release: mtad, imapd and pop3d (and mtad's extra
workers) follow the claims this node's agent publishes (cluster/local.py), and let go of
the shards it hands over (issue 18, item 3).

The agent releases a shard in its own process (cluster/agent.py: claim withdrawn from the
table, fence cleared, flush, close; detach once the node's processes let go). Every daemon
process of the node opened the shard too, and would keep its files open under the volume,
and its sessions on it. So, every FOLLOW_INTERVAL, each daemon process reads the table's
claims (one LMDB read) and, for every shard the node no longer holds:
- ends the sessions served here of the shard's accounts, each listener's own way (IMAP
  `* BYE [UNAVAILABLE]`, RFC 5530; POP3 `-ERR [SYS/TEMP]`, RFC 3206; wire/protocol.py
  ServerFactory.end_released), and drops at once what each held open on the volume (a POP3
  maildrop lock, messages read ahead, an APPEND's file): the client connects again and is
  proxied, by any node, to the shard's next owner. Sessions proxied to another node are
  not this node's to end;
- closes the shard in the store (Store.close_shard: its commits queued and reads in
  progress end first; its LMDB environment, writer lock and directory handle closed), so
  that no file of the volume stays open here and it can be detached.
The mtad processes close the shard's outbound queue likewise (mtad/outbound/runner.py).

The store of a daemon opens a shard only while the node holds it (open_store's `held`):
once the node takes it again, the first use opens it, finishing first what a crash left.
Until then a use of it raises NotOwnerError, which each protocol answers as temporary.

Whatever has a file of the shard open holds the shard's pin (cluster/pins.py): the store's
handle, a message file being written or read, the maildrop lock, the shard's queue. The
agent runs the detach command once the last pin is let go, within FOLLOW_INTERVAL of the
claim's withdrawal as a rule (or after [cluster] let_go_wait, logged: let_go_timeout), so the
command finds the volume free and needs no retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from cluster.local import NodeTable
from conf.logfmt import EventLogger
from storage import Store

FOLLOW_INTERVAL = 1.0  # seconds between two looks at the node's claims

EndSessions = Callable[[frozenset[int]], int]  # held shards -> how many sessions it ended


class Follower:
    def __init__(self, store: Store, table: NodeTable, log: EventLogger | None = None):
        self.store = store
        self.table = table
        self.log = log or EventLogger("cluster.follow")
        # Each listener's ServerFactory.end_released (imapd, pop3d): registered as they start.
        self.listeners: list[EndSessions] = []
        # What else a process holds open of a shard: closed with its store's (mtad's
        # QueueSet.release_gone: the runner closes them too, but it stops first at a stop).
        self.releasers: list[Callable[[set[int]], None]] = []
        self._stopping: asyncio.Event | None = None  # made by run(), in its loop

    def held(self) -> frozenset[int]:
        """The shards this node holds now: its claims, while its lease is good (past its
        deadline the agent drops them all, or is dead and etcd will give them to others)."""
        claims = self.table.claims()
        return frozenset(claims) if claims and self.table.lease_left() > 0 else frozenset()

    def end_sessions(self, held: frozenset[int]) -> int:
        """On the event loop: end the sessions of accounts on shards not in `held`."""
        return sum(end(held) for end in self.listeners)

    def close_released(self, held: frozenset[int]) -> list[int]:
        """In a thread: close every shard open here that is not in `held` (it may wait for
        commits and reads in flight)."""
        closed = []
        for number in self.store.open_shards():
            if number not in held and self.store.close_shard(number, released=True):
                self.log.info("shard_closed", shard=number)
                closed.append(number)
        for release in self.releasers:
            release(set(held))
        return closed

    async def run(self, interval: float = FOLLOW_INTERVAL) -> None:
        """Until stop() (or a cancel): look, end, close. A failure costs one look, never the
        loop. It runs on through the daemon's stop: a node that stops makes its shards
        "leaving", and their next owner can claim them only once every process of the node
        has let go of them, so a process that stopped looking would hold them (and a message
        coming in for them, waiting for that next owner) until its stop ended."""
        self._stopping = stopping = asyncio.Event()
        while not stopping.is_set():
            try:
                held = self.held()
                self.end_sessions(held)
                if self.releasers or any(n not in held for n in self.store.open_shards()):
                    await asyncio.to_thread(self.close_released, held)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next look tries again
                self.log.error("follow_failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)

    def stop(self) -> None:
        """run() ends after the look under way (a shard being closed is closed whole)."""
        if self._stopping is not None:
            self._stopping.set()
