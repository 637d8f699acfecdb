"""The typed values of parsed IMAP commands: what imapd.parser produces and the session,
the FETCH renderer and the SEARCH translation consume. Plain data, no parsing here: one
frozen dataclass per verb (`Fetch`, `Store`, `Append`, ...), each a `Command` with its tag
and name, and the values they are made of (`SequenceSet`, `FetchItem`, `Section`)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass


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
    saved: bool = False  # `$`, the saved search result (RFC 5182 §2.1): no ranges of its own

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
    RFC822.TEXT BODY[] (a section fetch: `section` is set), BINARY[] and BINARY.SIZE
    (RFC 3516: `section` has part numbers only). `peek` is BODY.PEEK[...]'s and
    BINARY.PEEK[...]'s; `partial` is <origin.count>. PREVIEW (RFC 8970) is `lazy` with its
    (LAZY) modifier."""

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None
    lazy: bool = False


@dataclass(frozen=True)
class Command:
    """A parsed command; one without arguments is this class itself. `name` is upper case,
    as the state table knows it: UID commands are "UID FETCH", "UID STORE", "UID SEARCH",
    "UID COPY", "UID MOVE", "UID EXPUNGE". Commands with arguments are the subclasses
    below, one per verb (a verb's UID form is the same class with `uid` True)."""

    tag: str
    name: str


# -- any state, not authenticated ---------------------------------------------------------------

@dataclass(frozen=True)
class Enable(Command):
    capabilities: tuple[str, ...]  # upper case (RFC 5161)


@dataclass(frozen=True)
class Id(Command):
    params: dict[str, str | None] | None  # RFC 2971; None for NIL


@dataclass(frozen=True)
class Compress(Command):
    mechanism: str  # upper case (RFC 4978: DEFLATE)


@dataclass(frozen=True)
class Login(Command):
    user: str
    password: str


@dataclass(frozen=True)
class Authenticate(Command):
    mechanism: str  # upper case
    initial: str | None  # SASL-IR's initial response (RFC 4959), "=" read as ""; None: none given


# -- mailboxes ------------------------------------------------------------------------------------
# Mailbox names are decoded from modified UTF-7; INBOX in any case, and as the first level of
# a path, is "INBOX"; the separator is "/".

@dataclass(frozen=True)
class QResync:
    """SELECT's (QRESYNC (uidvalidity modseq [known-uids [seq-match-data]])), RFC 7162 §3.2.5."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    known_seqs: SequenceSet | None = None  # sequence match data: these numbers ...
    known_seq_uids: SequenceSet | None = None  # ... were these UIDs, one for one


@dataclass(frozen=True)
class Select(Command):
    """SELECT, and EXAMINE (`readonly`)."""

    mailbox: str
    condstore: bool = False  # the (CONDSTORE) parameter, RFC 7162 §3.1.8
    qresync: QResync | None = None  # RFC 7162 §3.2.5

    @property
    def readonly(self) -> bool:
        return self.name == "EXAMINE"


@dataclass(frozen=True)
class Create(Command):
    mailbox: str
    special_use: tuple[str, ...] = ()  # (USE (\\Sent)), RFC 6154 §3


@dataclass(frozen=True)
class Delete(Command):
    mailbox: str


@dataclass(frozen=True)
class Rename(Command):
    old: str
    new: str


@dataclass(frozen=True)
class Subscribe(Command):
    mailbox: str


@dataclass(frozen=True)
class Unsubscribe(Command):
    mailbox: str


@dataclass(frozen=True)
class ListReturn:
    """LIST's RETURN options (RFC 5258 §3.2, RFC 5819 STATUS, RFC 6154 SPECIAL-USE)."""

    subscribed: bool = False
    children: bool = False
    special_use: bool = False
    status: tuple[str, ...] | None = None  # STATUS items to answer for each mailbox listed


@dataclass(frozen=True)
class List(Command):
    reference: str
    patterns: tuple[str, ...]
    select: tuple[str, ...] = ()  # selection options, upper case (RFC 5258 §3.1)
    returns: ListReturn = ListReturn()


@dataclass(frozen=True)
class Lsub(Command):
    reference: str
    pattern: str


@dataclass(frozen=True)
class Status(Command):
    mailbox: str
    items: tuple[str, ...]  # upper case


@dataclass(frozen=True)
class CatenateUrl:
    """A CATENATE URL part (RFC 4469 §5): an IMAP URL (RFC 5092), as sent."""

    url: str


@dataclass(frozen=True)
class AppendMessage:
    """One message of an APPEND (RFC 3502 MULTIAPPEND sends several). Either `message`,
    its literal, or `catenate`, its parts (RFC 4469): CatenateUrl or a TEXT literal.
    A literal is bytes, or, streamed into the store as it came (imapd/append.py), the
    sink that took it."""

    flags: tuple[str, ...] = ()
    date: datetime.datetime | None = None  # aware
    message: object = None
    catenate: tuple | None = None
    binary: bool = False  # the message came as a literal8, `~{n}` (RFC 3516 §4.4)
    utf8: bool = False  # UTF8 (~{n}) (RFC 6855 §4)


@dataclass(frozen=True)
class Append(Command):
    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True)
class GetQuotaRoot(Command):
    mailbox: str


@dataclass(frozen=True)
class GetQuota(Command):
    root: str


