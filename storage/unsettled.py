"""The `unsettled` records: file work a commit implies and that follows it (storage/settle.py).

Two kinds, keyed so that a second change to the same thing replaces the first:
    b"f" + base              the message file `base` must match the index: renamed into
                             cur/ under its name (UID, size, flags), or unlinked when the
                             index no longer has it. The value names the account, the
                             mailbox and where the file was last put (a hint, not a promise).
    b"d" + account \\0 id     the mailbox directory must match the index: made (with its
                             postroom.json) while the mailbox exists, removed once deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import lmdb

from storage.shard import Batch, Shard, record_unsettled

FILE = b"f"
DIR = b"d"


class FileWork(NamedTuple):
    base: str
    account: str
    mailbox_id: int
    hint: Path | None  # where the file was put, relative to the shard
    writer: str = ""  # the writer directory of the process that committed it


class DirWork(NamedTuple):
    account: str
    mailbox_id: int
    writer: str = ""


def note_file(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, mailbox_id: int, base: str,
              where: Path | None = None) -> None:
    hint = str(where.relative_to(shard.path)) if where is not None else ""
    record_unsettled(txn, shard, batch, FILE + base.encode(), f"{account}\0{mailbox_id}\0{hint}".encode())


def note_dir(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, mailbox_id: int) -> None:
    record_unsettled(txn, shard, batch, DIR + f"{account}\0{mailbox_id}".encode(), b"")


def parse(key: bytes, value: bytes) -> FileWork | DirWork | None:
    """What a record asks; None for one this version does not know (left alone)."""
    kind, rest = key[:1], bytes(key[1:]).decode("utf-8", "surrogateescape")
    fields = bytes(value).decode("utf-8", "surrogateescape").split("\0")
    writer = fields[-2] if len(fields) >= 2 else ""  # ... \0 writer \0 nonce (storage/shard.py)
    if kind == FILE:
        if len(fields) >= 5 and fields[1].isdigit():
            return FileWork(rest, fields[0], int(fields[1]), Path(fields[2]) if fields[2] else None, writer)
    elif kind == DIR:
        account, _, mailbox_id = rest.partition("\0")
        if mailbox_id.isdigit():
            return DirWork(account, int(mailbox_id), writer)
    return None
