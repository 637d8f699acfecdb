"""One shard of the message store: an LMDB index and the Maildir trees of its accounts.

Writes go through one committer thread per shard and process (group commit): callers hand
it a function of a write transaction; it runs every request that is waiting in ONE LMDB
transaction (should one fail, the batch runs again with each request in a nested
transaction, so that it cannot spoil the others), fsyncs the directories the requests
asked for (a big message's file put in a writer directory), appends the transaction's
changes to the shard's write-ahead log with one flush (storage/wal.py: then the callers
that only need durability, mtad's, are woken), commits LMDB, and then wakes the others.
Concurrent deliveries so share one commit. Across processes, LMDB's
writer lock serializes the committers of mtad, imapd and the CLI; readers never wait.

The index commits first, the files follow (storage/settle.py). A new message file is
written to this process's writer directory (storage/writers.py): a small one without a
flush, its bytes committed in the index's `journal` (storage/journal.py); a big one fsynced
before the commit, with the directory. Every file change the commit implies (a new message
renamed into cur/, an expunged one unlinked, a name mirroring new flags, a mailbox directory
made or removed) is recorded as an `unsettled` key in the same transaction and carried out
right after the commit. The keys of changes carried out are deleted after the next
checkpoint (below) has flushed what they touched. So a crash at any moment leaves
nothing a reader could mistake: the next process to open the shard settles what is recorded,
restores from the journal what the machine's crash lost, and discards what dead writers left
uncommitted, and `store check` finds nothing. File work inside a batch that a failed commit
must take back is registered with `Batch.undo`.

Index layout (named databases; ids and UIDs big-endian so keys sort numerically; the
records' types are in storage/records.py):
    names      account \\0 mailbox name          -> mailbox id (u32; it is the UIDVALIDITY)
    mailboxes  id                                -> MailboxRecord: name, counters, uidnext, modseq
    subs       account \\0 mailbox name          -> b""
    accounts   account                           -> Usage: bytes and messages the quota counts
    counters   b"uidvalidity"                    -> u32, the last one handed out
    flags      id uid                            -> Entry: modseq, flag bits, size, dates, keywords
    msgs       id uid                            -> MessageRecord: file, size, dates, envelope, structure
    modseqs    id modseq uid                     -> b""  (what changed since a MODSEQ)
    expunged   id modseq uid                     -> file base (what vanished since a MODSEQ: storage/vanished.py)
    bases      file base                         -> id uid   (which message a file is)
    unsettled  b"f" base | b"d" account \\0 id      -> what the files must still be made to match
    dedupe     id digest                         -> uid, time (a message already delivered here)
    dedupe_times  time id digest                 -> b""  (their expiry order)
    unseen     id uid                            -> b""  (messages without \\Seen: SEARCH UNSEEN)
    terms, vocab, texts                          -> the full-text index (storage/fts.py)
    metadata   account \\0 id entry              -> an annotation's value (storage/metadata.py)
    urlauth    account \\0 id                    -> the mailbox's URLAUTH access key (storage/urlauth.py)
    imported   id b"k" digest | id b"u" uid      -> what `store import` brought in (storage/imports.py)
    journal    file base                         -> a new message's bytes until its file is flushed (storage/journal.py)

Fencing (cluster mode, cluster/): `counters` b"fence" holds the etcd revision of the claim
under which this node owns the shard (0: released). With `Shard.fence` set, every commit
asks it, inside the write transaction and so under LMDB's writer lock, whether this node
still holds the shard under that revision; if not, the batch aborts with NotOwnerError. A
node taking the shard over writes its own revision first, after any commit in flight.

Checkpoints: the keys of file work done (settled `unsettled` keys, and `journal` entries,
whose files were written without a flush) are not deleted by the commit that follows, but
by the checkpointer: a thread that, every CHECKPOINT_INTERVAL while keys wait, flushes the
shard's file system once (syncfs) and then has the committer delete them. No directory or
file flush stands in a commit's way.
"""

from __future__ import annotations

import functools
import os
import queue
import shutil
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from conf.logfmt import EventLogger
from storage.errors import DISK_FULL, DiskFullError, NotOwnerError, StoreError, is_disk_full, store_error
from storage.lmdbenv import open_databases
from storage.maildir import fsync_dir, make_dirs, make_private_dirs, write_file
from storage.pinning import Pin
from storage.slots import CommitSlots
from storage import wal
from storage.writers import WriterDir
from wire import metrics

DATABASES = ("names", "mailboxes", "subs", "accounts", "counters", "flags", "msgs", "modseqs", "expunged", "bases",
             "terms", "vocab", "texts", "pending", "unseen", "unsettled", "dedupe", "dedupe_times", "metadata",
             "urlauth", "imported", "journal")
WAL_NAME = "wal.log"  # in the index's directory
# Bytes of log after which a commit empties it (checkpoints do so every CHECKPOINT_INTERVAL
# while file work waits): what a replay after a crash reads at most, about.
WAL_CUT_BYTES = 16 << 20
# Free space below which a commit's callers wait for LMDB's commit, not just the log's flush
# (see _room_for): its pages per change copied, and a margin for every other writer.
COPIED_PAGES = 4 * 4096
ROOM_MARGIN = 64 << 20
ROOM_INODES = 1024  # and free inodes for the files it makes (Shard._place)
# Replays in a row a write transaction makes before it gives up: one nearly always; more
# only if processes keep dying between their log's flush and their commit.
CATCH_UP_ROUNDS = 10
MAP_SIZE = 64 << 30  # address space, not disk: LMDB grows the file as it fills
MAX_BATCH = 256
IDLE_DELAY = 0.2  # seconds without requests before idle work runs
# Batches between turns of idle work under sustained load. The indexer's work can wait for a
# quiet moment (searches stay exact meanwhile); a burst of mail should not pay for it.
IDLE_EVERY = 1000
FSYNC_THREADS = 16
# Seconds between checkpoints while file work waits for one: how much mail lives only in
# the journal, and how often the file system is flushed under load.
CHECKPOINT_INTERVAL = 1.0
# Seconds a close waits for reads in progress between two log lines saying so (reads are
# short: a SEARCH of a big mailbox at worst).
READERS_LOG_AFTER = 10.0
# Seconds between two log lines of a failure that comes back at every turn (a full disk).
REPEAT_LOG_EVERY = 60.0

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
FENCE_KEY = b"fence"  # in `counters`: the etcd revision of this node's claim (cluster/)
_UID_KEY = struct.Struct(">II")
_MODSEQ_KEY = struct.Struct(">IQI")


