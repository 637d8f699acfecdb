"""The index as the journal: a new message's bytes committed with its index record.

A durable delivery used to cost four flushes in a row: the message file's fsync, its
directory's, then LMDB's commit (its data pages, then its meta page). Now a message small
enough to be held in memory (storage/delivery.py, IN_MEMORY) has its bytes put in the
shard's `journal` database, in the same transaction that gives it its UID, and its file is
written without a flush, straight into cur/ under its final name, once LMDB has committed
that transaction, outside LMDB's writer lock (Shard._place_committed; until then a reader
takes the journal's copy, and a flag change or expunge committed meanwhile is applied to
the file once it is made: storage/settle.py match). The log's flush, which the transaction
needed anyway, makes the bytes durable too: one flush, and no file or directory flush,
stands between the end of DATA and the 250.

The files catch up off the critical path. After each commit the shard hands the batch's
journal keys, with the `unsettled` keys settled (storage/settle.py), to its checkpointer
(storage/shard.py): every CHECKPOINT_INTERVAL it flushes the file system once (syncfs(2):
every file and directory written since, in one go), then deletes those keys. So the
journal holds about one interval of mail, and a key is deleted only once its file, under
its final name, is on disk.

After a crash of the machine, a file whose flush had not happened may be missing, short or
empty, however its directory looks; after a crash of a process, a file it had not made yet
is missing (the replay of the log makes those of the records it replays: place_again; of a
transaction LMDB had committed, readers take the journal's copy until `restore` below).
`restore` puts every such file back from its journal entry before anything reads the shard
(a daemon opens its shards before it listens), then flushes and deletes the entries: a 250
promised the bytes, and the journal has them. The entries of live processes are theirs to
checkpoint; a dead process's are restored by the next one to open the shard.

An entry's key is the message's file base; its value: the writer directory's name of the
process that committed it (storage/writers.py), NUL, the internal date as a decimal
(the file's mtime), NUL, the bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from pathlib import Path

import lmdb

from conf.logfmt import EventLogger
from storage import maildir
from storage.records import get_mailbox, unpack_entry
from storage.settle import locate
from storage.shard import Shard, unpack_uid_key
from storage.writers import dead_writers
from wire import metrics

_log = EventLogger("storage.journal")


def put(txn: lmdb.Transaction, shard: Shard, base: str, data: bytes, mtime: float) -> bytes:
    """Record `data` as the bytes of message `base` (committed with `txn`); the key."""
    key = base.encode("utf-8", "surrogateescape")
    header = f"{shard.writer.path.name}\0{mtime!r}\0".encode()
    txn.put(key, header + data, db=shard.db["journal"])
    return key


def held(txn: lmdb.Transaction, shard: Shard, base: str) -> bytes | None:
    """The bytes of message `base` while the journal holds them: until a checkpoint has made
    its file and flushed it. None after that, or for a message never journaled."""
    raw = txn.get(base.encode("utf-8", "surrogateescape"), db=shard.db["journal"])
    return None if raw is None else _parse(bytes(raw))[2]


def copy(txn: lmdb.Transaction, shard: Shard, source_base: str, base: str) -> bytes | None:
    """A new name (`base`, a COPY's or MOVE's link) for a message whose bytes are still in the
    journal gets its own entry: the link shares the file's unflushed data. Its key, or None."""
    raw = txn.get(source_base.encode("utf-8", "surrogateescape"), db=shard.db["journal"])
    if raw is None:
        return None
    _, mtime, data = _parse(bytes(raw))
    return put(txn, shard, base, data, mtime)


def restore(shard: Shard) -> None:
    """Put back, from the journal, the files of dead processes' entries that a crash left
    missing or damaged; flush; delete those entries. At shard open, before any reader.

    The files are looked at and written inside a write transaction: LMDB's writer lock
    makes the processes that open the shard at once after a crash (serve starts mtad,
    imapd and pop3d together) restore one after the other, rather than write and rename
    the same staged files under each other; and no live process can expunge or rename a
    message between the look at the index and the file written for it. The flush comes
    after that transaction, so that the others' commits do not wait for it; the entries
    are then deleted in a second one, which looks at each file again (a live process may
    have renamed or expunged it meanwhile) and flushes again only if it had to write."""
    # Who is alive is all it needs: the dead writers' locks are let go before the writes.
    # Held while waiting for LMDB's writer lock, one could be the lock of a live process
    # that made its writer directory inside a transaction and waits in flock() for it.
    with dead_writers(shard.tmp_root, skip=shard.writer) as (_, alive):
        pass
    with shard.read() as txn:
        if not any(_writer(bytes(value[:200])) not in alive for _, value in txn.cursor(db=shard.db["journal"])):
            return
    restored, keys = shard.write(lambda txn, batch: _restore(txn, shard, alive))
    shard.flush()
    # Only the entries the flush covered: one a process that started since the look at
    # the writers committed meanwhile counts as dead here, and its file is not flushed.
    again, entries = shard.write(lambda txn, batch: _restore(txn, shard, alive, forget=keys))
    if restored + again:
        _log.warning("journal_restored", shard=shard.number, files=restored + again, entries=len(entries))


