"""An mbox file as a source of `postroom store import` (RFC 4155; mutt, Thunderbird,
Python's `mailbox`, Dovecot's mbox): one folder, read once, a line at a time.

A message starts at a line "From <sender> <asctime date>" (its internal date, taken as UTC:
what Python's `mailbox` and most writers put there) and ends before the blank line that
precedes the next one. Body lines that began with "From " were written ">From " and are
given back (mboxrd: one ">" less on any ">...>From " line). The headers mbox writers use
to keep state are read and dropped, as Dovecot does: Status (R \\Seen; O only means not
new) and X-Status (A \\Answered, F \\Flagged, T \\Draft, D \\Deleted) become flags,
X-Keywords keywords; X-UID, X-IMAP, X-IMAPbase and Content-Length go. Dovecot's first
message that only carries folder data (an X-IMAP header) is no message and is skipped.

An mbox message has no name of its own: the ledger's key is a digest of its bytes and how
many identical messages came before it in this file, so a rerun skips exactly what is in.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO

from postroom.importer_source import PIECE, Folder, Message, SourceError, crlf_line

MAX_SEPARATOR = 1024  # bytes of a From_ line searched for its date (a real one is ~60)
MAX_HEADER = 1 << 20  # bytes of header kept to read flags from; beyond, the rest is streamed
_DROPPED = {b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap", b"x-imapbase", b"content-length"}
_X_STATUS = {"A": "\\Answered", "F": "\\Flagged", "T": "\\Draft", "D": "\\Deleted"}
_QUOTED_FROM = re.compile(rb"^>+From ")
_WEEKDAYS = {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}


def is_mbox(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(5) == b"From "
    except OSError:
        return False


def folders(path: Path, into: str) -> Iterator[Folder]:
    if not is_mbox(path):
        raise SourceError(f"{path}: not an mbox file (it does not begin with a \"From \" line)")
    yield Folder(name=into, messages=lambda known: _messages(path))


class _Lines:
    """The file's lines, a piece (at most PIECE bytes) at a time, with one piece of lookahead."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self._next: bytes | None = None
        self.at_line_start = True  # the next piece begins a line

    def peek(self) -> bytes:
        if self._next is None:
            self._next = self._file.readline(PIECE)
        return self._next

    def take(self) -> bytes:
        piece = self.peek()
        self._next = None
        return piece


def _messages(path: Path) -> Iterator[Message]:
    try:
        file = open(path, "rb")
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    seen: dict[bytes, int] = {}  # digest -> identical messages so far
    with file:
        lines = _Lines(file)
        while True:
            separator = lines.take()
            if not separator:
                return
            if not separator.startswith(b"From "):
                continue  # junk before the first message (never, after a check of the start)
            date = _separator_date(separator)
            while not separator.endswith(b"\n") and separator:  # an absurdly long From_ line
                separator = lines.take()
            lines.at_line_start = True
            message = _MboxMessage(lines, date, seen)
            message.read_header()
            if message.folder_data:
                message.drain()
                continue
            yield Message(key=message.key, chunks=message.chunks, flags=message.flags,
                          internal_date=message.date)
            message.drain()  # what the importer did not read (a message it skipped)


class _MboxMessage:
    def __init__(self, lines: _Lines, date: float | None, seen: dict[bytes, int]):
        self._lines = lines
        self._seen = seen
        self._digest = hashlib.sha256()
        self._header: list[bytes] = []  # kept header lines, CRLF
        self._done = False
        self._held_blank: bytes | None = None  # a blank line that may be the separator's
        self._after_cr = False
        self.date = date
        self.flags: tuple[str, ...] = ()
        self.folder_data = False

    def read_header(self) -> None:
        """Header lines up to the blank one (or MAX_HEADER bytes): flags out, state headers dropped."""
        fields: list[list[bytes]] = []
        size = 0
        while size < MAX_HEADER:
            at_start = self._lines.at_line_start
            piece = self._lines.peek()
            if not piece or (at_start and piece.startswith(b"From ")):
                break
            self._lines.take()
            self._lines.at_line_start = piece.endswith(b"\n")
            size += len(piece)
            if at_start and piece in (b"\n", b"\r\n"):
                fields.append([piece])
                break
            if not at_start or piece[:1] in (b" ", b"\t") and fields:
                fields[-1].append(piece)
            else:
                fields.append([piece])
        flags: dict[str, None] = {}
        date_header = None
        for field in fields:
            name = field[0].split(b":", 1)[0].strip().lower()
            value = b"".join(field).split(b":", 1)[1].decode("ascii", "replace").strip() if b":" in field[0] else ""
            if name == b"x-imap":
                self.folder_data = True
            if name == b"status":
                flags.update(dict.fromkeys(["\\Seen"] if "R" in value else []))
            elif name == b"x-status":
                flags.update(dict.fromkeys(_X_STATUS[c] for c in value if c in _X_STATUS))
            elif name == b"x-keywords":
                flags.update(dict.fromkeys(w for w in value.replace(",", " ").split() if w))
            elif name == b"date":
                date_header = value
            if name in _DROPPED:
                continue
            for piece in field:
                self._header.append(self._crlf(piece))
        self.flags = tuple(flags)
        if self.date is None and date_header:
            try:
                self.date = parsedate_to_datetime(date_header).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                pass

    def _crlf(self, piece: bytes) -> bytes:
        out = crlf_line(piece, self._after_cr)
        self._after_cr = piece.endswith(b"\r")
        return out

    def chunks(self) -> Iterator[bytes]:
        for piece in self._header:
            self._digest.update(piece)
            yield piece
        self._header = []
        for piece in self._body():
            self._digest.update(piece)
            yield piece

    def _body(self) -> Iterator[bytes]:
        lines = self._lines
        while not self._done:
            at_start = lines.at_line_start
            piece = lines.peek()
            if not piece or (at_start and piece.startswith(b"From ")):
                self._done = True
                break  # a held blank line was the separator's: dropped
            lines.take()
            lines.at_line_start = piece.endswith(b"\n")
            if at_start and _QUOTED_FROM.match(piece):
                piece = piece[1:]
            if self._held_blank is not None:
                yield self._held_blank
                self._held_blank = None
            if at_start and piece in (b"\n", b"\r\n"):
                self._held_blank = self._crlf(piece)
                continue
            yield self._crlf(piece)

    def drain(self) -> None:
        for _ in self._body():
            pass

    def key(self) -> str:
        digest = self._digest.digest()
        count = self._seen.get(digest, 0)
        self._seen[digest] = count + 1
        return f"mbox:{digest.hex()}:{count}"


def _separator_date(line: bytes) -> float | None:
    """The asctime date of a From_ line ("From a@b Mon Jan  1 00:00:00 2024"), as UTC.
    Only its first MAX_SEPARATOR bytes are read: each word is a place the date may start,
    and a 64 KiB line of one-letter words took 0.3 s of strptime (a 100 MB mbox of them,
    eight minutes)."""
    words = line[:MAX_SEPARATOR].decode("ascii", "replace").split()
    for start in range(2, len(words) - 4):
        if words[start][:3].title() not in _WEEKDAYS:
            continue  # where no asctime date starts: no strptime
        text = " ".join(words[start:start + 5])
        try:
            return float(calendar.timegm(time.strptime(text, "%a %b %d %H:%M:%S %Y")))
        except ValueError:
            continue
    return None
