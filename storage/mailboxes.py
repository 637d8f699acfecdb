"""Mailboxes of an account, inside a shard's write or read transaction.

A mailbox's id is its UIDVALIDITY: a per-shard counter that starts from the clock and only
ever grows, so a mailbox deleted and created again never gets its old UIDVALIDITY back, and
its directory (named by the id) is never reused. Renames (with children) change only the
index: no message file moves. A new account gets INBOX, Sent, Drafts, Junk, Trash and
Archive with their RFC 6154 special-use attributes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import lmdb

from storage import fts, messages, metadata, objectid, recent, urlauth
from storage.errors import MailboxError, MailboxExistsError, MailboxLimitError, MailboxNameError, MailboxNotFoundError
from storage.names import DEFAULT_MAILBOXES, SPECIAL_USE, is_inside, normalize_name, parents
from storage.records import (
    MailboxRecord,
    MessageFile,
    Usage,
    account_exists,
    add_usage,
    decode,
    get_mailbox,
    put_mailbox,
    put_usage,
)
from storage.shard import Batch, Shard, pack_u32, uid_key, unpack_u32
from storage.unsettled import note_dir

INBOX = "INBOX"


@dataclass(frozen=True)
class Mailbox:
    id: int  # also the UIDVALIDITY
    account: str
    name: str
    uidnext: int
    highestmodseq: int
    exists: int
    unseen: int
    size: int
    special_use: str | None
    keywords: tuple[str, ...] = ()
    expunged_floor: int = 0  # the expunge history is exact for MODSEQs from here (storage/vanished.py)
    subscribed: bool = False
    children: bool = field(default=False, compare=False)
    recent_upto: int = field(default=0, compare=False)  # the \Recent claim (storage/recent.py)

    @property
    def uidvalidity(self) -> int:
        return self.id

    @property
    def object_id(self) -> str:
        """RFC 8474 MAILBOXID (storage/objectid.py)."""
        return objectid.mailbox_id(self.account, self.id)


MAX_KEY_BYTES = 500  # LMDB refuses keys over 511 bytes
MAX_MAILBOXES = 10_000  # per account: a bound on what one user can make every LIST walk


def name_key(account: str, name: str) -> bytes:
    key = f"{account}\0{name}".encode("utf-8", "surrogateescape")
    if len(key) > MAX_KEY_BYTES:
        raise MailboxNameError(f"mailbox name too long ({len(name.encode())} bytes in UTF-8)")
    return key


def find(txn: lmdb.Transaction, shard: Shard, account: str, name: str) -> tuple[int, MailboxRecord]:
    """(id, state) of a mailbox by name, or MailboxNotFoundError."""
    normalized = normalize_name(name)
    raw = txn.get(name_key(account, normalized), db=shard.db["names"])
    if raw is None:
        raise MailboxNotFoundError(f"no mailbox {normalized!r}")
    mailbox_id = unpack_u32(raw)
    return mailbox_id, get_mailbox(txn, shard, mailbox_id)


def to_mailbox(mailbox_id: int, state: MailboxRecord, subscribed: bool = False, children: bool = False) -> Mailbox:
    return Mailbox(
        id=mailbox_id, account=state.account, name=state.name, uidnext=state.uidnext,
        highestmodseq=state.modseq, exists=state.exists, unseen=state.unseen, size=state.size,
        special_use=state.special_use, keywords=tuple(state.keywords), expunged_floor=state.expunged_floor,
        subscribed=subscribed, children=children, recent_upto=recent.claimed(state),
    )


def ensure_account(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str) -> None:
    """Create the account's record and default mailboxes on first use."""
    if account_exists(txn, shard, account):
        return
    put_usage(txn, shard, account, Usage())
    for name, special_use in DEFAULT_MAILBOXES:
        create(txn, shard, batch, account, name, special_use, subscribe=True)


