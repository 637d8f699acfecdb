"""The outbound queue: mail for other domains, durable until each recipient is done.

    <data_dir>/queue/             a single node's queue
    <shard_path>/queue/           in a cluster, one per shard, on its volume (storage/queues.py)
      queue.lmdb/     the index (storage/queue_records.py): one record per message
      msg/<QID>       one spool file per message, the bytes as received (CRLF)
      runner.lock     held by the one delivery runner of this data dir (a single node's
                      queue; a cluster node's runner holds <data_dir>/runner.<node>.lock)

Enqueueing is streamed and two-phase, like a store delivery (storage/delivery.py):

    with queue.begin(envelope) as enqueue:
        enqueue.write(chunk)                      # as the bytes arrive
        qid = enqueue.commit(prepend=signature)   # durable: then, and only then, the 250

The first IN_MEMORY bytes wait in memory (most mail is smaller, and an event loop should
not wait on the file system for it); the rest goes to the spool file as it arrives.
commit() makes the file, fsyncs it and msg/, and then commits the index record with sync,
before it returns. `prepend` (header lines made once the whole message is known: a DKIM
signature) goes into the record, so the spool file is never rewritten; read() and open()
give prepend + file, which is what is sent, and what `size` counts.

Durable order, and what a crash (kill -9 included) leaves:
- A spool file exists before its record and outlives it (removal commits the record's
  deletion first, then unlinks). So a file without a record is either being written by a
  live process, or was never acknowledged (a crash before commit) or already finished (a
  crash before the unlink): the latter two are removed when a Queue is next opened.
- A writer holds flock(LOCK_EX) on its spool file from creation to the end of its commit,
  so the recovery of another process (the CLI opening the queue on a live server) tells a
  live enqueue from a dead one without guessing: it removes only a file it can lock and
  whose record is still missing once it holds the lock. The kernel drops a flock when its
  holder dies. A writer checks, once it holds its lock, that its file is still the one at
  the path (a recovery may have judged it dead and removed it in between), and makes it
  again if not.
- A record whose file is missing (lost, or removed by hand) can never be sent: it is
  logged as an error and dropped.

Each change is one LMDB write transaction committed with fsync (record() included: what the
remote side acknowledged is never sent twice once recorded). Processes share the queue:
every SMTP worker enqueues, the one delivery runner (runner_lock()) records, the CLI
holds, releases, flushes and removes; LMDB's writer lock serializes them, readers never
wait. The runner sees another process's change through changed(), the id of the newest
transaction a read sees, from LMDB's shared memory without a file access (as
storage/watch.py does).

Fencing (cluster mode): a shard's queue is written only by the node that holds the shard.
Its `fence()` is asked last in every write transaction, under LMDB's writer lock (the
check the shard's own commits make, storage/shard.py "Fencing": the node table's claim
against the revision recorded in the shard); if it says no, nothing of the batch is
written and each caller gets NotOwnerError. Recovery's drops are writes too: a queue
opened by a node that does not hold its shard leaves them to the owner.

Pinning (cluster mode): a shard's queue is on the shard's volume, so it holds the shard's
pin (storage/pinning.py) from its open to its close, and so does each spool file open
beyond that: one being written (Enqueue), one being read (open()). The node detaches the
volume once every pin is let go.

One Queue per process and directory (LMDB: an environment is opened once per process), and
opened after any fork. Every method is synchronous and thread-safe; an event loop calls
commit(), record() and the rest in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lmdb

from conf.logfmt import EventLogger
from wire import metrics
from storage import queue_records as records
from storage.datadir import DataDir
from storage.errors import NotOwnerError, NotQueuedError, StoreError, store_error
from storage.queue_commit import Committer
from storage.lmdbenv import open_databases
from storage.maildir import fsync_dir, make_private_dirs
from storage.pinning import Pin, Release, not_pinned, take
from storage.queue_ids import is_id, new_id
from storage.queue_records import BOUNCED, DEFERRED, DELIVERED, FINAL, PENDING, QUEUED, MessageRecord, RecipientRecord

__all__ = ["QUEUED", "DEFERRED", "DELIVERED", "BOUNCED", "Queue", "Enqueue", "QueueEnvelope", "QueuedRecipient",
           "QueuedMessage", "RecipientState", "Result", "RunnerLock"]

DATABASES = ("messages", "due")
MAP_SIZE = 4 << 30  # address space, not disk
IN_MEMORY = 64 << 10
MAX_PREPEND = 64 << 10
NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 §4.1
ORIGINS = ("submission", "forward", "dsn")

_log = EventLogger("storage.queue")


# -- what callers give and get ------------------------------------------------------------


@dataclass(frozen=True)
class QueuedRecipient:
    address: str
    orcpt: str | None = None  # RFC 3461 §4.2 ORCPT, as given ("rfc822;a@b")
    notify: tuple[str, ...] = ()  # () = the default (FAILURE and DELAY); ("NEVER",) = none


@dataclass(frozen=True)
class QueueEnvelope:
    sender: str  # "" for the null reverse-path (a DSN)
    recipients: tuple[QueuedRecipient, ...]
    envid: str | None = None  # RFC 3461 §4.4 ENVID
    ret: str | None = None  # RFC 3461 §4.3: "FULL" or "HDRS"
    smtputf8: bool = False  # RFC 6531
    eight_bit: bool = False  # BODY=8BITMIME (RFC 6152)
    origin: str = "submission"  # "submission", "forward" (an alias), "dsn"
    user: str | None = None  # the authenticated user, for the log and `queue show`


@dataclass(frozen=True)
class RecipientState:
    address: str
    orcpt: str | None
    notify: tuple[str, ...]
    state: str  # QUEUED, DEFERRED, DELIVERED, BOUNCED
    attempts: int
    next_attempt: float
    last_reply: str | None  # "451 4.4.1 ..." as the remote (or we) answered
    remote_mta: str | None  # the host that gave that answer
    updated: float


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    created: float
    envelope: QueueEnvelope
    size: int  # bytes as sent (prepend included)
    held: bool
    delay_warned: bool
    recipients: tuple[RecipientState, ...]

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        """The recipients still to be tried (queued or deferred)."""
        return tuple(r for r in self.recipients if r.state in PENDING)


@dataclass(frozen=True)
class Result:
    """One delivery attempt's outcome for one recipient (the address as it was queued)."""

    address: str
    state: str  # DEFERRED, DELIVERED, BOUNCED
    reply: str  # "550 5.1.1 <x>: no such user" (the remote's, or ours)
    remote_mta: str | None = None
    next_attempt: float | None = None  # required for DEFERRED