def place_again(shard: Shard, txn: lmdb.Transaction, keys: list[bytes]) -> tuple[list[bytes], OSError | None]:
    """Make the files of these `journal` keys (a transaction replayed from the log, or a
    file that could not be made after its commit) where missing or damaged, inside the
    write transaction `txn`: (the keys whose files are now right, or no longer wanted; the
    error that kept the others, a full disk most likely)."""
    done, error = [], None
    for key in keys:
        raw = txn.get(key, db=shard.db["journal"])
        if raw is not None:
            try:
                _restore_one(txn, shard, key.decode("utf-8", "surrogateescape"), bytes(raw))
            except OSError as e:  # the entry stays for the next try
                error = e
                continue
        done.append(key)
    return done, error


def _restore(txn: lmdb.Transaction, shard: Shard, alive: set[str], *,
             forget: list[bytes] | None = None) -> tuple[int, list[bytes]]:
    """(files written again, the dead entries' keys); with `forget`, those of these keys
    still there are then deleted."""
    db = shard.db["journal"]
    if forget is None:
        keys = [bytes(key) for key, value in txn.cursor(db=db) if _writer(bytes(value[:200])) not in alive]
    else:
        keys = [key for key in forget if txn.get(key, db=db) is not None]
    restored = 0
    for key in keys:
        if _restore_one(txn, shard, key.decode("utf-8", "surrogateescape"), bytes(txn.get(key, db=db)), rename=True):
            restored += 1
    if forget is None:
        return restored, keys
    if restored:
        shard.flush()  # rare: written since the flush; before the entries go
    for key in keys:
        txn.delete(key, db=db)
    return restored, keys


def _restore_one(txn: lmdb.Transaction, shard: Shard, base: str, raw: bytes, *, rename: bool = False) -> bool:
    """Whether the file of `base` had to be written again. `rename`: a whole file under
    another name is renamed to the index's (a dead process's entry, restore)."""
    location = txn.get(base.encode("utf-8", "surrogateescape"), db=shard.db["bases"])
    if location is None:
        return False  # expunged since: nothing to keep
    mailbox_id, uid = unpack_uid_key(location)
    flags = txn.get(location, db=shard.db["flags"])
    state = get_mailbox(txn, shard, mailbox_id)
    if flags is None or state is None:
        return False  # an index at odds with itself: `store check` reports it
    entry = unpack_entry(flags)
    _, mtime, data = _parse(raw)
    directory = shard.mailbox_dir(state.account, mailbox_id)
    desired = directory / "cur" / maildir.file_name(base, uid, entry.size, entry.bits)
    current = locate(shard.tmp_root, directory, base, desired)
    if current is not None and _holds(current, data):
        # The bytes may have reached the disk without the utime that followed them (a file
        # system commit in between): the mtime is the internal date, for `store rebuild`.
        written = abs(os.stat(current).st_mtime - mtime) >= 0.001  # nanoseconds on disk, a float here
        if written:
            os.utime(current, (mtime, mtime))
        if rename and current != desired:
            # Made under the name its commit gave it by a process that died before it could
            # follow a flag change committed meanwhile (Shard._place_committed).
            os.rename(current, desired)
            written = True
        return written
    maildir.make_dirs(directory)
    # Maildir's way: written in tmp/, renamed into cur/. One name for every process: restores
    # take turns (restore), and the next one removes what one killed halfway left.
    staged = directory / "tmp" / f"{base}.restore"
    try:
        os.unlink(staged)
    except FileNotFoundError:
        pass
    maildir.write_file(staged, data, mtime, flush=False)  # the restore's syncfs flushes it
    os.replace(staged, desired)
    if current is not None and current != desired:
        try:
            os.unlink(current)
        except FileNotFoundError:
            pass
    return True


def _holds(path: Path, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def _parse(raw: bytes) -> tuple[str, float, bytes]:
    writer, _, rest = raw.partition(b"\0")
    mtime, _, data = rest.partition(b"\0")
    return writer.decode(), float(mtime), data


def _writer(head: bytes) -> str:
    return head.partition(b"\0")[0].decode("utf-8", "replace")


# -- flushing the file system ---------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class FileSystemFlusher:
    """A shard's checkpoint flush: syncfs(2) on the shard's file system, one flush for all
    the files and directories a checkpoint covers (fsyncing each would cost a flush apiece);
    sync(2) where syncfs is missing.

    Its directory is opened once, with the shard: the kernel reports a writeback error to
    a file descriptor opened before it, once, so a descriptor opened for each flush would miss
    an error of a page written back in between and let a checkpoint delete the journal
    entries of files the disk never took. After one error every flush fails: the entries
    stay in the index, and the next start restores their files from them."""

    def __init__(self, path: Path):
        self._path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._failed: OSError | None = None

    def __call__(self) -> None:
        if self._failed is not None:
            raise OSError(self._failed.errno, f"an earlier flush failed: {self._failed.strerror}", str(self._path))
        started = time.perf_counter()
        if _libc.syncfs(self._fd) != 0:
            error = ctypes.get_errno()
            if error != errno.ENOSYS:
                self._failed = OSError(error, os.strerror(error), str(self._path))
                raise self._failed
            os.sync()
        metrics.fsync_observed("checkpoint", time.perf_counter() - started)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
