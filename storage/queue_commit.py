"""Group commit for the outbound queue's index (storage/queue.py), the shape of a shard's
committer (storage/shard.py) without its file work.

Every change to the queue is a function of a write transaction. One thread per Queue runs
all the changes that are waiting in ONE LMDB transaction, fsyncs the spool directory first
if any of them asks (a new message's file), commits with fsync, and only then wakes the
callers: concurrent enqueues and the runner's records share a commit (an LMDB commit with
sync is two fsyncs, 5-10 ms on a busy disk: without sharing, a commit each would cap a
process at about a hundred messages a second). Should one change raise, the batch is run
again with each change in a nested transaction, so that it cannot spoil the others.
Across processes, LMDB's writer lock serializes the committers.

`check(txn)`, when given, runs last in every write transaction, under LMDB's writer lock,
and may raise to abort the whole batch (a cluster node's queue: storage.NotOwnerError when
the node does not hold the queue's shard now, storage/queue.py "Fencing").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from conf.logfmt import EventLogger
from storage.errors import StoreError, store_error
from storage.maildir import fsync_dir

MAX_BATCH = 256

_log = EventLogger("storage.queue")


class _Request:
    __slots__ = ("change", "sync_dir", "done", "result", "error")

    def __init__(self, change: Callable[[lmdb.Transaction], Any], sync_dir: bool):
        self.change = change
        self.sync_dir = sync_dir
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Committer:
    def __init__(self, env: lmdb.Environment, directory: Path, name: str = "queue-commit",
                 check: Callable[[lmdb.Transaction], None] | None = None):
        self._env = env
        self._check = check
        self._directory = directory  # fsynced before a commit that adds files to it
        self._name = name
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def run(self, change: Callable[[lmdb.Transaction], Any], *, sync_dir: bool = False) -> Any:
        """change(txn) in the next batch; its result once committed (or its error)."""
        request = _Request(change, sync_dir)
        with self._lock:
            if self._closed:
                raise StoreError("queue is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._requests.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        """After the requests already waiting are committed."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._requests.put(None)
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < MAX_BATCH:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
            try:
                self._commit(batch)
            except Exception as e:  # a bug must cost one batch (its callers are told), never the committer
                _log.error("queue_commit_failed", exc_info=True)
                for request in batch:
                    if request.error is None and not request.done.is_set():
                        request.error = StoreError(f"queue commit failed: {e.__class__.__name__}")
            finally:
                for request in batch:
                    request.done.set()
            if stop:
                return

    def _commit(self, batch: list[_Request]) -> None:
        if any(r.sync_dir for r in batch):
            try:
                fsync_dir(self._directory)
            except OSError as e:
                error = store_error(e, self._directory)
                for request in batch:
                    if request.sync_dir:
                        request.error = error
                batch = [r for r in batch if not r.sync_dir]
        if batch and not self._together(batch):
            self._nested(batch)

    def _together(self, batch: list[_Request]) -> bool:
        """All in one transaction; False (nothing committed) if a change raised among others."""
        failed: tuple[_Request, BaseException] | None = None
        try:
            with self._env.begin(write=True) as txn:
                for request in batch:
                    try:
                        request.result = request.change(txn)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        failed = (request, e)
                        raise
                if self._check is not None:
                    self._check(txn)  # last, under the writer lock: a refusal aborts the batch
        except BaseException as e:  # noqa: BLE001 - a change's error, or the commit's
            if failed is None:
                _fail(batch, e, self._directory)
            elif len(batch) == 1:
                failed[0].error = _converted(failed[1], self._directory)
            else:
                for request in batch:
                    request.result = None
                return False
        return True

    def _nested(self, batch: list[_Request]) -> None:
        try:
            with self._env.begin(write=True) as txn:
                for request in batch:
                    child = self._env.begin(write=True, parent=txn)
                    try:
                        request.result = request.change(child)
                        child.commit()
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        child.abort()
                        request.result = None
                        request.error = _converted(e, self._directory)
                if self._check is not None:
                    self._check(txn)
        except BaseException as e:  # noqa: BLE001 - the commit itself failed
            _fail([r for r in batch if r.error is None], e, self._directory)


def _converted(error: BaseException, where: Path) -> BaseException:
    """What a caller is told: a full disk as DiskFullError, an LMDB failure as a StoreError
    (safe to show), anything else as it is."""
    error = store_error(error, where)
    if isinstance(error, lmdb.Error):
        failed = StoreError(f"queue commit failed: {error.__class__.__name__}: {error}")
        failed.__cause__ = error
        return failed
    return error


def _fail(batch: list[_Request], cause: BaseException, where: Path) -> None:
    for request in batch:
        request.result = None
        request.error = _converted(cause, where)
