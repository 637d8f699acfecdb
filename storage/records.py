"""The records of a shard's index (storage/shard.py lists its databases), as named types,
and the reading and writing of the mailbox, account and message records.

A message's `flags` record (Entry) is fixed-size binary: SELECT, FETCH FLAGS and SEARCH by
flag, date or size read nothing else. The other records are JSON, encoded and decoded by
msgspec straight into these types (several times faster than json plus dicts, which FETCH
ENVELOPE over a big mailbox feels). In the code every field has a name; the stored keys are
those the index has always used ("d", "s", "e", "x"...: `field(name=...)`), so an index
written before these types opens as it is, and the records stay small.

Strings reach the index from headers of any quality: one carrying a lone surrogate (a
broken RFC 2047 word in UTF-7) is written as JSON escapes, which msgspec will not read
back; such a record is read through the json module instead.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple, TypeVar

import lmdb
import msgspec

from storage.envelope_text import envelope_text
from storage.mime import BodyPart, Envelope, ParsedMessage
from storage.shard import Shard, pack_u32, uid_key

NO_DATE = -(2**63)
_ENTRY = struct.Struct(">QBIqq")  # modseq, flag bits, size, internal date, sent date (seconds, signed)
ENTRY_HEAD = _ENTRY.size  # the keywords follow, space-separated

Record = TypeVar("Record")


class Entry(NamedTuple):
    """A message's fixed-size record in the `flags` database: what SELECT, FETCH FLAGS and
    SEARCH by flag, date or size read, without decoding the cached envelope. A tuple: a
    SELECT of a big mailbox makes one per message."""

    modseq: int
    bits: int
    size: int
    internal_date: int  # seconds
    sent: int  # midnight (in seconds) of the Date: header's own day; NO_DATE without one
    keywords: tuple[str, ...]


def pack_entry(entry: Entry) -> bytes:
    head = _ENTRY.pack(entry.modseq, entry.bits, entry.size, entry.internal_date, entry.sent)
    return head + " ".join(entry.keywords).encode()


def unpack_entry(raw: bytes) -> Entry:
    modseq, bits, size, internal_date, sent = _ENTRY.unpack_from(raw)
    rest = bytes(raw[_ENTRY.size :])
    return Entry(modseq, bits, size, internal_date, sent, tuple(rest.decode().split(" ")) if rest else ())


def entry_flags(raw: bytes) -> tuple[int, int, bytes]:
    """(MODSEQ, flag bits, keywords as stored) of an Entry, without the rest: a flags
    listing of a big mailbox (FETCH 1:* (FLAGS)) reads nothing else."""
    return int.from_bytes(raw[:8], "big"), raw[8], bytes(raw[_ENTRY.size:])


class MessageRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A message's `msgs` record: its file and what FETCH answers without opening it."""

    base: str = msgspec.field(name="b")  # the unique part of its file name (storage/maildir.py)
    size: int = msgspec.field(name="s")  # bytes, exactly as stored
    internal_date: float = msgspec.field(name="d")  # seconds
    sent: float | None = msgspec.field(name="t", default=None)  # the Date: header, when it has a zone
    sent_day: int | None = msgspec.field(name="td", default=None)  # its own calendar day, days since 1970
    envelope: Envelope = msgspec.field(name="e")
    structure: BodyPart = msgspec.field(name="x")
    # RFC 8474 EMAILID, set on a copy or move to the original's (storage/objectid.py); None:
    # the message is its own original, its id is made from its file's unique base
    email_id: str | None = msgspec.field(name="ei", default=None)
    # RFC 8514 SAVEDATE: when it was saved into this mailbox (seconds); None in records
    # written before it was kept, which answer with the internal date
    saved: float | None = msgspec.field(name="sv", default=None)
    # RFC 8970 PREVIEW, made at delivery; None in records written before, until a FETCH
    # PREVIEW makes it (Store.preview)
    preview: str | None = msgspec.field(name="pv", default=None)
    # FETCH ENVELOPE's bytes, rendered once (storage/envelope_text.py); absent from records
    # written before it, which FETCH renders as it goes, until `store rebuild`.
    envelope_text: str | None = msgspec.field(name="et", default=None)

    @classmethod
    def of(cls, parsed: ParsedMessage, *, base: str, size: int, internal_date: float,
           saved: float | None = None) -> MessageRecord:
        return cls(base=base, size=size, internal_date=internal_date, sent=parsed.sent, sent_day=parsed.sent_day,
                   envelope=parsed.envelope, structure=parsed.structure, saved=saved, preview=parsed.preview,
                   envelope_text=envelope_text(parsed.envelope))


class LazyMessageRecord(msgspec.Struct, kw_only=True):
    """A `msgs` record as FETCH reads it: the envelope and the structure left as their JSON,
    decoded only when an item needs them (decode_envelope, decode_structure): most FETCHes
    are of flags, envelopes (envelope_text) and sizes."""

    size: int = msgspec.field(name="s")
    internal_date: float = msgspec.field(name="d")
    sent: float | None = msgspec.field(name="t", default=None)
    envelope: msgspec.Raw = msgspec.field(name="e")
    structure: msgspec.Raw = msgspec.field(name="x")
    base: str = msgspec.field(name="b")
    email_id: str | None = msgspec.field(name="ei", default=None)
    saved: float | None = msgspec.field(name="sv", default=None)
    preview: str | None = msgspec.field(name="pv", default=None)
    envelope_text: str | None = msgspec.field(name="et", default=None)


