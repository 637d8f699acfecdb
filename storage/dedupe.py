"""Exactly-once receipt: a message a sender sends again is not stored twice (RFC 1047's problem).

A sender that loses our 250 (the connection broke, we crashed after the commit and before
the reply) must send the message again, and without this it arrives twice. Each mailbox
keeps, for `window` seconds, a key of every message delivered to it by SMTP: a digest of its
Message-ID and of every byte its sender sent, header and body (only the trace headers we
add differ between two sendings: a new Received: with a new queue id and time). A delivery
whose key is known, for a message that is still there, is answered as delivered and stores
nothing. Without a Message-ID nothing is deduplicated: two messages with the same bytes are
not the same message. The header counts too: a list's copy of a message (its own List-Id
or Subject tag) is not the copy sent directly, and a forger who knows a message's Message-ID
and body cannot have the real one dropped by sending his own first.

Databases of the shard (keys big-endian):
    dedupe        mailbox id, digest            -> uid, time delivered (seconds)
    dedupe_times  time, mailbox id, digest      -> b""   (expiry order, for prune)
"""

from __future__ import annotations

import hashlib
import struct

import lmdb

from storage.shard import Shard, uid_key

_VALUE = struct.Struct(">Iq")
_TIME = struct.Struct(">q")
DIGEST_SIZE = 16
PRUNE_BATCH = 1000


def message_key(message_id: str | None, raw: bytes, sent_from: int) -> bytes | None:
    """The key of a message whose sender's bytes are raw[sent_from:], or None when it has no
    Message-ID to tell it by."""
    digest = SentDigest(sent_from)
    digest.update(raw)
    return digest.key(message_id)


class SentDigest:
    """A message's key computed as its bytes arrive (storage/delivery.py): every byte from
    offset `sent_from` on (what the sender sent, after the trace headers we prepend) goes
    into the digest; the Message-ID, known once the message is parsed, comes last."""

    def __init__(self, sent_from: int):
        self._skip = sent_from
        self._hash = hashlib.blake2b(digest_size=32)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._skip:
            skipped = min(self._skip, len(chunk))
            self._skip -= skipped
            chunk = memoryview(chunk)[skipped:]
        self._hash.update(chunk)

    def key(self, message_id: str | None) -> bytes | None:
        message_id = (message_id or "").strip()
        if not message_id:
            return None
        return hashlib.blake2b(message_id.encode("utf-8", "surrogateescape") + b"\0" + self._hash.digest(),
                               digest_size=DIGEST_SIZE).digest()


def find(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, key: bytes, now: float, window: float) -> int | None:
    """The UID of the message with this key, if it was delivered within the window and is
    still in the mailbox (one expunged, or withdrawn after a failed delivery, is not)."""
    raw = txn.get(uid_key(mailbox_id, 0)[:4] + key, db=shard.db["dedupe"])
    if raw is None:
        return None
    uid, when = _VALUE.unpack(raw)
    if now - when > window:
        return None
    if txn.get(uid_key(mailbox_id, uid), db=shard.db["flags"]) is None:
        return None
    return uid


def remember(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, key: bytes, uid: int, now: float) -> None:
    mailbox = uid_key(mailbox_id, 0)[:4]
    old = txn.get(mailbox + key, db=shard.db["dedupe"])
    if old is not None:
        txn.delete(_TIME.pack(_VALUE.unpack(old)[1]) + mailbox + key, db=shard.db["dedupe_times"])
    txn.put(mailbox + key, _VALUE.pack(uid, int(now)), db=shard.db["dedupe"])
    txn.put(_TIME.pack(int(now)) + mailbox + key, b"", db=shard.db["dedupe_times"])


def prune(txn: lmdb.Transaction, shard: Shard, before: float, limit: int = PRUNE_BATCH) -> bool:
    """Forget keys delivered before `before`, oldest first, at most `limit`; True while more
    remain (the shard's committer calls it in its idle time)."""
    cursor = txn.cursor(db=shard.db["dedupe_times"])
    if not cursor.first():
        return False
    for _ in range(limit):
        key = cursor.key()
        if not key or _TIME.unpack_from(key)[0] >= before:
            return False
        txn.delete(key[_TIME.size:], db=shard.db["dedupe"])
        if not cursor.delete():
            return False
    return bool(cursor.key()) and _TIME.unpack_from(cursor.key())[0] < before