_log = EventLogger("storage.shard")


def uid_key(mailbox_id: int, uid: int) -> bytes:
    return _UID_KEY.pack(mailbox_id, uid)


def modseq_key(mailbox_id: int, modseq: int, uid: int) -> bytes:
    return _MODSEQ_KEY.pack(mailbox_id, modseq, uid)


def unpack_uid_key(key: bytes) -> tuple[int, int]:
    return _UID_KEY.unpack(key)


def unpack_modseq_key(key: bytes) -> tuple[int, int, int]:
    return _MODSEQ_KEY.unpack(key)


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(raw: bytes) -> int:
    return _U32.unpack(raw)[0]


class Batch:
    """What the requests of one commit batch ask of the file system around the commit."""

    def __init__(self) -> None:
        self.sync_dirs: set[Path] = set()
        self._undo: list[Callable[[], None]] = []
        self.after_commit: list[Callable[[], None]] = []
        self.unsettled: list[bytes] = []  # keys recorded by record_unsettled, settled after the commit
        self.journaled: list[bytes] = []  # `journal` keys put (storage/journal.py), checkpointed after it
        # Journaled messages whose files are made once LMDB has the transaction
        # (Shard._place_committed): (path in cur/, bytes, mtime, `journal` key).
        self.placed: list[tuple[Path, bytes, float, bytes]] = []

    def undo(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def place(self, path: Path, data: bytes, mtime: float, key: bytes) -> None:
        """Make the file `path` holding `data` (journaled under `key`) once LMDB has the
        transaction, outside the writer lock (Shard._place_committed); readers take the
        journal's copy until then."""
        self.placed.append((path, data, mtime, key))

    def mark(self) -> tuple[int, int, int, int, int]:
        return len(self._undo), len(self.after_commit), len(self.unsettled), len(self.journaled), len(self.placed)

    def rollback(self, mark: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)) -> None:
        undo_mark, after_mark, unsettled_mark, journal_mark, placed_mark = mark
        while len(self._undo) > undo_mark:
            action = self._undo.pop()
            try:
                action()
            except OSError:
                pass  # the file is then an orphan `store check` finds
        del self.after_commit[after_mark:]
        del self.unsettled[unsettled_mark:]
        del self.journaled[journal_mark:]
        del self.placed[placed_mark:]


def record_unsettled(txn: lmdb.Transaction, shard: Shard, batch: Batch, key: bytes, value: bytes) -> None:
    """File work the transaction implies, to be carried out once it commits (storage/settle.py
    carries it out, storage/unsettled.py says what the keys mean). The value ends with the
    name of this process's writer directory, so that recovery leaves the records of live
    processes to them, and a nonce: a settled record is deleted only if nobody wrote it
    again since."""
    writer = shard.writer.path.name.encode()
    txn.put(key, value + b"\0" + writer + b"\0" + os.urandom(6).hex().encode(), db=shard.db["unsettled"])
    batch.unsettled.append(key)


