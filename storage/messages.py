"""Messages in a mailbox, inside a shard's transactions: insert, flags, expunge, copy, move,
and what changed since a MODSEQ (RFC 7162 CONDSTORE, and IDLE).

UIDs are handed out from the mailbox's `uidnext` in the same transaction that indexes the
message, once its file is durable in the writer's directory; the file reaches cur/, under a
name carrying that UID, only after the commit (storage/settle.py), so cur/ never holds a
UID the index could hand out again. Every change bumps the mailbox's MODSEQ once and stamps
the changed messages with it. Standard flags are mirrored into the file name after the
commit; the index stays the truth when the two disagree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import lmdb
import msgspec

from storage import fts, journal, maildir, objectid, vanished
from storage.errors import FlagError, QuotaExceededError, StoreError
from storage.mime import BodyPart, Envelope
from storage.records import (
    NO_DATE,
    Entry,
    MailboxRecord,
    MessageRecord,
    add_usage,
    decode_lazy,
    decode_envelope,
    decode_structure,
    encode,
    entry_flags,
    get_message,
    get_message_file,
    get_usage,
    pack_entry,
    put_mailbox,
    unpack_entry,
)
from storage.settle import locate
from storage.shard import Batch, Shard, link_or_copy, modseq_key, uid_key, unpack_modseq_key, unpack_uid_key
from storage.unsettled import note_dir, note_file

MAX_KEYWORD_CHARS = 64
MAX_KEYWORDS_PER_MAILBOX = 256
_KEYWORD_SPECIALS = set('(){ %*"\\]')
_SYSTEM_NAMES = {name.lower(): (name, bit) for name, bit in maildir.SYSTEM_FLAGS.items()}

UidRanges = Sequence[tuple[int, int]]
ALL: UidRanges = ((1, 2**32 - 1),)


def normalize_ranges(ranges: UidRanges) -> list[tuple[int, int]]:
    """IMAP allows "3:1" and overlapping sets ("1:3,2:3"): ascending, disjoint, within 1..2^32-1."""
    spans = sorted((max(1, min(a, b)), min(2**32 - 1, max(a, b))) for a, b in ranges)
    merged: list[tuple[int, int]] = []
    for low, high in spans:
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        elif low <= high:
            merged.append((low, high))
    return merged


class Quota(NamedTuple):
    """An account's limits; 0 is unlimited. RFC 9208's STORAGE and MESSAGE resources."""

    bytes: int = 0
    messages: int = 0


NO_QUOTA = Quota()


class FlagState(NamedTuple):
    """A message's flags and MODSEQ. A tuple, not a dataclass: FETCH 1:* (FLAGS) makes one
    per message, and a tuple is made several times faster."""

    uid: int
    modseq: int
    flags: tuple[str, ...]


class MessageInfo:
    """A message as FETCH sees it, from the index alone. Its bytes are read through the
    store (Store.open_message), which finds its file: no path is handed out.

    A class with slots, not a frozen dataclass: FETCH makes one per message, and a frozen
    dataclass's __init__ costs more than the record's decoding. The envelope and the MIME
    structure are decoded on first use (`envelope`, `structure`): FETCH FLAGS needs
    neither, FETCH ENVELOPE only the rendered `envelope_text` when the record has it."""

    __slots__ = ("account", "mailbox_id", "uid", "modseq", "flags", "internal_date", "size", "sent", "envelope_text",
                 "_envelope", "_envelope_raw", "_structure", "_structure_raw", "base", "stored_email_id", "saved",
                 "preview")

    def __init__(self, account: str, mailbox_id: int, uid: int, modseq: int, flags: tuple[str, ...],
                 internal_date: float, size: int, sent: float | None, envelope: Envelope | None,
                 structure: BodyPart | None = None, *, structure_json: bytes | None = None, base: str = "",
                 stored_email_id: str | None = None, saved: float | None = None, preview: str | None = None,
                 envelope_json: bytes | None = None, envelope_text: str | None = None):
        self.account = account
        self.mailbox_id = mailbox_id  # the mailbox's UIDVALIDITY
        self.uid = uid
        self.modseq = modseq
        self.flags = flags
        self.internal_date = internal_date
        self.size = size
        self.sent = sent
        self._envelope = envelope
        self._envelope_raw = envelope_json
        self.envelope_text = envelope_text  # FETCH ENVELOPE's answer, when the record has it
        self._structure = structure
        self._structure_raw = structure_json
        self.base = base  # its file's unique base (storage/maildir.py)
        self.stored_email_id = stored_email_id  # the original's EMAILID, for a copy (storage/objectid.py)
        self.saved = saved  # RFC 8514 SAVEDATE, seconds (the internal date in old records)
        self.preview = preview  # RFC 8970 PREVIEW; None until made (Store.preview)

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
            self._envelope = decode_envelope(self._envelope_raw)
        return self._envelope

    @property
    def structure(self) -> BodyPart:
        if self._structure is None:
            self._structure = decode_structure(self._structure_raw)
        return self._structure

    @property
    def email_id(self) -> str:
        """RFC 8474 EMAILID; made on demand: most FETCHes never ask for it."""
        return objectid.email_id(self.stored_email_id, self.base)

    def _fields(self) -> tuple:
        return (self.account, self.mailbox_id, self.uid, self.modseq, self.flags, self.internal_date, self.size,
                self.sent, self.envelope, self.structure, self.base, self.stored_email_id, self.saved, self.preview)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessageInfo) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment] - mutable (the structure is filled in lazily)

    def __repr__(self) -> str:
        return f"MessageInfo({self.account!r}, {self.mailbox_id}, uid={self.uid}, modseq={self.modseq})"


def sent_seconds(record: MessageRecord) -> int:
    """The Date: header's own calendar day (as midnight seconds), for SENT* searches."""
    return record.sent_day * 86400 if record.sent_day is not None else NO_DATE


