"""What every source of `postroom store import` gives the importer (postroom/importer.py):
folders, and in each the messages, streamed.

A source is an iterable of Folder; a folder's `messages()` yields Message, whose `chunks()`
reads the message's bytes a piece at a time, with line ends made CRLF (the store keeps mail
as it travels on the wire, RFC 5322 §2.1, so that IMAP sizes are exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

PIECE = 1 << 16  # bytes read at a time: no line, however long, is read whole


class SourceError(Exception):
    """The source cannot be read at all: one line for the sysadmin (exit 1)."""


@dataclass
class Message:
    # Its name in the source, for the ledger that keeps a rerun from importing it twice; a
    # function when only its bytes name it (called once they are read).
    key: str | Callable[[], str]
    chunks: Callable[[], Iterator[bytes]]
    uid: int | None = None  # kept when the folder's UIDVALIDITY is
    flags: tuple[str, ...] = ()
    internal_date: float | None = None


@dataclass
class Folder:
    name: str  # "/"-separated, Unicode
    # messages(known): known(key, uid) says a message is in already; a source that can
    # skip work for those (not fetching them) asks it, the importer asks again anyway
    messages: Callable[[Callable[[str, int | None], bool]], Iterator[Message]]
    count: int | None = None  # for the progress line, when known ahead
    uidvalidity: int | None = None
    uidnext: int | None = None
    special_use: str | None = None


def crlf_pieces(file: BinaryIO, limit: int | None = None) -> Iterator[bytes]:
    """The file's bytes (up to `limit` of them) a piece at a time, each bare LF made CRLF."""
    after_cr = False
    left = limit
    while left is None or left > 0:
        piece = file.readline(PIECE if left is None else min(PIECE, left))
        if not piece:
            return
        if left is not None:
            left -= len(piece)
        yield crlf_line(piece, after_cr)
        after_cr = piece.endswith(b"\r")


def crlf_line(piece: bytes, after_cr: bool = False) -> bytes:
    """A piece of one line (it ends at its LF, if it has one) with that LF made CRLF;
    `after_cr`: the piece before ended with CR (an LF first here belongs to it)."""
    if piece.endswith(b"\n") and not piece.endswith(b"\r\n") and not (piece == b"\n" and after_cr):
        return piece[:-1] + b"\r\n"
    return piece