class _Request:
    __slots__ = ("change", "before", "on_done", "early", "done", "result", "error")

    def __init__(self, change: Callable[[lmdb.Transaction, Batch], Any], before: Callable[[], None] | None,
                 on_done: Callable[[_Request], None] | None, early: bool = False):
        self.change = change
        self.before = before
        self.on_done = on_done
        self.early = early
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Shard:
    def __init__(self, path: Path, number: int, *, map_size: int = MAP_SIZE):
        self.path = path
        self.number = number
        index = path / "index.lmdb"
        make_private_dirs(index)  # and shards/ and this shard's directory, all 0700
        # metasync=False: LMDB's meta page is not flushed at each commit; the write-ahead log
        # (storage/wal.py) carries the last transactions through a crash of the machine.
        self.env = lmdb.open(str(index), map_size=map_size, max_dbs=len(DATABASES) + 2, mode=0o600,
                             max_readers=1024, readahead=False, metasync=False)
        self.db = open_databases(self.env, DATABASES)
        self._wal_index, handles = wal.indexes(self.db, DATABASES)
        self.wal = wal.WriteAheadLog(index / WAL_NAME, handles)
        self._local = threading.local()  # .writing: this thread is in a write transaction here
        self.reads_wait = True  # see read(); a daemon's store says no (Store's reads_wait)
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stop_seen = False  # the close's mark, taken by _join_late from the queue
        # Requests _join_late took from the queue and did not join: the next batch's first
        # (the committer's thread alone touches it).
        self._deferred: list[_Request] = []
        self._released = False  # closed because this node let the shard go (Store.close_shard)
        # Reads in progress: close() waits for them before it unmaps the environment (a read
        # of an unmapped page is a crash, not an exception).
        self._readers = 0
        self._no_readers = threading.Condition(self._lock)
        self._fsync_pool: ThreadPoolExecutor | None = None
        # Work the committer does when no request waits (the full-text indexer): called in
        # a write transaction, returns True while more remains.
        self.idle_work: Callable[[lmdb.Transaction], bool] | None = None
        # Shared by every shard of a process (Store's): a committer takes one of its slots
        # for each batch, so that only so many of the process's shards commit at once.
        # None: this shard's commits wait for no other's.
        self.commit_slots: CommitSlots | None = None
        # New message files wait here until their commit (storage/writers.py).
        self.writer = WriterDir(path / "tmp")
        # Carries out the file work of committed `unsettled` keys (storage/settle.py):
        # settler(keys) -> ((key, value) pairs done, directories they changed).
        self.settler: Callable[[list[bytes]], tuple[list[tuple[bytes, bytes]], set[Path]]] | None = None
        # Keys of file work done, deleted after the next checkpoint's flush: settled
        # `unsettled` (key, value) pairs, and `journal` keys.
        self._settled: list[tuple[bytes, bytes]] = []
        self._journaled: list[bytes] = []
        # Journaled files that could not be made after their commit was told (a full disk):
        # their `journal` keys, for the next checkpoint to make again (place_again).
        self._unplaced: list[bytes] = []
        # Makes the files of these `journal` keys that are missing or damaged, in a write
        # transaction (storage/journal.py place_again): (the keys whose files are now right,
        # the error that kept the others).
        self.place_again: Callable[[lmdb.Transaction, list[bytes]], tuple[list[bytes], OSError | None]] | None \
            = None
        # Renames or removes files made after their commit (_place_committed) to match what
        # the index says now (storage/settle.py match): [(the file made, its `journal` key)].
        self.match_files: Callable[[list[tuple[Path, bytes]]], None] | None = None
        self._checkpoint_due = threading.Event()
        self._checkpointer: threading.Thread | None = None
        # The file system flush of a checkpoint (storage/journal.py FileSystemFlusher).
        self.flush_files: Callable[[], None] | None = None
        self._checkpoint_failures = _Repeating(self)
        self._idle_failures = _Repeating(self)
        # Cluster mode: fence(number, revision) -> whether this node holds this shard under
        # the claim `revision` now (cluster/local.py NodeTable.holds); None: a single node.
        self.fence: Callable[[int, int], bool] | None = None
        # Cluster mode: the shard's pin (storage/pinning.py), for what keeps a file of it open
        # beyond the store's own handle (a delivery's message file); None: a single node.
        self.pin: Pin | None = None

    # -- paths --------------------------------------------------------------------------

    @property
    def tmp_root(self) -> Path:
        """Where every writer of this shard has its directory (storage/writers.py)."""
        return self.path / "tmp"

    def account_dir(self, account: str) -> Path:
        return self.path / account

    def mailbox_dir(self, account: str, mailbox_id: int) -> Path:
        return self.path / account / str(mailbox_id)

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def read(self):
        """A read transaction; NotOwnerError (StoreError at a stop) once the shard is closed.

        It sees every transaction whose callers were told it is done, in any process: a
        delivery's 250 goes once its log record is flushed, before LMDB commits it
        (storage/wal.py), so a read that finds the log longer than its snapshot says waits
        for that commit (LMDB's writer lock), or replays the record of a process that died
        before it, and begins again. A moment's wait, and only for a read that meets a
        commit in flight, and only where `reads_wait` (not in a daemon: an event loop must
        not block on another process's commit)."""
        with self._reading():
            txn = self.env.begin(buffers=False)
            try:
                if self.reads_wait and not getattr(self._local, "writing", False) and self._behind(txn):
                    txn.abort()
                    try:
                        self._catch_up()
                    except (lmdb.Error, OSError, StoreError):
                        pass  # a full disk: the read sees what LMDB has (see commit_after_log_failed)
                    txn = self.env.begin(buffers=False)
                yield txn
            finally:
                txn.abort()

    def _behind(self, txn: lmdb.Transaction) -> bool:
        """Whether the log holds a record beyond this snapshot. Asked without the writer
        lock, so the log may have moved on since the snapshot: once committed, the record
        can be restarted over (a checkpoint) or truncated (a clean close). Only a commit
        does that, so a snapshot that is no longer the last is as good as behind."""
        if self.wal.has_next(*wal.read_position(txn, self.db["counters"])):
            return True
        return self.env.info()["last_txnid"] != txn.id()

    @contextmanager
    def _reading(self):
        """Anything that touches the environment's map outside the committer: close() waits
        for it to end, and none starts once close() has begun."""
        with self._lock:
            # The committer and checkpointer finish their work (a settle's reads) after
            # close() has begun: it joins them before it closes the environment.
            if self._closed and threading.current_thread() not in (self._thread, self._checkpointer):
                raise self._closed_error()
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1
                if self._readers == 0:
                    self._no_readers.notify_all()

    def _closed_error(self) -> StoreError:
        if self._released:
            return NotOwnerError(f"shard {self.number} is not served by this node now")
        return StoreError("store is closed")

    def write(self, change: Callable[[lmdb.Transaction, Batch], Any]) -> Any:
        """Run change(txn, batch) in the next commit batch; return its result once durable."""
        return self.wait(self.submit(change))

    def submit(self, change: Callable[[lmdb.Transaction, Batch], Any], *, before: Callable[[], None] | None = None,
               on_done: Callable[[_Request], None] | None = None, early: bool = False) -> _Request:
        """Queue `change` for the next batch without waiting: several submits can share a commit.

        `before` is file work that must be durable before `change` runs (writing and fsyncing a
        message to tmp/): the committer runs the batch's `before`s side by side, so their
        fsyncs share journal commits, and a failing one fails its request alone.
        `on_done(request)` is called, in the committer's thread, once the request is
        settled: a caller that must not block (an event loop) learns it so. `early`: settled
        as soon as its commit is durable, before the batch's files are moved into place (the
        settler's work, which readers do not wait for: settle.locate finds a file in its
        writer's directory): mtad's 250 need not wait for renames."""
        request = _Request(change, before, on_done, early)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._thread is None:
                self._thread = threading.Thread(target=self._commit_loop, name=f"shard-{self.number}", daemon=True)
                self._thread.start()
            self._queue.put(request)
        return request

    @staticmethod
    def wait(request: _Request) -> Any:
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def fence_revision(self, txn: lmdb.Transaction) -> int:
        """The claim revision recorded in the shard (0: none; see Fencing above)."""
        raw = txn.get(FENCE_KEY, db=self.db["counters"])
        return _U64.unpack(raw)[0] if raw else 0

    def set_fence(self, revision: int) -> None:
        """Record `revision` as the claim this shard is written under, durably, outside the
        committer (whose commits it fences): it waits for LMDB's writer lock, so every commit
        in flight in any process of this machine is done before it."""
        with self._reading(), self._transaction(fence=False) as txn:
            txn.put(FENCE_KEY, _U64.pack(revision), db=self.db["counters"])

    def _check_fence(self, txn: lmdb.Transaction) -> None:
        fence = self.fence
        if fence is not None and not fence(self.number, self.fence_revision(txn)):
            raise NotOwnerError(f"shard {self.number} is not served by this node now")

    def last_commit(self) -> int:
        """The id of the newest transaction a read sees now, committed by any process: cheap
        change detection. A read that begins after this call sees at least that transaction
        (not so env.info()'s last_txnid: see storage/queue.py Queue.changed)."""
        with self._reading(), self.env.begin() as txn:
            return txn.id()

    def close(self, *, released: bool = False) -> None:
        """Stop the committer after the requests queued (their commits done), wait for the
        reads in progress, and close the environment and every file this process holds in
        the shard. `released`: this node let the shard go, and later uses of this object
        raise NotOwnerError rather than StoreError."""
        with self._lock:
            self._closed = True
            self._released = released
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()
        checkpointer = self._checkpointer
        if checkpointer is not None:
            self._checkpoint_due.set()
            checkpointer.join()
        pending = self._take_settled()
        if pending[0] or pending[1]:
            try:
                self.flush()
                with self._transaction(fence=False) as txn:
                    self._forget(txn, None, pending)
                self._cut_log(release=True)
            except (lmdb.Error, OSError, StoreError):
                pass  # the keys stay: the next start settles and restores what they name
        if self._fsync_pool is not None:
            self._fsync_pool.shutdown()
        with self._lock:
            waited = time.monotonic()
            while self._readers:  # none can start now: each ends, and the last notifies
                if not self._no_readers.wait(READERS_LOG_AFTER):
                    _log.warning("close_waits", shard=self.number, readers=self._readers,
                                 waited=round(time.monotonic() - waited))
        self.writer.close()
        close_flusher = getattr(self.flush_files, "close", None)
        if close_flusher is not None:
            close_flusher()
        self.wal.close()
        self.env.close()

    def _side_by_side(self, action: Callable[[Any], None], items: list) -> None:
        """action(item) for each item, in up to FSYNC_THREADS threads: fsyncs issued together join
        one journal commit instead of queueing."""
        if len(items) <= 1:
            for item in items:
                action(item)
            return
        if self._fsync_pool is None:
            self._fsync_pool = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix=f"fsync-{self.number}")
        lanes = min(len(items), FSYNC_THREADS)
        for future in [self._fsync_pool.submit(_run_each, action, items[i::lanes]) for i in range(lanes)]:
            future.result()

    def _fsync_dirs(self, directories: set[Path]) -> None:
        if directories:
            self._let_slot_go()  # a flush: see _let_slot_go
        self._side_by_side(_fsync_dir_if_there, list(directories))

    def _commit_loop(self) -> None:
        idle_due = True  # look for left-over work once at start
        batches = 0
        seen = None  # LMDB's last transaction when this committer last looked, or committed
        while True:
            if self._deferred:
                first = self._deferred.pop(0)  # taken by _join_late, not joined
            elif idle_due and self.idle_work is not None:
                # Idle work waits for a quiet moment, so it never adds a commit to a delivery's
                # latency; under sustained load it still gets a turn every IDLE_EVERY batches.
                try:
                    first = self._queue.get(timeout=IDLE_DELAY)
                except queue.Empty:
                    last = self._last_txnid()
                    if last != seen:
                        # Another process (the other mtad worker, imapd) committed here meanwhile:
                        # only this process's share of the shard is quiet. Its writer lock held
                        # for a turn of indexing (a second and more, under load) would stall that
                        # process's commits, and through its commit slots its other shards'.
                        seen = last
                        continue
                    idle_due = self._run_idle()
                    seen = self._last_txnid()
                    continue
            else:
                first = self._queue.get()
            if first is None:
                return
            idle_due = True
            batches += 1
            if batches % IDLE_EVERY == 0 and self.idle_work is not None:
                self._run_idle()
            if self._commit_queued(first):
                while self._deferred:  # the close's mark came behind them
                    self._commit_queued(self._deferred.pop(0))
                return
            seen = self._last_txnid()

    def _last_txnid(self) -> int | None:
        """LMDB's last committed transaction, by any process; None if the environment fails
        (a lost device: the idle work that follows says so, the committer lives on)."""
        try:
            return self.env.info()["last_txnid"]
        except lmdb.Error:
            return None

    def _commit_queued(self, first: _Request) -> bool:
        """Commit `first` and what waits behind it, in one batch; whether the shard is closing.
        The file work that must precede the batch (its requests' `before`s: a big message's
        fsync) runs first, holding back no other shard; then the committer waits for a slot
        (commit_slots, or goes on without one should the wait stall), and what came in
        meanwhile joins the batch."""
        batch, stop = self._take_queued(first)
        try:
            self._run_befores_now(batch)
            slots = self.commit_slots
            if slots is None:
                self._commit(batch)
                return stop or self._stop_seen
            self._local.slot = slots if slots.take() else None
            try:
                if not stop:
                    more, stop = self._take_queued(None, MAX_BATCH - len(batch))
                    batch += more
                    if any(r.before is not None for r in more):
                        # Their file work (a fsync) without the slot, then the slot again.
                        self._let_slot_go()
                        self._run_befores_now(more)
                        self._local.slot = slots if slots.take() else None
                self._commit(batch)
            finally:
                self._let_slot_go()
        except Exception:  # a bug must cost one batch (its callers are told), never the committer
            _log.error("commit_loop_failed", exc_info=True, shard=self.number)
            unsettled = [r for r in batch if not r.done.is_set()]
            _fail([r for r in unsettled if r.error is None], StoreError("internal error"))
            for request in unsettled:
                self._settle(request)
        return stop or self._stop_seen

    def _let_slot_go(self) -> None:
        """Let go of the commit slot this thread holds, if it holds one: once its batch's
        record is built, the flushes that follow need no slot (a slow disk would otherwise
        hold the other shards back for its whole wait)."""
        slot = getattr(self._local, "slot", None)
        if slot is not None:
            self._local.slot = None
            slot.give_back()

    def _take_queued(self, first: _Request | None, room: int = MAX_BATCH) -> tuple[list[_Request], bool]:
        """`first` and the requests queued behind it, `room` at most; whether the queue's end
        (close) came among them."""
        batch = [] if first is None else [first]
        while self._deferred and len(batch) < room:
            batch.append(self._deferred.pop(0))
        while len(batch) < room:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:
                return batch, True
            batch.append(request)
        return batch, False

    def _run_befores_now(self, requests: list[_Request]) -> None:
        waiting = [r for r in requests if r.before is not None]
        self._run_befores(waiting)
        for request in waiting:
            request.before = None  # done (or failed: its error says so)

    def _run_idle(self) -> bool:
        work = self.idle_work
        if work is None:
            return False
        try:
            with self._transaction() as txn:
                more = bool(work(txn))
        except NotOwnerError:
            return False  # the shard's owner (another node now) does it
        except Exception as e:  # derived data: a failure here must never stop deliveries
            # (Each checkpoint's commit makes it due again: once a second on a full disk.)
            if (fields := self._idle_failures.failed(e)) is not None:
                _log.error("idle_work_failed", **fields)
            return False
        self._idle_failures.cleared()
        return more

    # -- checkpoints ----------------------------------------------------------------------

    def _take_settled(self) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        with self._lock:
            taken = (self._settled, self._journaled)
            self._settled, self._journaled = [], []
        return taken

    def _give_back(self, pending: tuple[list[tuple[bytes, bytes]], list[bytes]]) -> None:
        with self._lock:
            self._settled.extend(pending[0])
            self._journaled.extend(pending[1])

    def _checkpoint_loop(self) -> None:
        while not self._closed:
            self._checkpoint_due.wait(CHECKPOINT_INTERVAL)
            if self._closed:
                return
            self._checkpoint_due.clear()
            try:
                self.checkpoint()
            except NotOwnerError:
                pass  # the keys wait for the shard's next opening, by its next owner
            except Exception as e:  # the keys wait for the next turn (or the next start)
                if self._closed:
                    return  # close() came between the flush and the commit: it checkpoints the keys itself
                if (fields := self._checkpoint_failures.failed(e)) is not None:
                    _log.error("checkpoint_failed", **fields)
            else:
                self._checkpoint_failures.cleared()

    def checkpoint(self) -> None:
        """Flush the file work done so far and delete its keys, now (the checkpointer does it
        every CHECKPOINT_INTERVAL; `store check` first, so as not to take this process's
        own settled work for work in flight)."""
        unplaced_error = self._place_unplaced()
        pending = self._take_settled()
        if not pending[0] and not pending[1]:
            if unplaced_error is not None:
                raise unplaced_error
            return
        try:
            self.flush()
            self.write(functools.partial(self._forget, pending=pending))
        except BaseException:
            self._give_back(pending)
            raise
        try:
            self._cut_log()
        except (lmdb.Error, OSError) as e:  # the log stays longer, that is all
            if (fields := self._checkpoint_failures.failed(e)) is not None:
                _log.error("log_cut_failed", **fields)
        if unplaced_error is not None:
            raise unplaced_error

    def _place_unplaced(self) -> OSError | None:
        """Make again the files that could not be made after their commit (Shard._place);
        their keys join this checkpoint's once made. The error that kept any."""
        with self._lock:
            unplaced, self._unplaced = self._unplaced, []
        if not unplaced:
            return None
        try:
            placed, error = self.write(lambda txn, batch: self.place_again(txn, unplaced))
        except BaseException:
            with self._lock:
                self._unplaced.extend(unplaced)
            raise
        placed_set = set(placed)
        with self._lock:
            self._unplaced.extend(key for key in unplaced if key not in placed_set)
            self._journaled.extend(placed)
        return error

    def _cut_log(self, *, release: bool = False) -> None:
        """Sync LMDB, then start the write-ahead log again: every record in it is then in
        LMDB for good. Under the writer lock, so that no record comes between. `release`: a
        clean close, whose log file is emptied (else it keeps its room, storage/wal.py)."""
        counters = self.db["counters"]
        txn = self._begin_caught_up(counters)
        try:
            self.env.sync(True)
            self.wal.restart(release=release)
            wal.write_position(txn, counters, wal.read_position(txn, counters)[0], 0)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        finally:
            self._local.writing = False

    def flush(self) -> None:
        """Every file written in this shard so far durable (a checkpoint's, a restore's flush)."""
        if self.flush_files is not None:
            self.flush_files()
        else:
            os.sync()

    def _forget(self, txn: lmdb.Transaction, batch: Batch,
                pending: tuple[list[tuple[bytes, bytes]], list[bytes]]) -> None:
        """Delete the keys of file work made durable by a checkpoint's flush. A settled
        `unsettled` key goes only if nobody wrote it again since (its value is the same)."""
        settled, journaled = pending
        db = self.db["unsettled"]
        for key, value in settled:
            if txn.get(key, db=db) == value:
                txn.delete(key, db=db)
        journal = self.db["journal"]
        for key in journaled:
            txn.delete(key, db=journal)

    def _after_commit(self, batch: Batch) -> None:
        _run_after_commit(batch)
        self._settle_files(batch)

    def _settle_files(self, batch: Batch) -> None:
        done: list[tuple[bytes, bytes]] = []
        if batch.unsettled and self.settler is not None:
            try:
                done, _ = self.settler(batch.unsettled)
            except Exception:  # the keys stay: the next start settles them
                _log.error("settle_failed", exc_info=True, shard=self.number)
        if not done and not batch.journaled and not self._unplaced:
            return
        with self._lock:
            self._settled.extend(done)
            self._journaled.extend(batch.journaled)
            if self._checkpointer is None and not self._closed:
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name=f"checkpoint-{self.number}",
                                                      daemon=True)
                self._checkpointer.start()

    @contextmanager
    def _transaction(self, durable: Callable[[], None] | None = None, *, fence: bool = True,
                     batch: Batch | None = None):
        """A write transaction of this shard (every one goes through here: storage/wal.py).

        It first replays what the write-ahead log holds beyond LMDB, then yields a
        wal.Recorder. On leaving, its changes are appended to the log and flushed (the one
        flush a durable commit waits for, timed as postroom_fsync_seconds{kind="commit"}),
        `durable()` is called, the files `batch` places are made, and LMDB commits. Once the
        record is flushed the transaction has happened, whatever follows: should LMDB's commit
        fail, the next transaction replays the record (here, at once)."""
        counters = self.db["counters"]
        raw = self._begin_caught_up(counters)
        txn_id = raw.id()  # what LMDB's last_txnid says once it commits (_place_committed)
        appended = early = False
        end_after = 0
        try:
            txn = wal.Recorder(raw, self._wal_index)
            yield txn
            if fence:
                self._check_fence(raw)  # last, under the writer lock: nothing can come between
            if txn.changes:
                seq, end = wal.read_position(raw, counters)
                if end == 0 and seq > 0:
                    # The first record since the log was emptied: the emptying's commit on disk
                    # first, or a crash could leave LMDB expecting the old log at these offsets.
                    self.env.sync(True)
                record = wal.encode(seq + 1, txn.changes)
                # The callers are told before LMDB commits only if LMDB has room to: else a
                # full disk could leave a record told of that LMDB cannot take.
                early = durable is not None and self._room_for(len(record), len(txn.changes) // 3)
                wal.write_position(raw, counters, seq + 1, end + len(record))
                self._let_slot_go()
                started = time.perf_counter()
                end_after = self.wal.append(record, end)
                appended = True
                metrics.fsync_observed("commit", time.perf_counter() - started)
        except BaseException:
            if appended:  # under the writer lock still: nobody has seen the record
                self._take_back(end)
            self._local.writing = False
            raw.abort()
            raise
        if early:
            durable()
        elif batch is not None and batch.placed:
            # Nobody told (no room, see _room_for): the files first, and should one fail the
            # transaction fails whole, before anyone hears of it.
            try:
                self._place(batch)
            except BaseException:
                _unplace(batch)  # before the record goes: a file of it never outlives it
                self._take_back(end)
                self._local.writing = False
                raw.abort()
                raise
        try:
            raw.commit()
        except lmdb.Error:
            self._local.writing = False
            if not txn.changes:
                raise
            if not early:  # nobody was told: the record goes, and the transaction failed
                if self._taken_back(seq, end, batch):
                    raise
            else:
                _log.error("commit_after_log_failed", exc_info=True, shard=self.number)
                self._replay_now()
        self._local.writing = False
        if early and batch is not None and batch.placed:
            self._place_committed(batch, txn_id)
        if durable is not None and txn.changes and not early:
            durable()
        if txn.changes and end_after > WAL_CUT_BYTES:
            try:
                self._cut_log()
            except Exception:  # noqa: BLE001 - the log stays longer, that is all
                _log.error("log_cut_failed", exc_info=True, shard=self.number)

    def _begin_caught_up(self, counters) -> lmdb.Transaction:
        """A write transaction on a state that has every record of the log. What a crash left
        to replay (or a torn tail cut off) is committed and synced first, on its own: the log's
        offsets it frees are then reused only once LMDB knows they were freed. Then it looks
        again, under the lock anew: between the two another process may have come and gone."""
        for _ in range(CATCH_UP_ROUNDS):
            raw = self.env.begin(write=True)
            self._local.writing = True  # its reads must not wait for itself (read())
            try:
                if not self.wal.has_next(*wal.read_position(raw, counters)):
                    return raw
                journaled: list[bytes] = []
                journal = self._wal_index[self.db["journal"]]
                replayed = wal.catch_up(raw, counters, self.wal, lambda changes: journaled.extend(
                    changes[i + 1] for i in range(0, len(changes), 3)
                    if changes[i] == journal and changes[i + 2] is not None))
                if replayed:
                    _log.info("log_replayed", shard=self.number, records=replayed)
                if journaled and self.place_again is not None:
                    # Their process died (or its LMDB commit failed) before it made their
                    # files, or after: made here if missing, before readers see them. What
                    # cannot be made now the next opening of the shard restores.
                    _, error = self.place_again(raw, journaled)
                    if error is not None:
                        _log.error("replay_place_failed", shard=self.number, error=str(error)[:200])
                raw.commit()
                self.env.sync(True)
            except BaseException:
                self._local.writing = False
                raw.abort()
                raise
        self._local.writing = False
        raise StoreError(f"shard {self.number}: the write-ahead log does not match the index after "
                         f"{CATCH_UP_ROUNDS} replays")

    def _take_back(self, end: int) -> None:
        try:
            self.wal.void(end)
        except OSError:  # the next transaction replays it: a change its callers think failed
            _log.error("log_takeback_failed", exc_info=True, shard=self.number)

    def _taken_back(self, seq: int, end: int, batch: Batch | None = None) -> bool:
        """After LMDB failed to commit record seq + 1 that nobody was told of: cut it from the
        log, under the writer lock (LMDB let go of it with the failed commit) unless another
        process has replayed it meanwhile, the files `batch` placed removed first. Whether it
        was taken back (else it happened)."""
        try:
            txn = self.env.begin(write=True)
        except lmdb.Error:
            _log.error("log_takeback_failed", exc_info=True, shard=self.number)
            return True
        try:
            if wal.read_position(txn, self.db["counters"])[0] > seq:
                return False  # another process replayed it: it happened, like any commit
            if batch is not None:
                _unplace(batch)
            self._take_back(end)
            return True
        finally:
            txn.abort()

    def _room_for(self, record: int, changes: int) -> bool:
        """Whether the disk has room for LMDB to commit a transaction of `changes` changes
        logged in `record` bytes, with a wide margin (its pages and their copies), and for the
        files it makes (Shard._place)."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        # A file system out of inodes (f_files 0: one without a fixed number) cannot take the
        # batch's new files, whatever its free bytes.
        inodes = st.f_files == 0 or st.f_favail > ROOM_INODES
        return inodes and st.f_bavail * st.f_frsize > 2 * record + COPIED_PAGES * changes + ROOM_MARGIN

    def _place(self, batch: Batch) -> None:
        """Make the files of the journaled messages of a transaction the log has and nobody
        was told of, before LMDB commits it (no room to tell early: see _room_for). A file
        that cannot be made fails the transaction; the caller removes those made so far."""
        for path, data, mtime, key in batch.placed:
            _write_placed(path, data, mtime)
            batch.journaled.append(key)

    def _place_committed(self, batch: Batch, committed: int) -> None:
        """Make the files of the journaled messages of a transaction LMDB has just committed,
        its callers told: outside the writer lock, which the shard's other writers (another
        mtad process, imapd) wait for. Until a file is made its readers take the journal's
        copy (Store.open_message). Another process's flag change or expunge that committed
        meanwhile found no file to rename or remove: `match_files` makes each file what the
        index says now, as a settle does (unless no commit came after this one, `committed`:
        one that comes later finds the file). A file that cannot be made (a full disk) does
        not undo the delivery: the bytes stay in the journal, and the next checkpoint (or,
        should this process die, the next to open the shard) makes the file."""
        made: list[tuple[Path, bytes]] = []
        for path, data, mtime, key in batch.placed:
            # Written whole in this process's writer directory, then renamed: the UID is
            # visible already, and a reader that opens the file must find it whole. (Killed
            # halfway, the process leaves the staged file under a name that is no message's:
            # the next opening of the shard removes it, storage/settle.py recover.)
            staged = self.writer.path / (key.decode("utf-8", "surrogateescape") + ".placing")
            try:
                write_file(staged, data, mtime, flush=False, replace=True)
                try:
                    os.rename(staged, path)
                except FileNotFoundError:
                    # The mailbox's directories are made by the settle after the commit that
                    # creates it; or the mailbox was deleted since, and the message with it.
                    if not self._indexed(key):
                        _unlink_quietly(staged)
                        batch.journaled.append(key)
                        continue
                    make_dirs(path.parent.parent)
                    os.rename(staged, path)
            except OSError as e:
                _unlink_quietly(staged)
                _log.error("file_place_failed", shard=self.number, file=path.name, error=str(e)[:200])
                with self._lock:
                    self._unplaced.append(key)
                continue
            made.append((path, key))
        if made and self.match_files is not None and self.env.info()["last_txnid"] != committed:
            try:
                self.match_files(made)
            except Exception:  # noqa: BLE001 - the files exist; `store check` reports a stale name
                _log.error("settle_failed", exc_info=True, shard=self.number)
        batch.journaled.extend(key for _, key in made)

    def _indexed(self, key: bytes) -> bool:
        """Whether the index has the message whose file base is `key` now."""
        with self.read() as txn:
            return txn.get(key, db=self.db["bases"]) is not None

    def _catch_up(self) -> None:
        """Wait for a commit in flight (LMDB's writer lock) and replay what a dead process
        left in the log."""
        self._begin_caught_up(self.db["counters"]).abort()
        self._local.writing = False

    def _replay_now(self) -> None:
        """A record LMDB did not take: into LMDB now, so that readers see it (if this fails
        too, the next write transaction, of any process, tries again)."""
        try:
            self._catch_up()
        except Exception:  # noqa: BLE001 - logged; the record is durable in the log
            _log.error("replay_failed", exc_info=True, shard=self.number)

    def _commit(self, requests: list[_Request]) -> None:
        """Run a batch; every request ends with a result or an error, whatever happens,
        and the committer lives on for the next batch."""
        try:
            self._run_befores([r for r in requests if r.before is not None])
            live = [r for r in requests if r.error is None]
            if live and not self._run_together(live, requests):
                self._run_nested(live)
        finally:
            for request in requests:
                self._settle(request)

    def _settle(self, request: _Request) -> None:
        if request.done.is_set():
            return  # an early one, settled once its commit was durable
        request.done.set()
        if request.on_done is not None:
            try:
                request.on_done(request)
            except Exception:  # the caller's callback: it must not stop the committer
                _log.error("on_done_failed", exc_info=True, shard=self.number)

    def _run_befores(self, requests: list[_Request]) -> None:
        try:
            self._side_by_side(_run_before, requests)
        except Exception as e:  # e.g. no thread for the pool: these requests fail, the shard goes on
            _log.error("before_failed", exc_info=True, shard=self.number)
            _fail([r for r in requests if r.error is None], e, self.path)

    def _run_together(self, requests: list[_Request], everyone: list[_Request]) -> bool:
        """The batch in one transaction, as it nearly always succeeds: without a nested
        transaction per request (LMDB maps 2 MiB for each, and unmapping it interrupts every
        CPU). False, with nothing changed, when a request failed among others: they must
        then run again, each on its own. What came in while the writer lock was awaited
        joins `requests` (and `everyone`, the batch its caller settles): see _join_late."""
        batch = Batch()
        failed: tuple[_Request, BaseException] | None = None
        durable = False

        def tell_early() -> None:
            nonlocal durable
            durable = True
            for request in requests:
                if request.early:
                    self._settle(request)

        try:
            with self._transaction(tell_early, batch=batch) as txn:
                self._join_late(requests, everyone)
                for request in requests:
                    try:
                        request.result = request.change(txn, batch)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        failed = (request, e)
                        raise
                self._fsync_dirs(batch.sync_dirs)
        except BaseException as e:  # noqa: BLE001 - a request's error, or the commit's
            if durable:  # the log has it: done, whatever came after (a cut of the log failed)
                _log.error("after_log_failed", exc_info=True, shard=self.number)
                self._after_commit(batch)
                return True
            batch.rollback()
            if failed is None:
                _fail(requests, e, self.path)
            elif len(requests) == 1:
                failed[0].error = store_error(failed[1])
            else:
                for request in requests:
                    request.result = None  # from the transaction just aborted
                return False
            return True
        self._after_commit(batch)
        return True

    def _join_late(self, live: list[_Request], everyone: list[_Request]) -> None:
        """Under the writer lock, before the batch runs: the requests queued since it was
        taken join it. The lock is what another process's commit holds (two mtad workers
        deliver to every shard, imapd writes flags), for a flush or two; a committer that
        waited for it would otherwise commit what it had and find the sessions it kept
        waiting queued for the next turn, which waits for the other process again. Joined
        here they share this record's one flush: under contention batches grow, where
        before each process's commit carried what came before its turn."""
        room = MAX_BATCH - len(everyone)
        if room <= 0 or self._queue.empty():
            return
        more, stop = self._take_queued(None, room)
        if stop:
            self._stop_seen = True
        for request in more:
            if request.before is None and not self._deferred:
                everyone.append(request)
                live.append(request)
            else:
                # Its file work (a big message's fsync) would run under the writer lock and
                # a commit slot, holding back the other processes and this one's other
                # shards: it opens the next batch instead, and what follows it, in order.
                self._deferred.append(request)

    def _run_nested(self, requests: list[_Request]) -> None:
        """Each request in a nested transaction, so that one failing cannot spoil the others."""
        batch = Batch()
        try:
            with self._transaction(batch=batch) as txn:
                for request in requests:
                    mark = batch.mark()
                    child = txn.child(self.env)
                    try:
                        request.result = request.change(child, batch)
                        txn.commit_child(child)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        child.txn.abort()
                        batch.rollback(mark)
                        request.error = store_error(e)
                self._fsync_dirs(batch.sync_dirs)
        except BaseException as e:  # noqa: BLE001 - the whole batch failed to commit
            batch.rollback()
            _fail([r for r in requests if r.error is None], e, self.path)
            return
        self._after_commit(batch)