@dataclass(frozen=True)
class SetQuota(Command):
    root: str
    limits: dict[str, int]  # resource name, upper case -> limit


# -- the selected mailbox -------------------------------------------------------------------------
# `sequence` names sequence numbers, or UIDs when `uid` is True (the UID form, RFC 3501 §6.4.8).

@dataclass(frozen=True)
class Fetch(Command):
    sequence: SequenceSet
    items: tuple[FetchItem, ...]  # in the order asked; macros (ALL, FAST, FULL) expanded
    changedsince: int | None = None  # RFC 7162 §3.1.4
    vanished: bool = False  # RFC 7162 §3.2.6: UID FETCH ... (CHANGEDSINCE m VANISHED)
    uid: bool = False


@dataclass(frozen=True)
class Store(Command):
    sequence: SequenceSet
    mode: str  # "set", "add" or "remove" (FLAGS, +FLAGS, -FLAGS)
    silent: bool
    flags: tuple[str, ...]
    unchangedsince: int | None = None  # RFC 7162 §3.1.3
    uid: bool = False


@dataclass(frozen=True)
class Copy(Command):
    sequence: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True)
class Move(Command):
    sequence: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True)
class Expunge(Command):
    """EXPUNGE, and UID EXPUNGE (RFC 4315 §2.1): only the UIDs in `sequence`."""

    sequence: SequenceSet | None = None
    uid: bool = False


@dataclass(frozen=True)
class SearchReturn:
    """SEARCH and SORT's RETURN options (RFC 4731 §3.1, RFC 5182 SAVE, RFC 5267 §4.1
    PARTIAL and UPDATE, CONTEXT a hint that is accepted and ignored). `RETURN ()` is ALL."""

    min: bool = False
    max: bool = False
    all: bool = False
    count: bool = False
    save: bool = False
    update: bool = False
    partial: tuple[int, int] | None = None  # (low, high), 1-based, low <= high


@dataclass(frozen=True)
class Search(Command):
    charset: str | None  # "US-ASCII", "UTF-8" or None
    query: tuple  # imapd.search_keys' tree
    uid: bool = False
    returns: SearchReturn | None = None  # None: a plain SEARCH, answered `* SEARCH`


@dataclass(frozen=True)
class SortKey:
    """One SORT criterion (RFC 5256 §3, RFC 5957 DISPLAYFROM/DISPLAYTO): `name` lower case."""

    name: str
    reverse: bool = False


@dataclass(frozen=True)
class Sort(Command):
    keys: tuple[SortKey, ...]
    charset: str
    query: tuple
    uid: bool = False
    returns: SearchReturn | None = None  # ESORT (RFC 5267 §3): answered `* ESEARCH`


@dataclass(frozen=True)
class Thread(Command):
    algorithm: str  # "REFERENCES" or "ORDEREDSUBJECT"
    charset: str
    query: tuple
    uid: bool = False


@dataclass(frozen=True)
class CancelUpdate(Command):
    tags: tuple[str, ...]  # RFC 5267 §4.3: the tags of the SEARCH/SORT UPDATEs to end


@dataclass(frozen=True)
class GetMetadata(Command):
    """GETMETADATA (RFC 5464 §4.2): entry names as written (checked by imapd.metadata)."""

    mailbox: str  # "" for the server's annotations
    entries: tuple[str, ...]
    maxsize: int | None = None
    depth: str = "0"  # "0", "1" or "infinity"


@dataclass(frozen=True)
class SetMetadata(Command):
    """SETMETADATA (RFC 5464 §4.3): (entry, value) pairs, None for NIL (remove)."""

    mailbox: str
    items: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True)
class NotifyGroup:
    """One event group of NOTIFY SET (RFC 5465 §6): which mailboxes, which events."""

    filter: str  # SELECTED, SELECTED-DELAYED, INBOXES, PERSONAL, SUBSCRIBED, SUBTREE, MAILBOXES
    mailboxes: tuple[str, ...] = ()  # SUBTREE's and MAILBOXES' names
    events: tuple[str, ...] = ()  # in the RFC's case: "MessageNew", "FlagChange"...; () for NONE
    fetch: tuple[FetchItem, ...] = ()  # MessageNew's fetch attributes (selected filters only)


@dataclass(frozen=True)
class Notify(Command):
    """NOTIFY NONE (`groups` empty) or NOTIFY SET [STATUS] groups (RFC 5465 §3)."""

    groups: tuple[NotifyGroup, ...] = ()
    status: bool = False


@dataclass(frozen=True)
class GenUrlAuth(Command):
    """GENURLAUTH (RFC 4467 §6.1): (rump URL, mechanism) pairs."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ResetKey(Command):
    """RESETKEY (RFC 4467 §6.2): one mailbox's keys, or (None) every mailbox's."""

    mailbox: str | None = None
    mechanisms: tuple[str, ...] = ()


@dataclass(frozen=True)
class UrlFetchItem:
    """One URL of URLFETCH; `extended` when sent as RFC 5524's `(url params)`."""

    url: str
    extended: bool = False
    bodypartstructure: bool = False
    binary: bool = False
    body: bool = False


@dataclass(frozen=True)
class UrlFetch(Command):
    """URLFETCH (RFC 4467 §6.3, RFC 5524 §3)."""

    items: tuple[UrlFetchItem, ...]