def flag_names(bits: int, keywords: Iterable[str]) -> tuple[str, ...]:
    return _system_names(bits) + tuple(keywords)


@lru_cache(maxsize=64)
def _system_names(bits: int) -> tuple[str, ...]:
    return tuple(name for name, bit in maildir.SYSTEM_FLAGS.items() if bits & bit)


def parse_flags(flags: Iterable[str]) -> tuple[int, tuple[str, ...]]:
    """(system flag bits, keywords) of client-given flags; FlagError for what is not allowed."""
    bits = 0
    keywords: dict[str, None] = {}
    for flag in flags:
        if flag.startswith("\\"):
            known = _SYSTEM_NAMES.get(flag.lower())
            if known is None:
                raise FlagError(f"{flag} cannot be set")  # \Recent is the server's, others unknown
            bits |= known[1]
            continue
        if (not flag or len(flag) > MAX_KEYWORD_CHARS or not flag.isascii() or not flag.isprintable()
                or any(c in _KEYWORD_SPECIALS for c in flag)):
            raise FlagError(f"invalid keyword {flag!r}")
        keywords.setdefault(flag, None)
    return bits, tuple(keywords)


def entries(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, ranges: UidRanges = ALL
            ) -> Iterator[tuple[int, Entry]]:
    """(UID, Entry) of every message within the UID ranges, ascending."""
    cursor = txn.cursor(db=shard.db["flags"])
    for low, high in sorted(ranges):
        if not cursor.set_range(uid_key(mailbox_id, max(low, 1))):
            return
        for key, value in cursor:
            box, uid = unpack_uid_key(key)
            if box != mailbox_id or uid > high:
                break
            yield uid, unpack_entry(value)


def put_entry(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int, entry: Entry) -> None:
    """Write a message's record, keeping the index of unseen messages in step."""
    key = uid_key(mailbox_id, uid)
    txn.put(key, pack_entry(entry), db=shard.db["flags"])
    if entry.bits & maildir.SEEN:
        txn.delete(key, db=shard.db["unseen"])
    else:
        txn.put(key, b"", db=shard.db["unseen"])


