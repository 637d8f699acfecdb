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
consecutive whichever process wrote them), and `walend`, where the log ended after it.
Every write transaction, in any process, first compares the log's size with walend: if
they differ, a process died between its append and its commit, or the machine crashed,
or an append failed half-way, and the transaction replays every whole record numbered
above walseq (in order: each is a redo of one transaction on the state the one before it
left) and cuts the log after the last whole record. Replay is exact: a record holds the
values the transaction wrote, UIDs and MODSEQs included, not the requests that made them.

A checkpoint (storage/shard.py) syncs LMDB, so every record is then in it for good, and
empties the log, under the writer lock. Were the cut to be lost with a crash, the records
come back with numbers at or below walseq and are skipped. The log's offsets are reused
only once LMDB knows, on disk, that they were freed: the first record after a cut syncs
LMDB first, and so does a transaction that replayed or cut anything, before it goes on; else
a crash could leave LMDB's walend naming offsets that now hold other records.

A record: magic, payload length, CRC-32 of its number and payload, its number (big-endian), then the
payload: msgpack of a flat list, three items per change: the database's index in
`databases`, the key, the value (None: the key was deleted; key and value None: the
database was emptied).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import msgspec

MAGIC = b"PRW1"
HEADER = struct.Struct(">4sIIQ")  # magic, payload length, CRC-32, record number
SEQ_KEY = b"walseq"  # in `counters`
END_KEY = b"walend"
_U64 = struct.Struct(">Q")
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
    """The log file of one shard, opened by each process that writes it; every call is made
    inside a write transaction of the shard (LMDB's writer lock orders them across processes)."""

    def __init__(self, path: Path, handles: list):
        self.path = path
        self._handles = handles
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        os.close(self._fd)

    def append(self, record: bytes, end: int) -> int:
        """Add `record` (encode's) after `end` (the log's size, as LMDB has it) and flush it;
        the new end. On any failure the log is cut back to `end`, so that no part of the
        record stays to be replayed, and the error raised."""
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(28, os.strerror(28))  # a short write to a regular file: the disk is full
            os.fdatasync(self._fd)
        except BaseException:
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                pass  # the next transaction finds the size off and cuts the log itself
            raise
        return end + len(record)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def records(self) -> Iterator[tuple[int, list, int]]:
        """(number, changes, end offset) of each whole record from the start, up to the first
        that is not (a torn append: the log is cut there)."""
        data = os.pread(self._fd, self.size(), 0)
        offset = 0
        while offset + HEADER.size <= len(data):
            magic, length, crc, seq = HEADER.unpack_from(data, offset)
            start, stop = offset + HEADER.size, offset + HEADER.size + length
            if magic != MAGIC or stop > len(data) or _crc(seq, memoryview(data)[start:stop]) != crc:
                return
            yield seq, _decode(data[start:stop]), stop
            offset = stop

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

    def truncate(self, length: int = 0) -> None:
        os.ftruncate(self._fd, length)


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


def catch_up(txn: lmdb.Transaction, counters, log: WriteAheadLog) -> int:
    """At the start of a write transaction: replay what the log holds beyond LMDB (see the
    module's text) and cut off a torn tail. The number of records replayed."""
    seq, end = read_position(txn, counters)
    size = log.size()
    if size == end:
        return 0
    replayed, valid_end = 0, 0
    for number, changes, stop in log.records():
        if number > seq + 1:
            break  # a gap cannot be (numbers are taken under the writer lock): keep nothing past it
        if number == seq + 1:
            log.apply(txn, changes)
            seq, replayed = number, replayed + 1
        valid_end = stop
    if valid_end != size:
        log.truncate(valid_end)
    write_position(txn, counters, seq, valid_end)
    return replayed