class _Repeating:
    """A failure of background work that comes back at every turn for as long as its cause
    lasts (a full disk: hours, maybe): logged when it starts, then once a REPEAT_LOG_EVERY
    with how many times it failed, not once a turn; a file system's error (a full disk, EIO,
    a directory that refuses a file) without a traceback, as it is no bug: its errno and path
    say what is wrong."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.failures = 0
        self._logged = -REPEAT_LOG_EVERY

    def failed(self, error: BaseException) -> dict[str, Any] | None:
        """The log line's fields, if this failure is to be logged."""
        self.failures += 1
        if time.monotonic() - self._logged < REPEAT_LOG_EVERY:
            return None
        self._logged = time.monotonic()
        full = isinstance(error, DiskFullError) or is_disk_full(error, self.shard.path)
        return {"exc_info": not (full or isinstance(error, OSError)), "shard": self.shard.number,
                "failures": self.failures,
                "error": DISK_FULL if full else f"{error.__class__.__name__}: {error}"}

    def cleared(self) -> None:
        self.failures, self._logged = 0, -REPEAT_LOG_EVERY


def _fail(requests: list[_Request], cause: BaseException, where: Path | None = None) -> None:
    full = is_disk_full(cause, where)
    for request in requests:
        # What a client may be told (IMAP NO [OVERQUOTA] shows it): no library's words.
        if isinstance(cause, NotOwnerError):
            error: StoreError = NotOwnerError(str(cause))
        elif full:
            error = DiskFullError(DISK_FULL)
        else:
            error = StoreError(f"commit failed: {cause.__class__.__name__}: {cause}")
        error.__cause__ = cause
        request.error = error