def delete_entry(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int) -> None:
    key = uid_key(mailbox_id, uid)
    txn.delete(key, db=shard.db["flags"])
    txn.delete(key, db=shard.db["unseen"])


def unseen_uids(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> list[int]:
    cursor = txn.cursor(db=shard.db["unseen"])
    out = []
    if cursor.set_range(uid_key(mailbox_id, 1)):
        for key in cursor.iternext(values=False):
            box, uid = unpack_uid_key(key)
            if box != mailbox_id:
                break
            out.append(uid)
    return out


def all_uids(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> list[int]:
    cursor = txn.cursor(db=shard.db["flags"])
    out = []
    if cursor.set_range(uid_key(mailbox_id, 1)):
        prefix = uid_key(mailbox_id, 0)[:4]
        for key in cursor.iternext(values=False):
            if key[:4] != prefix:
                break
            out.append(int.from_bytes(key[4:8], "big"))
    return out


def flag_states(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, ranges: UidRanges = ALL) -> list[FlagState]:
    """FlagState of every message within the ranges, ascending: entries() unrolled, as a
    listing of every message's flags (FETCH 1:* (FLAGS), STORE's answer) is made of it."""
    out: list[FlagState] = []
    append = out.append
    cursor = txn.cursor(db=shard.db["flags"])
    prefix = uid_key(mailbox_id, 0)[:4]
    for low, high in sorted(ranges):
        if not cursor.set_range(uid_key(mailbox_id, max(low, 1))):
            break
        for key, value in cursor:
            uid = int.from_bytes(key[4:8], "big")
            if key[:4] != prefix or uid > high:
                break
            modseq, bits, keywords = entry_flags(value)
            append(FlagState(uid, modseq, flag_names_stored(bits, keywords)))
    return out


@lru_cache(maxsize=1024)
def flag_names_stored(bits: int, keywords: bytes) -> tuple[str, ...]:
    """flag_names from an Entry's stored keywords (cached: a mailbox has few distinct flag
    sets)."""
    return _system_names(bits) + (tuple(keywords.decode().split(" ")) if keywords else ())


def message_path(shard: Shard, account: str, mailbox_id: int, base: str, uid: int, size: int, bits: int) -> Path:
    return shard.mailbox_dir(account, mailbox_id) / "cur" / maildir.file_name(base, uid, size, bits)


def find_file(shard: Shard, expected: Path, base: str) -> Path | None:
    """The message file: at its expected name, or still in its writer's directory (committed
    a moment ago), or under another flags suffix (renamed by another process meanwhile)."""
    for _ in range(3):  # a rename between two looks: look again
        found = locate(shard.tmp_root, expected.parent.parent, base, expected)
        if found is not None:
            return found
    return None


def expected_file(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int, uid: int
                  ) -> tuple[str, str] | None:
    """(where the message's file is once settled, its base), from the index; None once the
    message is expunged. A string, not a Path: FETCH BODY[] opens one per message, and
    pathlib would cost more than the open (find_file looks elsewhere when it is not there)."""
    found = get_message_file(txn, shard, mailbox_id, uid)
    raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["flags"])
    if found is None or raw is None:
        return None
    name = maildir.file_name(found.base, uid, found.size, unpack_entry(raw).bits)
    return f"{shard.path}/{account}/{mailbox_id}/cur/{name}", found.base


def fetch(txn: lmdb.Transaction, shard: Shard, account: str, mailbox_id: int, ranges: UidRanges) -> list[MessageInfo]:
    """MessageInfo of every message within the ranges, ascending. One cursor walk over the
    flag records and one get of each message record: this is FETCH's inner loop."""
    out = []
    append = out.append
    get = txn.get
    msgs = shard.db["msgs"]
    for uid, e in entries(txn, shard, mailbox_id, ranges):
        raw = get(uid_key(mailbox_id, uid), db=msgs)
        if raw is None:
            continue  # expunged between the two reads of one snapshot: cannot happen, but no KeyError
        record = decode_lazy(raw)
        structure, env = record.structure, record.envelope
        lazy = isinstance(structure, msgspec.Raw)  # not when decode_lazy fell back to the whole record
        append(MessageInfo(account, mailbox_id, uid, e.modseq, flag_names(e.bits, e.keywords),
                           record.internal_date, record.size, record.sent, None if lazy else env,
                           None if lazy else structure, structure_json=structure if lazy else None,
                           base=record.base, stored_email_id=record.email_id,
                           saved=record.saved if record.saved is not None else record.internal_date,
                           preview=record.preview, envelope_json=env if lazy else None,
                           envelope_text=record.envelope_text))
    return out


def insert(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, mailbox_id: int, state: MailboxRecord,
           *, source: Path | None, record: MessageRecord, bits: int, keywords: tuple[str, ...], quota: Quota,
           texts: dict[str, str] | bytes | None = None, link: bool = False, encoded: bytes | None = None) -> int:
    """Index a durable file (in the shard's writer directory as `record.base`, or elsewhere
    to be linked with link=True or moved there) as a new message; its UID. No `source`: the
    caller has the file made (a journaled message's, Batch.place).
    The `encoded` record and compressed `texts` may come prepared, so that the shard's
    committer, which every delivery waits for, does as little as possible."""
    base, size = record.base, record.size
    if quota.bytes or quota.messages:
        usage = get_usage(txn, shard, account)
        if quota.bytes and usage.used + size > quota.bytes:
            raise QuotaExceededError(f"mailbox full: quota of {quota.bytes} bytes would be exceeded")
        if quota.messages and usage.messages + 1 > quota.messages:
            raise QuotaExceededError(f"mailbox full: quota of {quota.messages} messages reached")
    _remember_keywords(state, keywords)
    if state.recent_upto is None:
        # A mailbox from before \Recent claims were kept (storage/recent.py): what it held
        # counts as seen, and this message is the first recent one.
        state.recent_upto = state.uidnext - 1
    uid = state.uidnext
    modseq = state.modseq + 1
    state.uidnext, state.modseq, state.exists, state.size = uid + 1, modseq, state.exists + 1, state.size + size
    state.unseen += 0 if bits & maildir.SEEN else 1
    put_mailbox(txn, shard, mailbox_id, state)
    add_usage(txn, shard, account, size, 1)
    entry = Entry(modseq, bits, size, int(record.internal_date), sent_seconds(record), keywords)
    put_entry(txn, shard, mailbox_id, uid, entry)
    txn.put(uid_key(mailbox_id, uid), encoded or encode(record), db=shard.db["msgs"])
    txn.put(modseq_key(mailbox_id, modseq, uid), b"", db=shard.db["modseqs"])
    txn.put(base.encode(), uid_key(mailbox_id, uid), db=shard.db["bases"])
    if texts is not None:
        fts.store_texts(txn, shard, mailbox_id, uid, texts)
    if source is None:
        return uid
    # The file waits in the writer's directory, durable, and reaches cur/ after the commit.
    waiting = shard.writer.path / base
    if link:
        link_or_copy(source, waiting)
        batch.undo(lambda: os.unlink(waiting))
    elif source != waiting:
        os.rename(source, waiting)
        batch.undo(lambda: os.rename(waiting, source))
    batch.sync_dirs.add(waiting.parent)
    note_file(txn, shard, batch, account, mailbox_id, base, waiting)
    return uid


def _remember_keywords(state: MailboxRecord, keywords: tuple[str, ...]) -> None:
    known = state.keywords
    for keyword in keywords:
        if keyword not in known:
            if len(known) >= MAX_KEYWORDS_PER_MAILBOX:
                raise FlagError(f"too many distinct keywords in this mailbox (limit {MAX_KEYWORDS_PER_MAILBOX})")
            known.append(keyword)


def store_flags(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, mailbox_id: int, state: MailboxRecord,
                ranges: UidRanges, mode: str, bits: int, keywords: tuple[str, ...],
                unchanged_since: int | None = None) -> tuple[list[FlagState], list[int]]:
    """Set ("set"), add ("add") or remove ("remove") flags. Returns (changed, modified): the
    new state of each changed message, and the UIDs refused because they changed after
    `unchanged_since` (RFC 7162 §3.1.3)."""
    if mode not in ("set", "add", "remove"):
        raise ValueError(mode)
    if mode != "remove":
        _remember_keywords(state, keywords)
    modseq = state.modseq + 1
    changed: list[FlagState] = []
    modified: list[int] = []
    for uid, old in list(entries(txn, shard, mailbox_id, ranges)):
        old_modseq, old_bits, old_keywords = old.modseq, old.bits, old.keywords
        if unchanged_since is not None and old_modseq > unchanged_since:
            modified.append(uid)
            continue
        if mode == "set":
            new_bits, new_keywords = bits, keywords
        elif mode == "add":
            new_bits, new_keywords = old_bits | bits, old_keywords + tuple(k for k in keywords if k not in old_keywords)
        else:
            new_bits, new_keywords = old_bits & ~bits, tuple(k for k in old_keywords if k not in keywords)
        if new_bits == old_bits and set(new_keywords) == set(old_keywords):
            continue
        new = old._replace(modseq=modseq, bits=new_bits, keywords=new_keywords)
        put_entry(txn, shard, mailbox_id, uid, new)
        txn.delete(modseq_key(mailbox_id, old_modseq, uid), db=shard.db["modseqs"])
        txn.put(modseq_key(mailbox_id, modseq, uid), b"", db=shard.db["modseqs"])
        state.unseen += (1 if old_bits & maildir.SEEN else 0) - (1 if new_bits & maildir.SEEN else 0)
        changed.append(FlagState(uid, modseq, flag_names(new_bits, new_keywords)))
        if new_bits != old_bits:  # the file's name mirrors them, after the commit
            file = get_message_file(txn, shard, mailbox_id, uid)
            note_file(txn, shard, batch, account, mailbox_id, file.base,
                      message_path(shard, account, mailbox_id, file.base, uid, file.size, old_bits))
    if changed:
        state.modseq = modseq
        put_mailbox(txn, shard, mailbox_id, state)
    return changed, modified


def expunge(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str, mailbox_id: int, state: MailboxRecord,
            ranges: UidRanges = ALL, *, only_deleted: bool = True) -> list[int]:
    """Remove messages (those flagged \\Deleted, within `ranges`); the UIDs removed."""
    doomed = [(uid, e.modseq, e.bits) for uid, e in entries(txn, shard, mailbox_id, ranges)
              if e.bits & maildir.DELETED or not only_deleted]
    if not doomed:
        return []
    modseq = state.modseq + 1
    freed = 0
    for uid, old_modseq, bits in doomed:
        key = uid_key(mailbox_id, uid)
        file = get_message_file(txn, shard, mailbox_id, uid)
        delete_entry(txn, shard, mailbox_id, uid)
        txn.delete(key, db=shard.db["msgs"])
        txn.delete(modseq_key(mailbox_id, old_modseq, uid), db=shard.db["modseqs"])
        txn.delete(file.base.encode(), db=shard.db["bases"])
        fts.remove_texts(txn, shard, mailbox_id, uid)
        vanished.record(txn, shard, mailbox_id, state, modseq, uid, file.base)
        freed += file.size
        state.unseen -= 0 if bits & maildir.SEEN else 1
        note_file(txn, shard, batch, account, mailbox_id, file.base,
                  message_path(shard, account, mailbox_id, file.base, uid, file.size, bits))
    state.modseq, state.exists, state.size = modseq, state.exists - len(doomed), state.size - freed
    vanished.prune(txn, shard, mailbox_id, state)
    put_mailbox(txn, shard, mailbox_id, state)
    add_usage(txn, shard, account, -freed, -len(doomed))
    # Expunging the newest UIDs is what could let a rebuild from files hand them out again:
    # the mailbox's postroom.json records how far UIDs went (written when it settles).
    note_dir(txn, shard, batch, account, mailbox_id)
    return [uid for uid, _, _ in doomed]


def copy(txn: lmdb.Transaction, shard: Shard, batch: Batch, account: str,
         source: tuple[int, MailboxRecord], ranges: UidRanges, target: tuple[int, MailboxRecord], *,
         move: bool, quota: Quota) -> list[tuple[int, int]]:
    """Copy (a new link per message) or move (the same file, a new UID) into `target`;
    returns (source UID, target UID) pairs for COPYUID (RFC 4315)."""
    (source_id, source_state), (target_id, target_state) = source, target
    pairs = []
    items = list(entries(txn, shard, source_id, ranges))
    for uid, e in items:
        bits, keywords = e.bits, e.keywords
        record = get_message(txn, shard, source_id, uid)
        new_record = msgspec.structs.replace(record, base=maildir.new_base(),
                                             email_id=objectid.email_id(record.email_id, record.base),
                                             saved=time.time())  # RFC 8514: saved here, now
        old_path = find_file(shard, message_path(shard, account, source_id, record.base, uid, record.size, bits),
                             record.base)
        # No file yet (just committed, or its process could not make it: storage/shard.py
        # _place_committed): the journal's bytes, and the copy's file made as a delivery's
        # is (Batch.place).
        held = journal.held(txn, shard, record.base) if old_path is None else None
        if old_path is None and held is None:
            raise StoreError(f"message file of UID {uid} is missing: run 'postroom store check'")
        new_uid = insert(txn, shard, batch, account, target_id, target_state, source=old_path, record=new_record,
                         bits=bits, keywords=keywords, quota=NO_QUOTA if move else quota,
                         texts=_raw_texts(txn, shard, source_id, uid), link=True)
        journaled = journal.copy(txn, shard, record.base, new_record.base)  # a link shares unflushed bytes
        if held is not None:
            name = maildir.file_name(new_record.base, new_uid, record.size, bits)
            batch.place(shard.mailbox_dir(account, target_id) / "cur" / name, held, record.internal_date, journaled)
        elif journaled is not None:
            batch.journaled.append(journaled)
        pairs.append((uid, new_uid))
    if move and pairs:
        moved = {uid for uid, _ in pairs}
        # A move adds the size to the target and takes it from the source: usage is unchanged,
        # which is why insert did not check the quota for it.
        expunge(txn, shard, batch, account, source_id, source_state,
                [(uid, uid) for uid in sorted(moved)], only_deleted=False)
    return pairs


def _raw_texts(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int) -> bytes | None:
    raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["texts"])
    return bytes(raw) if raw is not None else None


def changes_since(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, modseq: int
                  ) -> tuple[list[FlagState], list[int]]:
    """(messages whose MODSEQ is above `modseq`, UIDs expunged after it)."""
    changed = []
    for uid in sorted(_uids_after(txn, shard.db["modseqs"], mailbox_id, modseq)):
        raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["flags"])
        if raw is not None:
            e = unpack_entry(raw)
            changed.append(FlagState(uid, e.modseq, flag_names(e.bits, e.keywords)))
    return changed, sorted(_uids_after(txn, shard.db["expunged"], mailbox_id, modseq))


def _uids_after(txn: lmdb.Transaction, db, mailbox_id: int, modseq: int) -> list[int]:
    """UIDs keyed (mailbox, modseq, uid) in `db` with a MODSEQ above `modseq`."""
    out = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(modseq_key(mailbox_id, modseq + 1, 0)):
        for key in cursor.iternext(values=False):
            box, _, uid = unpack_modseq_key(key)
            if box != mailbox_id:
                break
            out.append(uid)
    return out
