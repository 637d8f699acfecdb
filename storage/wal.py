"""A shard's write-ahead log: the one flush on a commit's critical path.

LMDB makes a commit durable with two flushes, its new pages (scattered over the file: a
copy of every B-tree page the transaction touched, 20 to 30 for a delivery) and then its
meta page. On this machine's disk the first costs 1.2 ms and the second 0.25 ms; an append
of the same transaction's changes to one file, flushed, costs 0.3 ms (bench/RESULTS.md,
issue 17). So a write transaction's changes (every put and delete, in order: its "write
set") are appended here and flushed BEFORE LMDB commits it, and the commit's callers that
only need durability (mtad's 250) are told then. LMDB runs with MDB_NOMETASYNC: its data
pages are still flushed at each commit, but after the callers were told, and its meta page
reaches the disk with the next commit's flush or a checkpoint's sync. That keeps LMDB
whole through a crash of the machine (ACI: the meta page is written only after the pages
it points at are on disk) while its last transaction may be missing; the log has it.

Which records are in LMDB is told by two keys in `counters`, written in the transaction
of each record: `walseq`, the number of the last record applied (a record's number is
walseq + 1, taken under LMDB's writer lock, so the numbers of a shard's records are
consecutive whichever process wrote them), and `walend`, the offset where the next record
goes. Every write transaction, in any process, first looks at walend: if a record numbered
walseq + 1 starts there, a process died between its flush and its commit, or the machine
crashed, and the transaction replays it and every record after it numbered one more (in
order: each is a redo of one transaction on the state the one before it left). A record
whose header is there but not the rest (an append a crash cut short) is voided: its
header zeroed. Replay is exact: a record holds the values the transaction wrote, UIDs and
MODSEQs included, not the requests that made them.

The file is written in place, not appended to: it is grown ahead of the records in chunks
of zeros, flushed once, so that a record's flush moves data only. An append that grows a
file changes its size too, and ext4 commits its journal for that: 200-250 us a flush on
this machine's disk, against 90-100 us in place (bench/RESULTS.md, issue 17). So the file's
size says nothing of where the records end: they end where the numbers stop following on,
and each record is followed by a zeroed header written with it (and a restart voids the
header at offset 0), so walend never lands inside old bytes.

A checkpoint (storage/shard.py) syncs LMDB, so every record is then in it for good, and
starts the log again at offset 0, under the writer lock: the file keeps its size (up to
KEEP_BYTES) and its old records, whose numbers are at or below walseq and so are never
replayed; were the restart lost with a crash, the same holds. The log's offsets are reused
only once LMDB knows, on disk, that they were freed: the first record after a restart syncs
LMDB first, and so does a transaction that replayed or voided anything, before it goes on;
else a crash could leave LMDB's walend naming offsets that now hold other records.

A record: magic, payload length, CRC-32 of its number and payload, its number (big-endian), then the
payload: msgpack of a flat list, three items per change: the database's index in
`databases`, the key, the value (None: the key was deleted; key and value None: the
database was emptied).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import msgspec

MAGIC = b"PRW1"
HEADER = struct.Struct(">4sIIQ")  # magic, payload length, CRC-32, record number
SEQ_KEY = b"walseq"  # in `counters`
END_KEY = b"walend"
_U64 = struct.Struct(">Q")
CHUNK_BYTES = 1 << 20  # the log grows by this much of zeros at a time
KEEP_BYTES = 8 << 20  # a log restarted at a checkpoint keeps up to this much of its file
_ZEROS = bytes(CHUNK_BYTES)
_END = bytes(HEADER.size)  # after each record: where the next goes reads as no record
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list).decode


class Recorder:
    """A write transaction that notes each change it makes, for the log. Reads, cursors and
    everything else are the transaction's own; only the writes are seen here."""

    __slots__ = ("txn", "changes", "_index")

    def __init__(self, txn: lmdb.Transaction, index: dict[Any, int], changes: list | None = None):
        self.txn = txn
        self.changes: list = [] if changes is None else changes
        self._index = index  # database handle -> its number in the log

    def get(self, key, default=None, db=None):
        return self.txn.get(key, default, db=db)

    def put(self, key, value, dupdata=True, overwrite=True, append=False, db=None) -> bool:
        written = self.txn.put(key, value, dupdata=dupdata, overwrite=overwrite, append=append, db=db)
        if written:
            self.changes += (self._index[db], _frozen(key), _frozen(value))
        return written

    def delete(self, key, value=b"", db=None) -> bool:
        deleted = self.txn.delete(key, value, db=db)
        if deleted:
            self.changes += (self._index[db], _frozen(key), None)
        return deleted

    def drop(self, db, delete: bool = True) -> None:
        """Empty `db` (its handle kept: delete=False only)."""
        if delete:
            raise NotImplementedError("a database's removal is not recorded in the log")
        self.txn.drop(db, delete=False)
        self.changes += (self._index[db], None, None)

    def replace(self, *args, **kwargs):
        raise NotImplementedError("not recorded in the log: get and put")

    pop = putmulti = replace

    def cursor(self, db=None) -> _RecordingCursor:
        return _RecordingCursor(self.txn.cursor(db=db), self.changes, self._index[db])

    def stat(self, db):
        return self.txn.stat(db)

    def id(self) -> int:
        return self.txn.id()

    def child(self, env: lmdb.Environment) -> Recorder:
        """A nested transaction whose changes join this one's only if it commits (see commit_child)."""
        return Recorder(env.begin(write=True, parent=self.txn), self._index)

    def commit_child(self, child: Recorder) -> None:
        child.txn.commit()
        self.changes += child.changes

    def __getattr__(self, name: str):
        return getattr(self.txn, name)


