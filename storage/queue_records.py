"""The outbound queue's index records (storage/queue.py), as stored, and the due-time keys.

    messages  queue id                 -> MessageRecord (JSON, msgspec): envelope, DSN
                                          parameters, prepended header bytes, recipients' states
    due       ms (u64 BE) queue id     -> b"": each message that is not held and has a
                                          recipient left, at its earliest next attempt

A message's record is rewritten whole by each change, in the transaction that moves its due
key, so the two never disagree. Field names are spelt out: a queue holds few records and
`mdb_dump` should read plainly.
"""

from __future__ import annotations

import math
import struct

import msgspec

QUEUED, DEFERRED, DELIVERED, BOUNCED = "queued", "deferred", "delivered", "bounced"
PENDING = (QUEUED, DEFERRED)  # a recipient still to be tried
FINAL = (DELIVERED, BOUNCED)

_MS = struct.Struct(">Q")


class RecipientRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    address: str
    orcpt: str | None = None  # RFC 3461 §4.2, as given: "rfc822;a@b"
    notify: tuple[str, ...] = ()  # RFC 3461 §4.1; () is the default (FAILURE, DELAY)
    state: str = QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str | None = None
    remote_mta: str | None = None
    updated: float = 0.0


class MessageRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    created: float
    sender: str  # "" for the null reverse-path
    recipients: list[RecipientRecord]
    size: int  # bytes as sent: prepend + the spool file
    envid: str | None = None  # RFC 3461 §4.4
    ret: str | None = None  # RFC 3461 §4.3: "FULL" or "HDRS"
    smtputf8: bool = False
    eight_bit: bool = False
    origin: str = "submission"
    user: str | None = None
    held: bool = False
    delay_warned: bool = False
    prepend: bytes = b""  # header lines added at commit (a DKIM signature), before the file's bytes

    def pending(self) -> list[RecipientRecord]:
        return [r for r in self.recipients if r.state in PENDING]

    def due_key(self, qid: str) -> bytes | None:
        """Its key in `due`, or None when nothing is to be tried (held, or all final)."""
        when = self.due_at()
        return due_key(when, qid) if when is not None else None

    def due_at(self) -> float | None:
        """The earliest next attempt of a pending recipient; None when held or all final."""
        pending = self.pending()
        if self.held or not pending:
            return None
        return min(r.next_attempt for r in pending)


def due_key(when: float, qid: str) -> bytes:
    return _MS.pack(max(0, math.ceil(when * 1000))) + qid.encode()


def due_limit(now: float) -> int:
    """The `due` keys of messages due at `now` have a time part up to this (those of the
    last millisecond may be due a fraction later: check their records)."""
    return max(0, math.ceil(now * 1000))


def split_due_key(key: bytes) -> tuple[int, str]:
    return _MS.unpack_from(key)[0], bytes(key[_MS.size:]).decode()


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(MessageRecord)


def encode(record: MessageRecord) -> bytes:
    return _ENCODER.encode(record)


def decode(raw: bytes) -> MessageRecord:
    return _DECODER.decode(raw)
