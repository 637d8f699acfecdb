"""Annotations on the server and on mailboxes (RFC 5464, IMAP METADATA), in a shard's index.

    metadata   account \\0 id entry   -> the value's bytes
               account \\0            -> MetadataUsage: the account's entries, bytes, version

`id` is the mailbox id as four big-endian bytes, or SERVER (0, which no mailbox id is: ids
start from the clock) for the server's entries. Keyed by id, a mailbox's entries follow its
renames with no work; `drop` removes them with the mailbox, so a mailbox created again
under the same name starts with none (RFC 5464 §4.1). Entry names are stored in lower case:
they are case-insensitive (§3.2).

Limits, whatever a client sends: a value holds at most MAX_VALUE bytes (§4.3 asks at least
1024), an entry name at most MAX_NAME, and an account at most MAX_ENTRIES entries and
MAX_BYTES bytes of values over the server and all its mailboxes (§4.1 asks at least 10 per
mailbox). The usage record makes that check one read, not a walk over the account.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import lmdb
import msgspec

from storage.errors import MetadataLimitError, MetadataNameError
from storage.shard import Shard, pack_u32, unpack_u32

SERVER = 0
MAX_VALUE = 32 * 1024  # under the 64 KiB a command literal may carry (imapd), so MAXSIZE can be told
MAX_NAME = 200  # bytes; with the account (at most 254) the key stays under LMDB's 511
MAX_ENTRIES = 1000
MAX_BYTES = 4 << 20
DEPTHS = ("0", "1", "infinity")  # RFC 5464 §4.2.2
_SCOPES = ("/private/", "/shared/")


class MetadataUsage(msgspec.Struct):
    entries: int = 0
    bytes: int = 0
    # Bumped by every change to any of the account's entries: what the store's watcher
    # compares to tell NOTIFY's MailboxMetadataChange and ServerMetadataChange (RFC 5465
    # §5.6, §5.7). The record is kept at zero entries so that it never goes back.
    version: int = 0


_USAGE_ENCODER = msgspec.json.Encoder()
_USAGE_DECODER = msgspec.json.Decoder(MetadataUsage)


def entry_name(raw: str) -> str:
    """An entry name checked against RFC 5464 §3.2 and lower-cased, or MetadataNameError:
    ASCII without controls, `*` or `%`; /private/ or /shared/ and at least one more
    component; no empty component and no trailing `/`."""
    if not raw or len(raw) > MAX_NAME or not raw.isascii():
        raise MetadataNameError("invalid entry name")
    if any(ord(ch) < 0x20 or ch in "*%" for ch in raw):
        raise MetadataNameError("invalid entry name")
    name = raw.lower()
    if not name.startswith(_SCOPES) or name.endswith("/") or "//" in name:
        raise MetadataNameError("entry names start /private/ or /shared/ and have no empty component")
    return name


def _prefix(account: str, mailbox_id: int) -> bytes:
    return account.encode() + b"\0" + pack_u32(mailbox_id)


def _usage_key(account: str) -> bytes:
    return account.encode() + b"\0"


def usage(txn: lmdb.Transaction, shard: Shard, account: str) -> MetadataUsage:
    raw = txn.get(_usage_key(account), db=shard.db["metadata"])
    return _USAGE_DECODER.decode(raw) if raw is not None else MetadataUsage()


def _put_usage(txn: lmdb.Transaction, shard: Shard, account: str, used: MetadataUsage, changed: bool) -> None:
    if changed:
        used.version += 1
        txn.put(_usage_key(account), _USAGE_ENCODER.encode(used), db=shard.db["metadata"])


def digests(txn: lmdb.Transaction, shard: Shard, account: str) -> dict[tuple[int, str], int]:
    """(mailbox id, entry) -> a checksum of its value, for every entry of the account (at
    most MAX_ENTRIES): two of these tell which entries changed."""
    prefix = _usage_key(account)
    out = {}
    cursor = txn.cursor(db=shard.db["metadata"])
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            rest = key[len(prefix):]
            if len(rest) > 4:  # not the usage record
                out[(unpack_u32(rest[:4]), rest[4:].decode())] = zlib.crc32(value) ^ (len(value) << 32)
    return out


def get(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int, names: Iterable[str],
        depth: str = "0") -> list[tuple[str, bytes]]:
    """(entry, value) of each entry asked for that has a value, and with DEPTH 1 or infinity
    those below it (§4.2.2), in the order asked, each once."""
    db = shard.db["metadata"]
    prefix = _prefix(account, mailbox_id)
    found: dict[str, bytes] = {}
    for name in names:
        value = txn.get(prefix + name.encode(), db=db)
        if value is not None:
            found.setdefault(name, bytes(value))
        if depth == "0":
            continue
        below = prefix + name.encode() + b"/"
        cursor = txn.cursor(db=db)
        if not cursor.set_range(below):
            continue
        for key, value in cursor:
            if not key.startswith(below):
                break
            rest = key[len(below):]
            if depth == "1" and b"/" in rest:
                continue
            found.setdefault(key[len(prefix):].decode(), bytes(value))
    return list(found.items())


def set_entries(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int,
                items: Iterable[tuple[str, bytes | None]]) -> list[str]:
    """Set (or with None remove) each entry, all or nothing: a limit reached raises
    MetadataLimitError and the caller's transaction is aborted with it (§4.3). The names
    of the entries that changed."""
    db = shard.db["metadata"]
    prefix = _prefix(account, mailbox_id)
    used = usage(txn, shard, account)
    changed = []
    for raw_name, value in items:
        name = entry_name(raw_name)
        key = prefix + name.encode()
        old = txn.get(key, db=db)
        if value is None:
            if old is not None:
                txn.delete(key, db=db)
                used.entries -= 1
                used.bytes -= len(old)
                changed.append(name)
            continue
        if len(value) > MAX_VALUE:
            raise MetadataLimitError("value too large", f"METADATA MAXSIZE {MAX_VALUE}")
        if old is None:
            used.entries += 1
        used.bytes += len(value) - (len(old) if old is not None else 0)
        if used.entries > MAX_ENTRIES or used.bytes > MAX_BYTES:
            raise MetadataLimitError("too many annotations", "METADATA TOOMANY")
        txn.put(key, value, db=db)
        changed.append(name)
    _put_usage(txn, shard, account, used, bool(changed))
    return changed


def drop(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int) -> None:
    """Every entry of a mailbox, gone with it (§4.1)."""
    db = shard.db["metadata"]
    prefix = _prefix(account, mailbox_id)
    used = usage(txn, shard, account)
    before = used.entries
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        while cursor.key() and bytes(cursor.key()).startswith(prefix):
            used.entries -= 1
            used.bytes -= len(cursor.value())
            if not cursor.delete():
                break
    _put_usage(txn, shard, account, used, used.entries != before)


def copy(txn: lmdb.Transaction, shard: Shard, account: str, source_id: int, target_id: int) -> None:
    """A mailbox's entries copied to another: RENAME INBOX keeps INBOX's and gives the new
    mailbox the same (§4.1). Past the account's limits the copy stops short, silently: the
    rename must not fail for its annotations."""
    db = shard.db["metadata"]
    source, target = _prefix(account, source_id), _prefix(account, target_id)
    used = usage(txn, shard, account)
    pairs = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(source):
        for key, value in cursor:
            if not key.startswith(source):
                break
            pairs.append((key[len(source):], bytes(value)))
    before = used.entries
    for name, value in pairs:
        if used.entries + 1 > MAX_ENTRIES or used.bytes + len(value) > MAX_BYTES:
            break
        if txn.put(target + name, value, db=db, overwrite=False):
            used.entries += 1
            used.bytes += len(value)
    _put_usage(txn, shard, account, used, used.entries != before)


def move(txn: lmdb.Transaction, shard: Shard, account: str, source_id: int, target_id: int) -> None:
    """A mailbox's entries under another id (`store rebuild` renumbering a mailbox)."""
    db = shard.db["metadata"]
    source, target = _prefix(account, source_id), _prefix(account, target_id)
    pairs = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(source):
        for key, value in cursor:
            if not key.startswith(source):
                break
            pairs.append((bytes(key), bytes(value)))
    for key, value in pairs:
        txn.delete(key, db=db)
        txn.put(target + key[len(source):], value, db=db)
    _put_usage(txn, shard, account, usage(txn, shard, account), bool(pairs))