class _RecordingCursor:
    __slots__ = ("_cursor", "_changes", "_db")

    def __init__(self, cursor: lmdb.Cursor, changes: list, db: int):
        self._cursor, self._changes, self._db = cursor, changes, db

    def delete(self, dupdata: bool = False) -> bool:
        key = self._cursor.key()
        deleted = self._cursor.delete(dupdata)
        if deleted:
            self._changes += (self._db, key, None)
        return deleted

    def put(self, key, value, dupdata=True, overwrite=True, append=False) -> bool:
        written = self._cursor.put(key, value, dupdata=dupdata, overwrite=overwrite, append=append)
        if written:
            self._changes += (self._db, _frozen(key), _frozen(value))
        return written

    def replace(self, *args, **kwargs):
        raise NotImplementedError("not recorded in the log: get and put")

    pop = putmulti = replace

    def __iter__(self):
        return iter(self._cursor)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._cursor.close()

    def __getattr__(self, name: str):
        return getattr(self._cursor, name)


def _frozen(value):
    """The bytes as they are now (a bytearray could change before the record is encoded)."""
    return value if type(value) is bytes else bytes(value)


def indexes(databases: dict[str, Any], names: Sequence[str]) -> tuple[dict, list]:
    """(handle -> number, number -> handle): how the log names the shard's databases."""
    handles = [databases[name] for name in names]
    return {handle: i for i, handle in enumerate(handles)}, handles


