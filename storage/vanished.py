"""The expunge history of a mailbox: which UIDs were expunged at which MODSEQ, so that a
client that last saw MODSEQ m learns what vanished since (RFC 7162 §3.2.5 QRESYNC, §3.2.6
UID FETCH ... VANISHED, and every session's own sync after a command).

The `expunged` database holds (mailbox id, MODSEQ, UID) -> file base, one key an expunged
message. It is bounded: past MAX_HISTORY keys a mailbox forgets its oldest ones, and its
record's `expunged_floor` says up to which MODSEQ it forgot. The history answers exactly
for any MODSEQ at or above the floor (keys above m are all there); below it, `since`
answers None and the caller falls back to what it knows (the UIDs it was told of, or the
client's known UIDs and sequence match data), which RFC 7162 §3.2.5.2 allows: a server
may report UIDs that vanished earlier than the client asked, never miss one.

An index written before the floor existed has floor 0 and a count of 0 for keys already
there: those are the oldest, so pruning (oldest first) reaches them first.
"""

from __future__ import annotations

import lmdb

from storage.records import MailboxRecord
from storage.shard import Shard, modseq_key, unpack_modseq_key

MAX_HISTORY = 20_000  # expunged UIDs remembered per mailbox (about 60 bytes each in the index)


def record(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, state: MailboxRecord, modseq: int, uid: int,
           base: str) -> None:
    """Remember that `uid` vanished at `modseq`; the caller writes `state` afterwards."""
    txn.put(modseq_key(mailbox_id, modseq, uid), base.encode(), db=shard.db["expunged"])
    state.expunged_count += 1


def prune(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, state: MailboxRecord) -> None:
    """Forget the oldest keys past MAX_HISTORY, raising the floor to the last MODSEQ
    forgotten; the caller writes `state` afterwards."""
    excess = state.expunged_count - MAX_HISTORY
    if excess <= 0:
        return
    cursor = txn.cursor(db=shard.db["expunged"])
    found = cursor.set_range(modseq_key(mailbox_id, 0, 0))
    while excess > 0:
        key = cursor.key() if found else b""
        if not key or unpack_modseq_key(key)[0] != mailbox_id:
            state.expunged_count = 0  # fewer keys than counted: none is left
            return
        state.expunged_floor = max(state.expunged_floor, unpack_modseq_key(key)[1])
        excess -= 1
        state.expunged_count -= 1
        found = cursor.delete()


def since(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, state: MailboxRecord, modseq: int
          ) -> list[tuple[int, int]] | None:
    """(MODSEQ, UID) of every message expunged after `modseq`, ascending by MODSEQ; None
    when the history no longer reaches back that far."""
    if modseq < state.expunged_floor:
        return None
    out = []
    cursor = txn.cursor(db=shard.db["expunged"])
    if cursor.set_range(modseq_key(mailbox_id, modseq + 1, 0)):
        for key in cursor.iternext(values=False):
            box, at, uid = unpack_modseq_key(key)
            if box != mailbox_id:
                break
            out.append((at, uid))
    return out