def _run_after_commit(batch: Batch) -> None:
    for action in batch.after_commit:
        try:
            action()
        except OSError:
            pass  # a file left behind is an orphan `store check` reports
        except Exception:  # the commit is done: its callers must hear so all the same
            _log.error("after_commit_failed", exc_info=True)


def _run_before(request: _Request) -> None:
    try:
        request.before()
    except BaseException as e:  # noqa: BLE001 - handed to the caller
        request.error = store_error(e)


def _write_placed(path: Path, data: bytes, mtime: float) -> None:
    """A journaled message's file in cur/ of its mailbox, not flushed (a checkpoint's syncfs
    does that); its directories made here if they are not yet (a mailbox's are made after
    the commit that creates it, storage/settle.py)."""
    try:
        write_file(path, data, mtime, flush=False, replace=True)
    except FileNotFoundError:
        make_dirs(path.parent.parent)
        write_file(path, data, mtime, flush=False, replace=True)


def _unplace(batch: Batch) -> None:
    """Remove the files `batch` placed for a transaction that is being taken back, and flush
    their directories: should the machine crash after the record is voided, no file of it
    may stay in cur/ under a UID the next delivery is given again."""
    for path, *_ in batch.placed:
        _unlink_quietly(path)
    for directory in {path.parent for path, *_ in batch.placed}:
        try:
            fsync_dir(directory)
        except OSError:
            pass  # gone with its mailbox, or the disk failing: `store check` reports what stays


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir_if_there(path: Path) -> None:
    """A directory removed or renamed since it changed (a deleted mailbox, a rebuild) has
    nothing left to make durable under that name."""
    try:
        fsync_dir(path)
    except FileNotFoundError:
        pass


def _run_each(action: Callable[[Any], None], items: list) -> None:
    """One lane of _side_by_side: the items, one after the other."""
    for item in items:
        action(item)


def link_or_copy(source: Path, target: Path) -> None:
    """A second name for an immutable message file; a copy where links cannot reach."""
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(target.name + ".copy")
        shutil.copyfile(source, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