class WriteAheadLog:
    """The log file of one shard, opened by each process that writes it; every call that
    writes is made inside a write transaction of the shard (LMDB's writer lock orders them
    across processes)."""

    def __init__(self, path: Path, handles: list):
        self.path = path
        self._handles = handles
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        os.close(self._fd)

    def append(self, record: bytes, end: int) -> int:
        """Write `record` (encode's) at `end` (where LMDB says the next record goes) and
        flush it; the new end. A zeroed header goes after it in the same write: walend then
        always lands on zeros or on a record written there since, never on old bytes that
        might read as a record (a message's own text could). On any failure the record is
        voided, so that no part of it is replayed, and the error raised."""
        stop = end + len(record)
        try:
            if stop + HEADER.size > self.size():
                self._grow(stop + HEADER.size)
            written = os.pwrite(self._fd, record + _END, end)
            if written != len(record) + HEADER.size:
                raise OSError(28, os.strerror(28))  # a short write to a regular file: the disk is full
            os.fdatasync(self._fd)
        except BaseException:
            try:
                self.void(end)
            except OSError:
                pass  # the next transaction finds the record torn and voids it itself
            raise
        return stop

    def _grow(self, stop: int) -> None:
        """Zeros from the file's end to past `stop`, a whole number of chunks, flushed: the
        records written there later change no size. On a disk too full for a chunk, up to
        `stop` only, as an append would need. Cut back on failure."""
        size = self.size()
        try:
            self._zeros(size, (stop // CHUNK_BYTES + 1) * CHUNK_BYTES)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self._zeros(size, stop)

    def _zeros(self, size: int, target: int) -> None:
        try:
            at = size
            while at < target:
                at += os.pwrite(self._fd, _ZEROS[:target - at], at)
            os.fdatasync(self._fd)
        except BaseException:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass  # zeros past the records: harmless, and reused
            raise

    def void(self, end: int) -> None:
        """The record at `end` is none: its header zeroed and flushed."""
        os.pwrite(self._fd, _END, end)
        os.fdatasync(self._fd)

    def size(self) -> int:
        """The file's size: room for records, not where they end."""
        return os.fstat(self._fd).st_size

    def has_next(self, seq: int, end: int) -> bool:
        """Whether a record numbered seq + 1 (whole or torn) starts at `end`."""
        head = os.pread(self._fd, HEADER.size, end)
        if len(head) < HEADER.size:
            return False
        magic, _, _, number = HEADER.unpack(head)
        return magic == MAGIC and number == seq + 1

    def records(self, start: int = 0) -> Iterator[tuple[int, list, int]]:
        """(number, changes, end offset) of each whole record from `start`, up to the first
        that is not one (zeros, a torn append, the end of the file). Their numbers may not
        follow on: past the last record since a restart lie older ones (see catch_up)."""
        offset, size = start, self.size()
        while True:
            head = os.pread(self._fd, HEADER.size, offset)
            if len(head) < HEADER.size:
                return
            magic, length, crc, seq = HEADER.unpack(head)
            if magic != MAGIC or offset + HEADER.size + length > size:
                return  # not a record, or a length no whole record has (read nothing that big)
            payload = os.pread(self._fd, length, offset + HEADER.size)
            if len(payload) < length or _crc(seq, payload) != crc:
                return
            offset += HEADER.size + length
            yield seq, _decode(payload), offset

    def apply(self, txn: lmdb.Transaction, changes: list) -> None:
        """Make the changes of one record again, in order, in `txn`."""
        handles = self._handles
        for i in range(0, len(changes), 3):
            db, key, value = handles[changes[i]], changes[i + 1], changes[i + 2]
            if key is None:
                txn.drop(db, delete=False)
            elif value is None:
                txn.delete(key, db=db)
            else:
                txn.put(key, value, db=db)

    def restart(self, *, release: bool = False) -> None:
        """Records go at offset 0 again (the caller writes walend = 0 in the same
        transaction). The file is emptied when `release` (a clean close) or when it grew
        past KEEP_BYTES; else its room is kept, and the old record at 0 voided, so that
        offset 0 too holds zeros until a record is written there (see append)."""
        if release or self.size() > KEEP_BYTES:
            os.ftruncate(self._fd, 0)
        elif self.size() >= HEADER.size:
            self.void(0)


def encode(seq: int, changes: list) -> bytes:
    """Record number `seq`, holding `changes`."""
    payload = _encode(changes)
    return HEADER.pack(MAGIC, len(payload), _crc(seq, payload), seq) + payload


def _crc(seq: int, payload) -> int:
    """The record's check: its number and its payload."""
    return zlib.crc32(payload, zlib.crc32(_U64.pack(seq)))


def read_position(txn: lmdb.Transaction, counters) -> tuple[int, int]:
    seq = txn.get(SEQ_KEY, db=counters)
    end = txn.get(END_KEY, db=counters)
    return (_U64.unpack(seq)[0] if seq else 0), (_U64.unpack(end)[0] if end else 0)


def write_position(txn: lmdb.Transaction, counters, seq: int, end: int) -> None:
    txn.put(SEQ_KEY, _U64.pack(seq), db=counters)
    txn.put(END_KEY, _U64.pack(end), db=counters)


def catch_up(txn: lmdb.Transaction, counters, log: WriteAheadLog,
             replaying: Callable[[list], None] | None = None) -> int:
    """At the start of a write transaction: replay the records the log holds beyond LMDB
    (see the module's text) and void a torn one after them, each record's changes shown to
    `replaying` first. The number replayed."""
    seq, end = read_position(txn, counters)
    replayed = 0
    for number, changes, stop in log.records(end):
        if number != seq + 1:
            break  # an older record, from before the last restart: applied long ago
        if replaying is not None:
            replaying(changes)
        log.apply(txn, changes)
        seq, end, replayed = number, stop, replayed + 1
    if log.has_next(seq, end):  # a header that names the next record, but no whole record
        log.void(end)
    write_position(txn, counters, seq, end)
    return replayed
