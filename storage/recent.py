"""The \\Recent claim of a mailbox (RFC 3501 §2.3.2), kept in its index record.

A message is recent in exactly one session: the first to see it. The claim is the highest
UID some session has seen (MailboxRecord.recent_upto); a session that opens the mailbox
read-write takes every UID above it up to what it sees, in one write transaction, so two
sessions never take the same message, whichever process they run in. It lives in the index,
so it survives restarts: mail that arrives while no session has the mailbox open is recent
for the first one that opens it, today or after a restart. A mailbox's id is its
UIDVALIDITY, so a mailbox made again starts without a claim; COPY and MOVE give new UIDs in
the target, recent for its next session.

An index written before the claim was kept has no claim: everything already there counts as
seen (nobody can tell what the sessions of that time saw), and new mail is recent.
"""

from __future__ import annotations

import lmdb

from storage.records import MailboxRecord, get_mailbox, put_mailbox
from storage.shard import Shard, uid_key, unpack_uid_key


def claimed(state: MailboxRecord) -> int:
    """The highest UID some session has seen."""
    return state.recent_upto if state.recent_upto is not None else state.uidnext - 1


def claim(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int, upto: int) -> int:
    """Take the UIDs up to `upto` that nobody has seen: returns the claim before, so the
    caller's are those above it (and up to `upto`). A deleted mailbox gives `upto`: nothing."""
    state = get_mailbox(txn, shard, mailbox_id)
    if state is None or state.account != account:
        return upto
    before = claimed(state)
    if upto > before or state.recent_upto is None:
        state.recent_upto = max(before, upto)
        put_mailbox(txn, shard, mailbox_id, state)
    return before


def count(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, state: MailboxRecord) -> int:
    """How many of the mailbox's messages nobody has seen yet (STATUS RECENT): those above
    the claim that are still there, expunged ones not counted."""
    cursor = txn.cursor(db=shard.db["flags"])
    total = 0
    if cursor.set_range(uid_key(mailbox_id, claimed(state) + 1)):
        for key in cursor.iternext(values=False):
            if unpack_uid_key(key)[0] != mailbox_id:
                break
            total += 1
    return total
