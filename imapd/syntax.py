"""The typed values of parsed IMAP commands: what imapd.parser produces and the session,
the FETCH renderer and the SEARCH translation consume. Plain data, no parsing here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ParseError(Exception):
    """The command is malformed: the session answers `tag BAD <str(self)>`, or `* BAD ...`
    when `tag` is None (it could not be read). `code` is an optional response code without
    brackets (e.g. "TOOBIG", "LIMIT"). `status` is "BAD" except where the RFC asks for NO:
    an unsupported SEARCH CHARSET is `NO [BADCHARSET]` (RFC 3501 §6.4.4)."""

    def __init__(self, text: str, code: str | None = None, tag: str | None = None, status: str = "BAD"):
        super().__init__(text)
        self.code = code
        self.tag = tag
        self.status = status


@dataclass(frozen=True)
class SequenceSet:
    """A sequence-set as written: ranges of (low, high), either bound None for `*`. Whether
    it names sequence numbers or UIDs is the command's business (UID prefix)."""

    ranges: tuple[tuple[int | None, int | None], ...]

    def resolve(self, star: int) -> list[tuple[int, int]]:
        """Ranges with `*` replaced by `star` (the largest number in use), each low <= high.
        `star` 0 (an empty mailbox) turns `*` into 0, which matches nothing."""
        out = []
        for low, high in self.ranges:
            a = star if low is None else low
            b = star if high is None else high
            out.append((min(a, b), max(a, b)))
        return out


@dataclass(frozen=True)
class Section:
    """BODY[<section>]: `part` is the part number path (() for the whole message);
    `text` is "" (the whole part), "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"
    or "MIME"; `fields` the header names for HEADER.FIELDS(.NOT), as given (case kept for
    echoing, compared case-insensitively)."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()

    def spec(self) -> str:
        """The section as echoed in the response: `1.2.HEADER.FIELDS (From To)`."""
        parts = ".".join(map(str, self.part))
        text = self.text
        if self.fields:
            text += " (" + " ".join(self.fields) + ")"
        return ".".join(p for p in (parts, text) if p)


@dataclass(frozen=True)
class FetchItem:
    """One FETCH data item. `name` is one of: UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE
    BODYSTRUCTURE BODY (the non-extensible structure) MODSEQ RFC822 RFC822.HEADER
    RFC822.TEXT BODY[] (a section fetch: `section` is set). `peek` is BODY.PEEK[...]'s;
    `partial` is <origin.count>."""

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None


@dataclass(frozen=True)
class Command:
    """A parsed command. `name` is upper case; UID commands are "UID FETCH", "UID STORE",
    "UID SEARCH", "UID COPY", "UID MOVE", "UID EXPUNGE". `args` holds the command's typed
    arguments by name (see imapd.parser for each command's keys)."""

    tag: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
