"""Every UID of a mailbox with its flag bits, as SELECT needs them, kept from one call to the
next in this process and brought up to date from the changes since (as Dovecot's index is):
a SELECT of an unchanged mailbox reads one record, not one record per message.

The truth stays the index: a listing is used only for the MODSEQ it was read at, and moved
to the mailbox's current MODSEQ by the UIDs changed and expunged since (the `modseqs` and
`expunged` databases, as changes_since reads them), inside the caller's read transaction.
When that does not add up to the mailbox's message count (an expunge history pruned, say),
or the changes are many, the listing is read again whole.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_left
from collections import OrderedDict
from typing import NamedTuple

import lmdb

from storage.messages import flag_names_stored
from storage.records import ENTRY_HEAD
from storage.shard import Shard, modseq_key, uid_key, unpack_modseq_key

MAX_MAILBOXES = 128  # listings kept, least recently used dropped
MAX_MESSAGES = 2_000_000  # in all of them (5 bytes each)



class Listing(NamedTuple):
    """Never changed once made (a new one replaces it): shared by the threads that read it."""

    modseq: int  # the mailbox's, when this was read
    uids: array  # ascending
    bits: bytearray  # the flag bits of uids[i]
    modseqs: array  # the MODSEQ of uids[i]
    keywords: dict[int, bytes]  # uid -> its keywords as stored, for those that have any

    def flags_at(self, i: int) -> tuple[str, ...]:
        """The flag names of uids[i]."""
        return flag_names_stored(self.bits[i], self.keywords.get(self.uids[i], b""))

    # The flag names of flag bits and keywords as stored (those of `bits` and `keywords`).
    flag_names = staticmethod(flag_names_stored)


def read_whole(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, modseq: int) -> Listing:
    uids, bits, modseqs, keywords = array("I"), bytearray(), array("Q"), {}
    cursor = txn.cursor(db=shard.db["flags"])
    prefix = uid_key(mailbox_id, 0)[:4]
    if cursor.set_range(uid_key(mailbox_id, 1)):
        add_uid, add_bits, add_modseq = uids.append, bits.append, modseqs.append
        for key, value in cursor:
            if key[:4] != prefix:
                break
            uid = int.from_bytes(key[4:8], "big")
            add_uid(uid)
            add_bits(value[8])
            add_modseq(int.from_bytes(value[:8], "big"))
            if len(value) > ENTRY_HEAD:
                keywords[uid] = bytes(value[ENTRY_HEAD:])
    return Listing(modseq, uids, bits, modseqs, keywords)


def _uids_after(txn: lmdb.Transaction, db, mailbox_id: int, modseq: int, limit: int) -> list[int] | None:
    """UIDs keyed (mailbox, modseq, uid) in `db` above `modseq`; None past `limit` of them."""
    out: list[int] = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(modseq_key(mailbox_id, modseq + 1, 0)):
        for key in cursor.iternext(values=False):
            box, _, uid = unpack_modseq_key(key)
            if box != mailbox_id:
                break
            if len(out) == limit:
                return None
            out.append(uid)
    return out


def brought_up(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, old: Listing, modseq: int,
               exists: int) -> Listing | None:
    """`old` moved to `modseq`, or None when the changes are too many or do not add up."""
    limit = max(64, len(old.uids) // 8)
    changed = _uids_after(txn, shard.db["modseqs"], mailbox_id, old.modseq, limit)
    expunged = _uids_after(txn, shard.db["expunged"], mailbox_id, old.modseq, limit)
    if changed is None or expunged is None:
        return None
    uids, bits, modseqs, keywords = array("I", old.uids), bytearray(old.bits), array("Q", old.modseqs), \
        dict(old.keywords)
    gone = set(expunged)
    flags_db = shard.db["flags"]
    for uid in sorted(set(changed)):
        raw = txn.get(uid_key(mailbox_id, uid), db=flags_db)
        if raw is None:
            gone.add(uid)
            continue
        i = bisect_left(uids, uid)
        if i < len(uids) and uids[i] == uid:
            bits[i] = raw[8]
            modseqs[i] = int.from_bytes(raw[:8], "big")
        elif i == len(uids):
            uids.append(uid)
            bits.append(raw[8])
            modseqs.append(int.from_bytes(raw[:8], "big"))
        else:
            return None  # a UID below the highest that the listing never had: read again
        if len(raw) > ENTRY_HEAD:
            keywords[uid] = bytes(raw[ENTRY_HEAD:])
        else:
            keywords.pop(uid, None)
    if gone:
        keep = [i for i, uid in enumerate(uids) if uid not in gone]
        if len(keep) != len(uids):
            uids = array("I", (uids[i] for i in keep))
            bits = bytearray(bits[i] for i in keep)
            modseqs = array("Q", (modseqs[i] for i in keep))
        for uid in gone:
            keywords.pop(uid, None)
    if len(uids) != exists:
        return None
    return Listing(modseq, uids, bits, modseqs, keywords)


class Listings:
    """The listings of the mailboxes this process selected lately (thread-safe: store
    calls run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[str, int], Listing] = OrderedDict()
        self._messages = 0

    def get(self, txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int, modseq: int,
            exists: int) -> Listing:
        key = (account, mailbox_id)
        with self._lock:
            old = self._kept.get(key)
        if old is not None and old.modseq == modseq:
            listing = old
        else:
            listing = None
            if old is not None and old.modseq < modseq:
                listing = brought_up(txn, shard, mailbox_id, old, modseq, exists)
            if listing is None:
                listing = read_whole(txn, shard, mailbox_id, modseq)
        with self._lock:
            current = self._kept.pop(key, None)
            if current is not None:
                self._messages -= len(current.uids)
            if current is not None and current.modseq > listing.modseq:
                listing_kept = current  # another thread read a newer state meanwhile
            else:
                listing_kept = listing
            self._kept[key] = listing_kept
            self._messages += len(listing_kept.uids)
            while self._kept and (len(self._kept) > MAX_MAILBOXES or self._messages > MAX_MESSAGES):
                _, dropped = self._kept.popitem(last=False)
                self._messages -= len(dropped.uids)
        return listing
