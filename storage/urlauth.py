"""URLAUTH access keys (RFC 4467 §7): one secret per user and mailbox, in a shard's index.

    urlauth   account \\0 id   -> 32 random octets, the mailbox's access key

A URLAUTH-authorized URL carries an HMAC-SHA256 of itself keyed with the access key of the
mailbox it names (imapd/urlauth.py); whoever holds the URL may fetch what it names, and the
owner's RESETKEY (a new key, here: the key removed, a new one made at the next GENURLAUTH)
makes every URL made before useless.

A database of its own rather than `metadata`: an access key is a secret that GETMETADATA
must never show, nor count against the account's annotation limits, nor copy when INBOX is
renamed (RFC 5464 §4.1 has annotations follow). Keyed by the mailbox id, a key follows a
mailbox's renames (RFC 4467 names the mailbox in the URL, so a URL made before a rename
names nothing after it anyway) and is dropped with the mailbox: a mailbox created again
under the same name gets a new id, so a new key.
"""

from __future__ import annotations

import os

import lmdb

from storage.shard import Shard, pack_u32

KEY_SIZE = 32  # RFC 4467 §7: at least 128 bits; HMAC-SHA256 takes a key of its block's half


def _key(account: str, mailbox_id: int) -> bytes:
    return account.encode() + b"\0" + pack_u32(mailbox_id)


def get(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int) -> bytes | None:
    raw = txn.get(_key(account, mailbox_id), db=shard.db["urlauth"])
    return bytes(raw) if raw is not None else None


def ensure(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int) -> bytes:
    """The mailbox's key, made now if it has none."""
    key = get(txn, shard, account, mailbox_id)
    if key is None:
        key = os.urandom(KEY_SIZE)
        txn.put(_key(account, mailbox_id), key, db=shard.db["urlauth"])
    return key


def drop(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int | None) -> None:
    """The key of one mailbox, or (None) of every mailbox of the account, removed."""
    db = shard.db["urlauth"]
    if mailbox_id is not None:
        txn.delete(_key(account, mailbox_id), db=db)
        return
    prefix = account.encode() + b"\0"
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        while cursor.key() and bytes(cursor.key()).startswith(prefix):
            if not cursor.delete():
                break
