"""SORT's keys and order (RFC 5256 §3, RFC 5957 DISPLAYFROM/DISPLAYTO) and the base
subject of RFC 5256 §2.1, which SORT SUBJECT and both THREAD algorithms share. Sans-IO:
message summaries in, an order out.

Each key compares as the RFC says: ARRIVAL the internal date; DATE the Date: header in
UTC, the internal date for a message without a usable one (§2.2); FROM, TO, CC the mailbox
(local part) of the first address, i;ascii-casemap, "" when there is none (a group's
name stands in the mailbox slot and counts, as in Dovecot); SIZE the RFC822.SIZE; SUBJECT
the base subject, i;ascii-casemap; DISPLAYFROM, DISPLAYTO the first address's display
name, RFC 2047 decoded, or its addr-spec without one (RFC 5957 §3), compared case-folded
(i;unicode-casemap, approximately). REVERSE turns one key around; messages equal on
every key stay in sequence (UID) order (§3), reversed or not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from imapd.syntax import SortKey
from storage import Envelope, EnvelopeAddress, decode_words

# A subject is cut to this before its base is taken: sorting on the first 2,000 characters
# is indistinguishable in practice, and it bounds the work a hostile header can ask for.
MAX_SUBJECT = 2000
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_BLOB = re.compile(r"\[[^\[\]]*\] *")  # subj-blob (RFC 5256 §5), spaces already collapsed
_REFWD = re.compile(r"(?:re|fwd?) *(?:\[[^\[\]]*\] *)?:", re.IGNORECASE)  # subj-refwd


@dataclass(frozen=True)
class Summary:
    """What sorting and threading read of one message."""

    uid: int
    internal_date: float
    size: int
    sent: float | None  # the Date: header, None without a usable one
    envelope: Envelope
    references: tuple[str, ...] = ()  # message ids of References:, oldest first (THREAD only)

    @property
    def date(self) -> float:
        """The sent date, or the internal date (RFC 5256 §2.2)."""
        return self.internal_date if self.sent is None else self.sent


def base_subject(subject: str | None) -> tuple[str, bool]:
    """(the base subject, whether anything marked it a reply or forward) per RFC 5256
    §2.1. `subject` is already RFC 2047 decoded. Each pass removes what it reads, so the
    work is linear in the subject (blobs skipped in step 3 are removed by step 4 at once)."""
    text = " ".join((subject or "")[:MAX_SUBJECT].split())  # (1): runs of white space to one space
    reply = False
    while True:
        end = len(text)  # (2): trailers, "(fwd)" and white space, from the end
        while end:
            if text[end - 1] == " ":
                end -= 1
            elif end >= 5 and text[end - 5:end].lower() == "(fwd)":
                end -= 5
                reply = True
            else:
                break
        pos = 0
        while True:  # (3), (4), (5)
            start = pos
            while pos < end and text[pos] == " ":
                pos += 1
            blobs = []
            scan = pos
            while (blob := _BLOB.match(text, scan, end)) is not None:
                scan = blob.end()
                blobs.append(scan)
            refwd = _REFWD.match(text, scan, end)
            if refwd is not None:
                pos = refwd.end()
                reply = True
                continue
            if blobs:  # (4): a leading blob goes if something remains after it
                pos = blobs[-1] if blobs[-1] < end else (blobs[-2] if len(blobs) > 1 else pos)
            if pos == start:
                break
        text = text[pos:end]
        if text[:5].lower() == "[fwd:" and text.endswith("]"):  # (6): [fwd: subject]
            text = text[5:-1]
            reply = True
            continue
        return text, reply


def ascii_casemap(text: str) -> str:
    return text.translate(_ASCII_UPPER)


def _first(addresses: tuple[EnvelopeAddress, ...] | None) -> EnvelopeAddress | None:
    return addresses[0] if addresses else None


def _mailbox(addresses: tuple[EnvelopeAddress, ...] | None) -> str:
    first = _first(addresses)
    return ascii_casemap(first.mailbox or "") if first is not None else ""


def _display(addresses: tuple[EnvelopeAddress, ...] | None) -> str:
    first = _first(addresses)
    if first is None:
        return ""
    name = decode_words(first.name).strip() if first.name else ""
    if not name:
        name = first.mailbox or ""
        if first.host:
            name += "@" + first.host
    return name.casefold()


_KEYS: dict[str, Callable[[Summary], object]] = {
    "arrival": lambda m: m.internal_date,
    "cc": lambda m: _mailbox(m.envelope.cc),
    "date": lambda m: m.date,
    "from": lambda m: _mailbox(m.envelope.from_),
    "size": lambda m: m.size,
    "subject": lambda m: ascii_casemap(base_subject(m.envelope.subject_text)[0]),
    "to": lambda m: _mailbox(m.envelope.to),
    "displayfrom": lambda m: _display(m.envelope.from_),
    "displayto": lambda m: _display(m.envelope.to),
}


def sort(messages: Iterable[Summary], keys: Iterable[SortKey]) -> list[Summary]:
    """`messages` in the order of `keys`. Python's sort is stable, reversed or not: sorting
    by UID first and then by each key from the last to the first gives the RFC's order."""
    ordered = sorted(messages, key=lambda m: m.uid)
    for key in reversed(list(keys)):
        value = _KEYS[key.name]
        ordered.sort(key=value, reverse=key.reverse)
    return ordered