def new_id(txn: lmdb.Transaction, shard: Shard) -> int:
    raw = txn.get(b"uidvalidity", db=shard.db["counters"])
    last = unpack_u32(raw) if raw is not None else 0
    value = max(int(time.time()), last + 1)
    if value >= 2**32:
        raise MailboxError("UIDVALIDITY space exhausted")
    txn.put(b"uidvalidity", pack_u32(value), db=shard.db["counters"])
    return value


def create(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, name: str,
           special_use: str | None = None, *, subscribe: bool = False) -> Mailbox:
    name = normalize_name(name)
    if special_use is not None and special_use not in SPECIAL_USE:
        raise MailboxError(f"unknown special-use attribute {special_use!r}")
    _claim_name(txn, shard, batch, account, name)
    mailbox = _create_one(txn, shard, batch, account, name, special_use)
    if subscribe:
        txn.put(name_key(account, name), b"", db=shard.db["subs"])
    return mailbox


def _claim_name(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, name: str) -> None:
    """Make sure `name` is free, and create the superior mailboxes it needs (RFC 3501
    §6.3.3: superior names a client did not create are created with it)."""
    if txn.get(name_key(account, name), db=shard.db["names"]) is not None:
        raise MailboxExistsError(f"mailbox {name!r} already exists")
    if _count_names(txn, shard, account, MAX_MAILBOXES) >= MAX_MAILBOXES:
        raise MailboxLimitError(f"an account has at most {MAX_MAILBOXES} mailboxes")
    for parent in parents(name):
        if txn.get(name_key(account, parent), db=shard.db["names"]) is None:
            _create_one(txn, shard, batch, account, parent, None)


def _create_one(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, name: str,
                special_use: str | None) -> Mailbox:
    mailbox_id = new_id(txn, shard)
    state = MailboxRecord(account=account, name=name, special_use=special_use, recent_upto=0)
    put_mailbox(txn, shard, mailbox_id, state)
    txn.put(name_key(account, name), pack_u32(mailbox_id), db=shard.db["names"])
    note_dir(txn, shard, batch, account, mailbox_id)  # its directory is made after the commit
    return to_mailbox(mailbox_id, state)


def listing(txn: lmdb.Transaction, shard: Shard, account: str) -> list[Mailbox]:
    prefix = f"{account}\0".encode()
    names: list[tuple[str, int]] = []
    cursor = txn.cursor(db=shard.db["names"])
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            names.append((key[len(prefix):].decode(), unpack_u32(value)))
    subscribed = set(subscriptions(txn, shard, account))
    with_children = {parent for name, _ in names for parent in parents(name)}
    out = []
    for name, mailbox_id in names:
        has_children = name in with_children
        out.append(to_mailbox(mailbox_id, get_mailbox(txn, shard, mailbox_id), name in subscribed, has_children))
    return out


def _count_names(txn: lmdb.Transaction, shard: Shard, account: str, stop_at: int) -> int:
    prefix = f"{account}\0".encode()
    cursor = txn.cursor(db=shard.db["names"])
    count = 0
    if cursor.set_range(prefix):
        for key in cursor.iternext(values=False):
            if not key.startswith(prefix) or count >= stop_at:
                break
            count += 1
    return count


def subscriptions(txn: lmdb.Transaction, shard: Shard, account: str) -> list[str]:
    prefix = f"{account}\0".encode()
    cursor = txn.cursor(db=shard.db["subs"])
    out = []
    if cursor.set_range(prefix):
        for key in cursor.iternext(values=False):
            if not key.startswith(prefix):
                break
            out.append(key[len(prefix):].decode())
    return out


def set_subscribed(txn: lmdb.Transaction, shard: Shard, account: str, name: str, on: bool) -> None:
    # RFC 3501 §6.3.6: subscribing to a name that does not exist (yet) is allowed.
    key = name_key(account, normalize_name(name))
    if on:
        txn.put(key, b"", db=shard.db["subs"])
    else:
        txn.delete(key, db=shard.db["subs"])