class MessageFile(msgspec.Struct):
    """The part of a `msgs` record that names the file: decoded without the envelope and
    structure (msgspec skips them), for a flag change, an expunge or opening the file."""

    base: str = msgspec.field(name="b")
    size: int = msgspec.field(name="s")


class ObjectIds(msgspec.Struct):
    """The part of a `msgs` record its EMAILID is made from (SEARCH EMAILID, RFC 8474)."""

    base: str = msgspec.field(name="b")
    email_id: str | None = msgspec.field(name="ei", default=None)


class SaveDate(msgspec.Struct):
    """The part of a `msgs` record SEARCH SAVEDBEFORE/ON/SINCE reads (RFC 8514)."""

    internal_date: float = msgspec.field(name="d")
    saved: float | None = msgspec.field(name="sv", default=None)

    @property
    def seconds(self) -> float:
        return self.saved if self.saved is not None else self.internal_date


class MailboxRecord(msgspec.Struct, kw_only=True):
    """A mailbox's `mailboxes` record: its name and counters, changed in the transaction
    that changes its messages."""

    account: str
    name: str
    uidnext: int = 1
    modseq: int = 1  # the mailbox's HIGHESTMODSEQ (RFC 7162)
    exists: int = 0
    unseen: int = 0
    size: int = 0  # bytes of its messages
    special_use: str | None = None  # RFC 6154
    keywords: list[str] = []  # every keyword its messages have carried: FLAGS and PERMANENTFLAGS
    indexed_upto: int = msgspec.field(name="ix", default=0)  # storage/fts.py: UIDs on the posting lists
    # storage/recent.py: the highest UID some session has seen; None in a record written
    # before the claim was kept (everything in it then counts as seen).
    recent_upto: int | None = msgspec.field(name="r", default=None)
    # storage/vanished.py: keys in the expunge history, and the MODSEQ up to which it forgot
    expunged_count: int = msgspec.field(name="xn", default=0)
    expunged_floor: int = msgspec.field(name="xf", default=0)


class Usage(msgspec.Struct):
    """An account's `accounts` record: what its quota counts, over all its mailboxes."""

    used: int = 0  # bytes
    messages: int = 0


_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[type, msgspec.json.Decoder] = {
    kind: msgspec.json.Decoder(kind) for kind in (MessageRecord, LazyMessageRecord, MessageFile, ObjectIds, SaveDate,
                                                  MailboxRecord, Usage, BodyPart, Envelope)
}


def encode(record: msgspec.Struct) -> bytes:
    try:
        return _ENCODER.encode(record)
    except UnicodeEncodeError:  # a lone surrogate from a broken header: JSON escapes it
        return json.dumps(msgspec.to_builtins(record), separators=(",", ":")).encode()


def decode(raw: bytes, kind: type[Record]) -> Record:
    try:
        return _DECODERS[kind].decode(raw)
    except msgspec.DecodeError:  # escapes of a lone surrogate (see encode)
        return msgspec.convert(json.loads(bytes(raw)), kind)


def decode_lazy(raw: bytes) -> LazyMessageRecord | MessageRecord:
    """A `msgs` record with its structure left as JSON; a record with escapes msgspec will
    not read (see encode) comes back whole, its structure decoded."""
    try:
        return _DECODERS[LazyMessageRecord].decode(raw)
    except msgspec.DecodeError:
        return decode(raw, MessageRecord)


def decode_structure(raw: bytes) -> BodyPart:
    return decode(raw, BodyPart)


def decode_envelope(raw: bytes) -> Envelope:
    return decode(raw, Envelope)


# -- in a transaction ---------------------------------------------------------------------


def get_mailbox(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> MailboxRecord | None:
    raw = txn.get(pack_u32(mailbox_id), db=shard.db["mailboxes"])
    return decode(raw, MailboxRecord) if raw is not None else None


def put_mailbox(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, state: MailboxRecord) -> None:
    txn.put(pack_u32(mailbox_id), encode(state), db=shard.db["mailboxes"])


def account_exists(txn: lmdb.Transaction, shard: Shard, account: str) -> bool:
    return txn.get(account.encode(), db=shard.db["accounts"]) is not None


def get_usage(txn: lmdb.Transaction, shard: Shard, account: str) -> Usage:
    raw = txn.get(account.encode(), db=shard.db["accounts"])
    return decode(raw, Usage) if raw is not None else Usage()


def shard_usage(txn: lmdb.Transaction, shard: Shard) -> Usage:
    """The sum of every account's usage in `shard`: its messages and their bytes."""
    used = messages = 0
    for _, raw in txn.cursor(db=shard.db["accounts"]):
        usage = decode(raw, Usage)
        used += usage.used
        messages += usage.messages
    return Usage(used, messages)


def put_usage(txn: lmdb.Transaction, shard: Shard, account: str, usage: Usage) -> None:
    txn.put(account.encode(), encode(usage), db=shard.db["accounts"])


def add_usage(txn: lmdb.Transaction, shard: Shard, account: str, size: int, messages: int) -> None:
    usage = get_usage(txn, shard, account)
    put_usage(txn, shard, account, Usage(max(0, usage.used + size), max(0, usage.messages + messages)))


def get_message(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int) -> MessageRecord | None:
    raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["msgs"])
    return decode(raw, MessageRecord) if raw is not None else None


def get_message_file(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int) -> MessageFile | None:
    raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["msgs"])
    return decode(raw, MessageFile) if raw is not None else None