# -- the queue ------------------------------------------------------------------------------


class Queue:
    def __init__(self, where: DataDir | Path, *, shard: int | None = None,
                 fence: Callable[[], bool] | None = None, pin: Pin | None = None,
                 on_due: Callable[[], None] | None = None) -> None:
        """The queue in `where`: a data dir (its queue/), or a queue's own directory (a
        cluster shard's, <shard_path>/queue). `shard`, `fence` and `pin`, in a cluster: the
        shard it belongs to, whether this node may write it now (see Fencing above), and
        its pin (see Pinning; NotOwnerError while the shard is being let go). `on_due()` is
        called once a commit made mail due (an enqueue, a flush, a release): it rings the
        runner's doorbell (storage/doorbell.py, storage/queues.py)."""
        self.path = where.path / "queue" if isinstance(where, DataDir) else Path(where)
        self.shard = shard
        self._fence = fence
        self._on_due = on_due
        self.pin = pin
        self._release_pin = take(pin)
        try:
            self._open()
        except BaseException:
            self._release_pin()
            raise

    def _open(self) -> None:
        """The spool and the index made or opened, what a crash left recovered."""
        self._spool = self.path / "msg"
        index = self.path / "queue.lmdb"
        make_private_dirs(self._spool)
        make_private_dirs(index)  # lmdb would make it without a search bit
        self._env = lmdb.open(str(index), map_size=MAP_SIZE, max_dbs=len(DATABASES) + 1, mode=0o600,
                              max_readers=1024, readahead=False)
        self._db = open_databases(self._env, DATABASES)
        self._committer = Committer(self._env, self._spool,
                                    check=self._check_fence if self._fence is not None else None)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # no read under way: close() may close the index
        self._readers = 0
        self._closed = False
        try:
            self.recovered: tuple[list[str], list[str]] = self.recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """After the writes waiting are committed and the reads under way are done (a
        cluster's runner closes the queue of a shard released while other threads use it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._committer.close()
        with self._idle:
            self._idle.wait_for(lambda: self._readers == 0)
        self._env.close()
        self._release_pin()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- enqueueing -------------------------------------------------------------------------

    def begin(self, envelope: QueueEnvelope, qid: str | None = None) -> Enqueue:
        """A new message for `envelope`'s recipients (a recipient named twice is queued once);
        `qid`: its id, if the caller made it already (storage/queues.py chooses a queue by it)."""
        _check_envelope(envelope)
        return Enqueue(self, envelope, qid)

    @property
    def closed(self) -> bool:
        return self._closed

    def writable(self) -> bool:
        """Whether this node may write the queue now (always, but in a cluster)."""
        return self._fence is None or self._fence()

    # -- reading ----------------------------------------------------------------------------

    def get(self, qid: str) -> QueuedMessage | None:
        with self._read() as txn:
            record = self._get(txn, qid)
        return _message(qid, record) if record is not None else None

    def list(self) -> list[QueuedMessage]:
        """Every message, oldest first."""
        with self._read() as txn:
            return [_message(key.decode(), records.decode(raw))
                    for key, raw in txn.cursor(db=self._db["messages"])]

    def due(self, now: float, limit: int, exclude: Collection[str] = ()) -> list[QueuedMessage]:
        """Up to `limit` messages, not held, with a recipient queued or deferred whose next
        attempt is at or before `now`; the longest due first. `exclude`: ids to pass over
        (the runner's deliveries in flight, which would otherwise fill every answer)."""
        found: list[QueuedMessage] = []
        upto = records.due_limit(now)
        with self._read() as txn:
            for key in txn.cursor(db=self._db["due"]).iternext(values=False):
                when, qid = records.split_due_key(key)
                if when > upto or len(found) >= limit:
                    break
                if qid in exclude:
                    continue
                record = self._get(txn, qid)
                if record is not None and record.due_at() is not None and record.due_at() <= now:
                    found.append(_message(qid, record))
        return found

    def next_due(self) -> float | None:
        """When the earliest recipient not held is due (seconds), None if none is waiting:
        how long the runner may sleep, at most."""
        with self._read() as txn:
            cursor = txn.cursor(db=self._db["due"])
            if not cursor.first():
                return None
            return records.split_due_key(cursor.key())[0] / 1000

    def read(self, qid: str) -> bytes:
        """The message as it is sent: prepend + the spool file. NotQueuedError if it is gone."""
        with self.open(qid) as f:
            return f.read()

    def open(self, qid: str) -> BinaryIO:
        """The same as a file (big messages), readable and seekable; the caller closes it.
        Once open it stays readable even if the message is removed meanwhile."""
        record = self._record_or_raise(qid)
        release = take(self.pin)  # kept attached while it is read (a slow remote server)
        try:
            fd = os.open(self._spool / qid, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            release()
            raise NotQueuedError(f"no such message in the queue: {qid}") from None
        except BaseException:
            release()
            raise
        return io.BufferedReader(_MessageReader(record.prepend, fd, release=release))

    def changed(self) -> int:
        """The id of the index's newest transaction a read sees now (any process's): it
        moves with every change, and a read that begins after this call sees that change.
        Not env.info()'s last_txnid: a committer writes the meta page (which info() reads)
        before it publishes the transaction to new readers, so in that window info() says N
        while a read still sees N-1, and the runner, having looked at N-1 under the name N,
        slept through the change (up to MAX_SLEEP; storage/accounts.py had the same)."""
        with self._using():
            try:
                with self._env.begin() as txn:
                    return txn.id()
            except lmdb.Error as e:  # e.g. the reader table full: a StoreError, as any read's
                raise StoreError(f"queue index unreadable: {e}") from e

    # -- changes ----------------------------------------------------------------------------

    def record(self, qid: str, results: Iterable[Result]) -> QueuedMessage | None:
        """Record one attempt's outcomes in one durable commit. A result for a recipient that
        is not pending (already final) is ignored. When no recipient is left queued or
        deferred, the message and its file are removed and None is returned; None too if the
        message is gone (removed meanwhile)."""
        results = list(results)
        for result in results:
            _check_result(result)
        now = time.time()
        outcome: dict[str, Any] = {}

        def change(txn: lmdb.Transaction) -> MessageRecord | None:
            record = self._get(txn, qid)
            if record is None:
                return None
            old_key = record.due_key(qid)
            by_address = {r.address: r for r in record.recipients}
            for result in results:
                recipient = by_address.get(result.address)
                if recipient is None or recipient.state not in PENDING:
                    continue
                recipient.state = result.state
                recipient.attempts += 1
                recipient.last_reply = _text(result.reply)
                recipient.remote_mta = _text(result.remote_mta) if result.remote_mta is not None else None
                recipient.updated = now
                if result.state == DEFERRED:
                    recipient.next_attempt = result.next_attempt
            if record.pending():
                self._put(txn, qid, record, old_key)
                return record
            self._delete(txn, qid, old_key)
            outcome["finished"] = record
            return None

        record = self._write(change)
        finished = outcome.get("finished")
        if finished is not None:
            self._unlink(qid)
            _log.info("queue_finished", qid=qid, delivered=sum(r.state == DELIVERED for r in finished.recipients),
                      bounced=sum(r.state == BOUNCED for r in finished.recipients))
        return _message(qid, record) if record is not None else None

    def mark_delay_warned(self, qid: str) -> None:
        def change(txn: lmdb.Transaction) -> None:
            record = self._get(txn, qid)
            if record is not None and not record.delay_warned:
                record.delay_warned = True
                self._put(txn, qid, record, record.due_key(qid))

        self._write(change)

    def flush(self, qid: str | None = None) -> int:
        """Make the pending recipients of one message (or of every message not held) due
        now; the number of messages that have any. A held message named by id is made due
        too, and goes once released."""
        now = time.time()

        def change(txn: lmdb.Transaction) -> int:
            if qid is not None:
                ids = [qid]
            else:
                ids = [key.decode() for key in txn.cursor(db=self._db["messages"]).iternext(values=False)]
            count = 0
            for one in ids:
                record = self._get(txn, one)
                if record is None or not record.pending() or (qid is None and record.held):
                    continue
                old_key = record.due_key(one)
                for recipient in record.pending():
                    recipient.next_attempt = min(recipient.next_attempt, now)
                self._put(txn, one, record, old_key)
                count += 1
            return count

        count = self._write(change)
        _log.info("queue_flushed", qid=qid or "all", messages=count)
        if count:
            self._due()
        return count

    def hold(self, qid: str) -> bool:
        """Keep a message from delivery until released. False if there is no such message."""
        return self._set_held(qid, True)

    def release(self, qid: str) -> bool:
        """Let a held message go: due at once. False if there is no such message."""
        return self._set_held(qid, False)

    def remove(self, qid: str) -> bool:
        """Drop a message, its record and its file, without a report to anyone."""
        def change(txn: lmdb.Transaction) -> bool:
            record = self._get(txn, qid)
            if record is None:
                return False
            self._delete(txn, qid, record.due_key(qid))
            return True

        removed = self._write(change)
        if removed:
            self._unlink(qid)
            _log.info("queue_removed", qid=qid)
        return removed

    def snapshot(self, target: Path, place: Callable[[Path, Path], None]) -> tuple[int, list[str]]:
        """A consistent copy for a backup (storage/snapshot.py): the index copied under one
        read transaction to `target`/queue.lmdb, and each spool file it names given to
        `place(source, target)` for `target`/msg. A file outlives its record, so the only
        file missing is that of a message finished (or removed) since the snapshot: its
        record is dropped from the copy, as if that had come first. (messages copied, ids
        of those dropped)"""
        make_private_dirs(target / "msg")
        make_private_dirs(target / "queue.lmdb")
        copied, gone = 0, []
        with self._read() as txn:
            self._env.copy(str(target / "queue.lmdb"), compact=True, txn=txn)
            for key in txn.cursor(db=self._db["messages"]).iternext(values=False):
                qid = bytes(key).decode()
                try:
                    place(self._spool / qid, target / "msg" / qid)
                    copied += 1
                except FileNotFoundError:
                    gone.append(qid)
        if gone:
            copy = lmdb.open(str(target / "queue.lmdb"), map_size=MAP_SIZE, max_dbs=len(DATABASES) + 1)
            try:
                db = open_databases(copy, DATABASES)
                with copy.begin(write=True) as txn:
                    for qid in gone:
                        raw = txn.get(qid.encode(), db=db["messages"])
                        due = records.decode(raw).due_key(qid) if raw is not None else None
                        if due is not None:
                            txn.delete(due, db=db["due"])
                        txn.delete(qid.encode(), db=db["messages"])
            finally:
                copy.close()
        return copied, gone

    def runner_lock(self) -> RunnerLock:
        return RunnerLock(self.path / "runner.lock")

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> tuple[list[str], list[str]]:
        """Finish what a crash left, safely beside live processes: (spool files removed
        because no record knows them, records dropped because their file is missing)."""
        self._env.reader_check()  # the read slots of dead processes (kill -9), which pin old pages
        with self._read() as txn:
            known = {bytes(key).decode() for key in txn.cursor(db=self._db["messages"]).iternext(values=False)}
        removed = [name for name in sorted(os.listdir(self._spool)) if name not in known and self._remove_orphan(name)]
        if removed:
            fsync_dir(self._spool)
        try:
            dropped = [qid for qid in sorted(known) if not (self._spool / qid).exists() and self._drop_lost(qid)]
        except NotOwnerError:
            dropped = []  # a shard this node does not hold: its owner's to drop
        return removed, dropped

    def _remove_orphan(self, name: str) -> bool:
        path = self._spool / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False  # gone meanwhile, or not a file of ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live enqueue
            with self._read() as txn:
                if is_id(name) and txn.get(name.encode(), db=self._db["messages"]) is not None:
                    return False  # committed since we looked
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
            _log.warning("queue_orphan_removed", qid=name)
            return True
        finally:
            os.close(fd)

    def _drop_lost(self, qid: str) -> bool:
        """In a write transaction, so no removal is in flight: a record seen there whose
        file is missing has lost it for good."""
        def change(txn: lmdb.Transaction) -> MessageRecord | None:
            record = self._get(txn, qid)
            if record is None or (self._spool / qid).exists():
                return None
            self._delete(txn, qid, record.due_key(qid))
            return record

        record = self._write(change)
        if record is None:
            return False
        _log.error("queue_file_missing", qid=qid, sender=record.sender or "<>", size=record.size,
                   recipients=",".join(r.address for r in record.pending()))
        return True

    # -- inside -----------------------------------------------------------------------------

    def _check_fence(self, txn: lmdb.Transaction) -> None:
        if not self._fence():
            raise NotOwnerError(f"the queue of shard {self.shard} is not served by this node now")

    @contextmanager
    def _using(self):
        """The index, kept open until the caller is done with it."""
        with self._lock:
            if self._closed:
                raise StoreError("queue is closed")
            self._readers += 1
        try:
            yield
        finally:
            with self._idle:
                self._readers -= 1
                if self._readers == 0:
                    self._idle.notify_all()

    @contextmanager
    def _read(self):
        with self._using(), self._env.begin(buffers=False) as txn:
            yield txn

    def _write(self, change: Callable[[lmdb.Transaction], Any], *, sync_spool: bool = False) -> Any:
        """change(txn) in the next write transaction (storage/queue_commit.py), committed
        with fsync (lmdb's default); with `sync_spool`, after msg/ is fsynced."""
        if self._closed:
            raise StoreError("queue is closed")
        return self._committer.run(change, sync_dir=sync_spool)

    def _get(self, txn: lmdb.Transaction, qid: str) -> MessageRecord | None:
        if not is_id(qid):
            return None
        raw = txn.get(qid.encode(), db=self._db["messages"])
        return records.decode(raw) if raw is not None else None

    def _record_or_raise(self, qid: str) -> MessageRecord:
        with self._read() as txn:
            record = self._get(txn, qid)
        if record is None:
            raise NotQueuedError(f"no such message in the queue: {qid}")
        return record

    def _put(self, txn: lmdb.Transaction, qid: str, record: MessageRecord, old_key: bytes | None) -> None:
        new_key = record.due_key(qid)
        if old_key != new_key:
            if old_key is not None:
                txn.delete(old_key, db=self._db["due"])
            if new_key is not None:
                txn.put(new_key, b"", db=self._db["due"])
        txn.put(qid.encode(), records.encode(record), db=self._db["messages"])

    def _delete(self, txn: lmdb.Transaction, qid: str, old_key: bytes | None) -> None:
        if old_key is not None:
            txn.delete(old_key, db=self._db["due"])
        txn.delete(qid.encode(), db=self._db["messages"])

    def _set_held(self, qid: str, held: bool) -> bool:
        now = time.time()

        def change(txn: lmdb.Transaction) -> bool:
            record = self._get(txn, qid)
            if record is None:
                return False
            old_key = record.due_key(qid)
            record.held = held
            if not held:
                for recipient in record.pending():
                    recipient.next_attempt = min(recipient.next_attempt, now)
            self._put(txn, qid, record, old_key)
            return True

        found = self._write(change)
        if found:
            _log.info("queue_held" if held else "queue_released", qid=qid)
            if not held:
                self._due()
        return found

    def _due(self) -> None:
        if self._on_due is not None:
            self._on_due()

    def _insert(self, qid: str, record: MessageRecord) -> None:
        def change(txn: lmdb.Transaction) -> None:
            if txn.get(qid.encode(), db=self._db["messages"]) is not None:
                raise StoreError("queue id already in use")  # the file's O_EXCL makes it impossible
            self._put(txn, qid, record, None)

        self._write(change, sync_spool=True)

    def _create_spool(self, qid: str) -> int:
        """The spool file, new and locked by this process (see the module docstring)."""
        path = self._spool / qid
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                ours = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False
            if ours:
                return fd
            os.close(fd)  # judged dead and removed before we held it: make it again
        raise StoreError("cannot create a spool file")

    def _unlink(self, qid: str) -> None:
        """After the record's deletion is committed: a crash before this leaves an orphan
        that the next open removes."""
        try:
            os.unlink(self._spool / qid)
        except FileNotFoundError:
            pass
        except OSError:
            _log.warning("queue_unlink_failed", exc_info=True, qid=qid)

    def _spool_path(self, qid: str) -> Path:
        """Where a message's file is (opened here only: storage/queue.py)."""
        return self._spool / qid


def wait_for_commits(directory: Path) -> None:
    """Every commit to the queue at `directory` that is in flight in any process of this
    machine done, by taking LMDB's writer lock once (nothing if no queue is there). A cluster
    node releasing a shard calls it once its claim is withdrawn (storage/store.py
    release_shard): a commit that passed its fence just before is then durable before the
    shard is flushed and handed over, and every later one is refused."""
    index = directory / "queue.lmdb"
    if not index.is_dir():
        return
    try:
        env = lmdb.open(str(index), map_size=MAP_SIZE, max_dbs=len(DATABASES) + 1, create=False, max_readers=1024,
                        readahead=False)
    except lmdb.Error:
        return  # open in this very process: its own writes are fenced by the claim withdrawn
    try:
        with env.begin(write=True):
            pass
    finally:
        env.close()


class Enqueue:
    """One message on its way into the queue. Not thread-safe: one caller writes, then
    commits (in any one thread), then closes. A context manager: close() aborts a message
    that was not committed."""

    def __init__(self, queue: Queue, envelope: QueueEnvelope, qid: str | None = None):
        self.id = qid or new_id()  # known from the start, for the log lines of the session
        self.envelope = envelope
        self.size = 0
        self._queue = queue
        self._pending = bytearray()
        self._fd: int | None = None
        self._release_pin = not_pinned  # the shard pinned while the spool file is open
        self._state = "open"

    def __enter__(self) -> Enqueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append `chunk`. On failure the message is aborted and the store's error raised
        (DiskFullError for a full disk: SMTP 452 4.3.1)."""
        if self._state != "open":
            raise StoreError("the message is no longer open for data")
        if self._fd is None and len(self._pending) + len(chunk) <= IN_MEMORY:
            self._pending += chunk
        else:
            try:
                if self._fd is None:
                    self._make_file()
                _write_all(self._fd, chunk)
            except OSError as e:
                self.close()
                raise store_error(e, self._queue.path) from e
        self.size += len(chunk)

    def read(self) -> bytes:
        """The bytes written so far (to DKIM-sign the whole message before commit)."""
        with self.open() as f:
            return f.read()

    def open(self) -> BinaryIO:
        """The bytes written so far, as a file: for a big message."""
        if self._state != "open":
            raise StoreError("the message is no longer open")
        if self._fd is None:
            return io.BytesIO(bytes(self._pending))
        return io.BufferedReader(_MessageReader(b"", os.dup(self._fd), self.size))

    def commit(self, prepend: bytes = b"") -> str:
        """Queue the message: its file fsynced, msg/ fsynced, its record committed with sync,
        before this returns the queue id. Blocks: call it in a thread from an event loop."""
        if self._state != "open":
            raise StoreError("the message is no longer open")
        if len(prepend) > MAX_PREPEND:
            raise ValueError(f"prepend is {len(prepend)} bytes, at most {MAX_PREPEND}")
        self._state = "committing"
        now = time.time()
        try:
            if self._fd is None:
                self._make_file()
            metrics.fsync(self._fd, "queue")  # here, side by side with other sessions' (msg/ is the committer's)
            self._queue._insert(self.id, _new_record(self.envelope, self.size + len(prepend), bytes(prepend), now))
        except BaseException as e:
            self._state = "committing-failed"
            self.close()
            raise store_error(e, self._queue.path) from e
        self._state = "committed"
        os.close(self._fd)  # lets go of the lock: the record has the file now
        self._fd = None
        self._release_pin()
        env = self.envelope
        shard = {"shard": self._queue.shard} if self._queue.shard is not None else {}
        _log.info("queued", qid=self.id, size=self.size + len(prepend), sender=env.sender or "<>",
                  recipients=len({r.address for r in env.recipients}), origin=env.origin, user=env.user, **shard)
        self._queue._due()
        return self.id

    def abort(self) -> None:
        """Nothing of this message stays. Only before commit."""
        if self._state == "committed":
            raise StoreError("the message is queued already: remove it instead")
        self.close()

    def close(self) -> None:
        """The end: an uncommitted message is discarded (its file unlinked while it is still
        locked, so that no recovery takes it for somebody else's)."""
        if self._state == "committed":
            self._state = "closed"
        if self._state == "closed":
            return
        self._state = "closed"
        self._pending = bytearray()
        if self._fd is not None:
            try:
                os.unlink(self._queue._spool_path(self.id))
            except OSError:
                pass  # an orphan, removed at the next open
            os.close(self._fd)
            self._fd = None
        self._release_pin()

    def _make_file(self) -> None:
        self._release_pin = take(self._queue.pin)
        self._fd = self._queue._create_spool(self.id)
        _write_all(self._fd, self._pending)
        self._pending = bytearray()


class RunnerLock:
    """The right to run deliveries for this data dir: flock(LOCK_EX | LOCK_NB) on
    queue/runner.lock, held on an open descriptor, so the kernel drops it however the
    holder ends (kill -9 included) and another process's acquire() then succeeds. A flock
    belongs to the open file: a second RunnerLock, even in the same process, is refused.
    Acquire it after forking (a forked child shares the parent's open file, and its lock)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """True if this process now runs deliveries; False if another runner does."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for `queue list`: who runs deliveries
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process holding the lock, None if nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).strip()
                return int(text) if text.isdigit() else None
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> RunnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _MessageReader(io.RawIOBase):
    """prepend, then a file (by descriptor, which it owns), as one seekable stream."""

    def __init__(self, head: bytes, fd: int, size: int | None = None, release: Release = not_pinned):
        self._head = head
        self._fd = fd
        self._release = release  # the queue's shard pin, let go at close
        self._size = len(head) + (os.fstat(fd).st_size if size is None else size)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        if self._pos < len(self._head):
            piece = self._head[self._pos:self._pos + want]
            view[:len(piece)] = piece
            self._pos += len(piece)
            return len(piece)
        got = os.preadv(self._fd, [view[:want]], self._pos - len(self._head))
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._release()
        super().close()


# -- helpers ---------------------------------------------------------------------------------


def _check_envelope(envelope: QueueEnvelope) -> None:
    if not envelope.recipients:
        raise ValueError("a message needs at least one recipient")
    if envelope.ret not in (None, "FULL", "HDRS"):
        raise ValueError(f"RET must be FULL or HDRS, not {envelope.ret!r}")
    if envelope.origin not in ORIGINS:
        raise ValueError(f"origin must be one of {', '.join(ORIGINS)}, not {envelope.origin!r}")
    for recipient in envelope.recipients:
        notify = set(recipient.notify)
        if not notify <= NOTIFY_VALUES or ("NEVER" in notify and len(notify) > 1):
            raise ValueError(f"bad NOTIFY for {recipient.address}: {','.join(recipient.notify)}")  # RFC 3461 §4.1


def _check_result(result: Result) -> None:
    if result.state not in (DEFERRED, *FINAL):
        raise ValueError(f"a result is deferred, delivered or bounced, not {result.state!r}")
    if result.state == DEFERRED and result.next_attempt is None:
        raise ValueError(f"a deferred result needs its next attempt ({result.address})")


def _new_record(envelope: QueueEnvelope, size: int, prepend: bytes, now: float) -> MessageRecord:
    recipients: dict[str, RecipientRecord] = {}
    for r in envelope.recipients:
        recipients.setdefault(r.address, RecipientRecord(address=r.address, orcpt=r.orcpt, notify=tuple(r.notify),
                                                          next_attempt=now, updated=now))
    return MessageRecord(created=now, sender=envelope.sender, recipients=list(recipients.values()), size=size,
                         envid=envelope.envid, ret=envelope.ret, smtputf8=envelope.smtputf8,
                         eight_bit=envelope.eight_bit, origin=envelope.origin, user=envelope.user, prepend=prepend)


def _message(qid: str, record: MessageRecord) -> QueuedMessage:
    states = tuple(RecipientState(r.address, r.orcpt, tuple(r.notify), r.state, r.attempts, r.next_attempt,
                                  r.last_reply, r.remote_mta, r.updated) for r in record.recipients)
    envelope = QueueEnvelope(
        sender=record.sender, recipients=tuple(QueuedRecipient(r.address, r.orcpt, tuple(r.notify))
                                               for r in record.recipients),
        envid=record.envid, ret=record.ret, smtputf8=record.smtputf8, eight_bit=record.eight_bit,
        origin=record.origin, user=record.user)
    return QueuedMessage(qid, record.created, envelope, record.size, record.held, record.delay_warned, states)


def _text(value: str) -> str:
    """A remote's reply as the index can hold it: bytes it sent that are not UTF-8 arrive
    as lone surrogates, which JSON cannot carry."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