def delete(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, name: str) -> None:
    mailbox_id, state = find(txn, shard, account, name)
    if state.name == INBOX:
        raise MailboxError("INBOX cannot be deleted")
    if any(is_inside(other.name, state.name) for other in listing(txn, shard, account)):
        raise MailboxError(f"mailbox {state.name!r} has children: delete them first")
    drop_messages(txn, shard, mailbox_id)
    metadata.drop(txn, shard, account, mailbox_id)  # RFC 5464 §4.1: not inherited by a new namesake
    urlauth.drop(txn, shard, account, mailbox_id)
    add_usage(txn, shard, account, -state.size, -state.exists)
    txn.delete(pack_u32(mailbox_id), db=shard.db["mailboxes"])
    txn.delete(name_key(account, state.name), db=shard.db["names"])
    note_dir(txn, shard, batch, account, mailbox_id)  # its directory goes after the commit


def rename(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, old: str, new: str) -> None:
    old_id, old_state = find(txn, shard, account, old)
    new = normalize_name(new)
    if old_state.name == INBOX:
        _rename_inbox(txn, shard, batch, account, old_id, old_state, new)
        return
    if new == old_state.name or is_inside(new, old_state.name):
        raise MailboxError(f"cannot rename {old_state.name!r} into itself")
    _claim_name(txn, shard, batch, account, new)
    moving = [(m.id, m.name) for m in listing(txn, shard, account)
              if m.name == old_state.name or is_inside(m.name, old_state.name)]
    for mailbox_id, name in moving:
        renamed = new + name[len(old_state.name):]
        state = get_mailbox(txn, shard, mailbox_id)
        state.name = renamed
        put_mailbox(txn, shard, mailbox_id, state)
        txn.delete(name_key(account, name), db=shard.db["names"])
        txn.put(name_key(account, renamed), pack_u32(mailbox_id), db=shard.db["names"])
        if txn.delete(name_key(account, name), db=shard.db["subs"]):
            txn.put(name_key(account, renamed), b"", db=shard.db["subs"])
        note_dir(txn, shard, batch, account, mailbox_id)  # postroom.json names it, after the commit


def _rename_inbox(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, inbox_id: int,
                  inbox: MailboxRecord, new: str) -> None:
    """RFC 3501 §6.3.5: renaming INBOX moves all its messages to a new mailbox of that name
    and leaves INBOX empty (its children, if any, stay where they are)."""
    if txn.get(name_key(account, new), db=shard.db["names"]) is not None:
        raise MailboxExistsError(f"mailbox {new!r} already exists")
    if new == INBOX or is_inside(new, INBOX):
        raise MailboxError("INBOX cannot be renamed into itself")
    target = create(txn, shard, batch, account, new)
    metadata.copy(txn, shard, account, inbox_id, target.id)  # RFC 5464 §4.1: both keep them
    target_state = get_mailbox(txn, shard, target.id)
    messages.copy(txn, shard, batch, account, (inbox_id, inbox), messages.ALL, (target.id, target_state),
                  move=True, quota=messages.NO_QUOTA)


def drop_messages(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> None:
    """Every record of the mailbox's messages, gone from the index (its files go when its
    directory does): for a deleted mailbox, and for `store rebuild`."""
    for base in _bases_of(txn, shard, mailbox_id):
        txn.delete(base, db=shard.db["bases"])
    low, high = uid_key(mailbox_id, 0), uid_key(mailbox_id + 1, 0)
    for db_name in ("flags", "msgs", "modseqs", "expunged", "unseen"):
        _delete_range(txn, shard.db[db_name], low, high)
    fts.delete_mailbox(txn, shard, mailbox_id)


def _delete_range(txn: lmdb.Transaction, db, low: bytes, high: bytes) -> None:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(low):
        return
    while cursor.key() and cursor.key() < high:
        if not cursor.delete():
            break


def _bases_of(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> list[bytes]:
    out = []
    box = pack_u32(mailbox_id)
    cursor = txn.cursor(db=shard.db["msgs"])
    if cursor.set_range(uid_key(mailbox_id, 0)):
        for key, value in cursor:
            if key[:4] != box:
                break
            out.append(decode(value, MessageFile).base.encode())
    return out
