"""The outbound queues a process works with, as one: what the delivery runner, the SMTP
agents' enqueues, the CLI, `status`, the metrics and the backup go through.

A single node has one queue, <data_dir>/queue (storage/queue.py), and a QueueSet of it
only passes every call on. In a cluster each shard has its own queue, <shard_path>/queue,
on the shard's volume: mail queued on a node moves with the shard when the node dies or is
drained, and the shard's next owner sends it. The set is told which shards to hold open
(`shards()`: for the runner and the enqueues, those this node holds; for the CLI and the
readers, those whose queue is on disk) and whether this node may write a shard now
(`fence(shard)`, the check of storage/shard.py "Fencing", which each queue asks at every
commit: a write to a shard this node does not hold fails with NotOwnerError).

    queues.begin(envelope)      a new message, into the queue of a shard held here now: the
                                submitting user's, else one chosen by its queue id; none
                                held: NoQueueError (SMTP 451 4.3.0, nothing acknowledged)
    queues.changed()            moves with any queue's change and with the shards held
    queues.due(), next_due()    across every queue (opening the queues of shards taken,
                                closing those of shards released: refresh())
    queues.get/open/record/flush/hold/release/remove(qid)   in the queue that has `qid`
    queues.list()               every message of every queue, oldest first
    queues.release_gone()       close the queues of shards no longer held (a volume detaches
                                only once every process let go of it)

Queue ids are unique across queues and nodes (storage/queue_ids.py: the time in
microseconds and 25 random bits), so an id names one message wherever it is queued.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import lmdb

from conf.logfmt import EventLogger
from storage.datadir import DataDir
from storage.doorbell import bell_path, ring
from storage.errors import NoQueueError, NotOwnerError, NotQueuedError, StoreError
from storage.pinning import Release
from storage.queue import Enqueue, Queue, QueuedMessage, QueueEnvelope, Result, RunnerLock
from storage.queue_ids import new_id

OPEN_BACKOFF = 30.0  # seconds before a shard's queue that failed to open is tried again

_log = EventLogger("storage.queue")


def queues_on_disk(data_dir: DataDir) -> list[int]:
    """The shards whose directory holds a queue (a cluster's; on a node, the volumes attached)."""
    return [n for n in range(data_dir.shards) if (data_dir.shard_path(n) / "queue" / "queue.lmdb").is_dir()]


class QueueSet:
    def __init__(self, data_dir: DataDir, *, shards: Callable[[], Iterable[int]] | None = None,
                 fence: Callable[[int], bool] | None = None, shard_of: Callable[[str], int] | None = None,
                 runner_lock: Path | None = None, pin: Callable[[int], Release] | None = None):
        """A single node's queue when `shards` is None; else a cluster node's shard queues:
        `shards()` those to hold open, `fence(n)` whether this node may write shard n now,
        `shard_of(account)` an account's shard, `runner_lock` this node's runner lock file,
        `pin(n)` shard n's pin (storage/pinning.py) while its queue is open here."""
        self.data_dir = data_dir
        self._shards = shards
        self._fence = fence or (lambda number: True)
        self._pin = pin
        self._shard_of = shard_of
        self._runner_lock = runner_lock if runner_lock is not None else data_dir.path / "queue" / "runner.lock"
        self._ring = functools.partial(ring, bell_path(self._runner_lock))  # the runner's doorbell
        self._queues: dict[int | None, Queue] = {}
        self._where: dict[str, int | None] = {}  # qid -> the queue it was last seen in
        self._failed: dict[int, float] = {}  # shard -> until when its queue is not tried again
        self._lock = threading.Lock()  # the maps
        self._opening = threading.Lock()  # opens and closes, one at a time (one environment a process)
        self._generation = 0  # moves when a queue is opened or closed
        self._closed = False

    @property
    def sharded(self) -> bool:
        return self._shards is not None

    def queues(self) -> list[Queue]:
        """The queues open now (a single node: its one queue, opened here)."""
        if not self.sharded:
            return [self._single()]
        with self._lock:
            return [q for _, q in sorted(self._queues.items())]

    def ready(self) -> None:
        """A single node's queue opened now (or the error why not); a cluster's shard queues
        open as a message or the runner needs them, but one must be writable now:
        NoQueueError for a node that holds no shard, told at RCPT rather than after the data."""
        if not self.sharded:
            self._single()
        elif not any(self._fence(number) for number in set(self._shards())):
            raise NoQueueError("no shard is served by this node just now")

    def runner_lock(self) -> RunnerLock:
        """The lock of the runner that works these queues (a single node's is in its queue's
        directory, made with it; a cluster node's in the data dir, named by the node)."""
        if not self.sharded:
            self._single()
        return RunnerLock(self._runner_lock)

    def close(self) -> None:
        with self._opening:
            with self._lock:
                self._closed = True
                queues, self._queues = list(self._queues.values()), {}
            for queue in queues:
                queue.close()

    def __enter__(self) -> QueueSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- which queues are open ------------------------------------------------------------

    def refresh(self) -> None:
        """Open the queue of every shard `shards()` names, close the others'."""
        if not self.sharded:
            return
        wanted = set(self._shards())
        self.release_gone(wanted)
        now = time.monotonic()
        for number in sorted(wanted):
            if number not in self._queues and self._failed.get(number, 0.0) <= now:
                self._open(number)

    def release_gone(self, wanted: set[int] | None = None) -> None:
        """Close the queues of shards no longer held: their volumes can be detached."""
        if not self.sharded:
            return
        wanted = set(self._shards()) if wanted is None else wanted
        with self._opening:
            with self._lock:
                gone = [(n, self._queues.pop(n)) for n in list(self._queues) if n not in wanted]
                if gone:
                    self._generation += 1
                    self._where = {qid: n for qid, n in self._where.items() if n in self._queues}
            for number, queue in gone:
                queue.close()
                _log.info("queue_closed", shard=number)

    def _open(self, number: int) -> Queue | None:
        with self._opening:
            with self._lock:
                if self._closed:
                    raise StoreError("queue is closed")
                queue = self._queues.get(number)
            if queue is not None:
                return queue
            try:
                queue = Queue(self.data_dir.shard_path(number) / "queue", shard=number,
                              fence=lambda: self._fence(number),
                              pin=functools.partial(self._pin, number) if self._pin is not None else None,
                              on_due=self._ring)
            except NotOwnerError:
                return None  # its volume is being detached: not opened, nothing wrong
            except (StoreError, OSError, lmdb.Error) as e:
                self._failed[number] = time.monotonic() + OPEN_BACKOFF
                _log.error("queue_open_failed", shard=number, error=str(e))
                return None
            with self._lock:
                self._queues[number] = queue
                self._generation += 1
            self._failed.pop(number, None)
            _log.info("queue_opened", shard=number, recovered_orphans=len(queue.recovered[0]),
                      dropped=len(queue.recovered[1]))
            return queue

    def _single(self) -> Queue:
        with self._lock:
            queue = self._queues.get(None)
        if queue is not None:
            return queue
        with self._opening:
            with self._lock:
                if self._closed:
                    raise StoreError("queue is closed")
                queue = self._queues.get(None)
                if queue is None:
                    queue = self._queues[None] = Queue(self.data_dir, on_due=self._ring)
            return queue

    # -- enqueueing -----------------------------------------------------------------------

    def begin(self, envelope: QueueEnvelope) -> Enqueue:
        """A new message, in the queue of a shard this node may write now (see above)."""
        if not self.sharded:
            return self._single().begin(envelope)
        qid = new_id()
        number = self._shard_for(qid, envelope.user)
        queue = self._open(number)
        if queue is None:
            raise StoreError(f"the queue of shard {number} cannot be opened")
        return queue.begin(envelope, qid)

    def _shard_for(self, qid: str, user: str | None) -> int:
        """The user's shard if this node may write it now, else the first it may write from
        the one the id hashes to: one or two fence checks, not one per shard held."""
        claimed = sorted(set(self._shards()))
        if user and self._shard_of is not None:
            number = self._shard_of(user)
            if number in claimed and self._fence(number):
                return number
        if claimed:
            start = int.from_bytes(hashlib.blake2b(qid.encode(), digest_size=8).digest(), "big") % len(claimed)
            for number in claimed[start:] + claimed[:start]:
                if self._fence(number):
                    return number
        raise NoQueueError("no shard is served by this node just now")

    # -- the runner's side ----------------------------------------------------------------

    def changed(self) -> object:
        """A value that moves with any queue's change and with the shards held (cheap: one
        read of the node table, and each queue's last transaction id). A queue that cannot
        be read counts as unchanged (-1): the runner's next look at it says why."""
        if not self.sharded:
            try:
                queue = self._single()
            except StoreError:
                return -1
            return _changed(queue)
        held = frozenset(self._shards())
        with self._lock:
            queues, generation = list(self._queues.values()), self._generation
        return held, generation, tuple(_changed(q) for q in queues)

    def due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[QueuedMessage]:
        """Queue.due across every queue: up to `limit`, the longest due first."""
        if not self.sharded:
            return self._single().due(now, limit, exclude)
        self.refresh()
        exclude = frozenset(exclude)
        found: list[tuple[float, QueuedMessage]] = []
        for queue in self.queues():
            try:
                if not queue.writable():
                    continue  # released, or the lease lapsed: not sent from here (refresh closes it)
                messages = queue.due(now, limit, exclude)
            except (StoreError, lmdb.Error) as e:
                if not queue.closed:  # closed meanwhile: its shard was released, nothing to say
                    _log.error("queue_unreadable", shard=queue.shard, reason=str(e))
                continue
            with self._lock:
                for message in messages:
                    self._where[message.id] = queue.shard
            found.extend((min(r.next_attempt for r in m.pending), m) for m in messages)
        found.sort(key=lambda item: item[0])
        return [m for _, m in found[:limit]]

    def next_due(self) -> float | None:
        if not self.sharded:
            return self._single().next_due()
        self.refresh()
        times = []
        for queue in self.queues():
            try:
                when = queue.next_due()
            except (StoreError, lmdb.Error):
                continue
            if when is not None:
                times.append(when)
        return min(times, default=None)

    # -- one message, wherever it is ------------------------------------------------------

    def find(self, qid: str) -> Queue | None:
        """The open queue that has message `qid`, None if none has it."""
        if not self.sharded:
            return self._single()
        with self._lock:
            queue = self._queues.get(self._where.get(qid, -1))
        if queue is not None and not queue.closed:
            return queue
        for queue in self.queues():
            try:
                if queue.get(qid) is not None:
                    with self._lock:
                        self._where[qid] = queue.shard
                    return queue
            except (StoreError, lmdb.Error):
                continue
        return None

    def get(self, qid: str) -> QueuedMessage | None:
        queue = self.find(qid)
        return queue.get(qid) if queue is not None else None

    def open(self, qid: str) -> BinaryIO:
        queue = self.find(qid)
        if queue is None:
            raise NotQueuedError(f"no such message in the queue: {qid}")
        return queue.open(qid)

    def read(self, qid: str) -> bytes:
        with self.open(qid) as f:
            return f.read()

    def record(self, qid: str, results: Iterable[Result]) -> QueuedMessage | None:
        queue = self.find(qid)
        if queue is None:
            return None
        message = queue.record(qid, results)
        if message is None:
            with self._lock:
                self._where.pop(qid, None)
        return message

    def mark_delay_warned(self, qid: str) -> None:
        queue = self.find(qid)
        if queue is not None:
            queue.mark_delay_warned(qid)

    # -- the CLI's side -------------------------------------------------------------------

    def list(self) -> list[QueuedMessage]:
        """Every message of every open queue, oldest first."""
        messages = [m for queue in self.queues() for m in queue.list()]
        if self.sharded:
            messages.sort(key=lambda m: (m.created, m.id))
        return messages

    def flush(self, qid: str | None = None) -> int:
        """Queue.flush: one message (NotOwnerError if its shard is not this node's now), or
        every message of the queues this node may write (the others are their owners')."""
        if qid is not None:
            queue = self.find(qid)
            return queue.flush(qid) if queue is not None else 0
        return sum(queue.flush() for queue in self.queues() if queue.writable())

    def hold(self, qid: str) -> bool:
        queue = self.find(qid)
        return queue.hold(qid) if queue is not None else False

    def release(self, qid: str) -> bool:
        queue = self.find(qid)
        return queue.release(qid) if queue is not None else False

    def remove(self, qid: str) -> bool:
        queue = self.find(qid)
        return queue.remove(qid) if queue is not None else False


def _changed(queue: Queue) -> int:
    try:
        return queue.changed()
    except StoreError:
        return -1  # closed meanwhile (in a cluster the generation moves too), or unreadable
