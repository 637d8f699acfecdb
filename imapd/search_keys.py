"""SEARCH criteria (RFC 3501 §6.4.4, RFC 7162 §3.1.5 MODSEQ) into the query tree of
`storage.search`, keeping symbolic what only the session can resolve:

    ("seq", SequenceSet)     a bare sequence set (message numbers), or `$` (RFC 5182)
    ("uidset", SequenceSet)  UID <set> (`*` is the session's to resolve)
    ("recent",)              RECENT; NEW is ("and", [("recent",), ("flag", "\\\\Seen", False)]),
                             OLD is ("not", ("recent",))

Everything else is in the store's own form: ("all",), ("flag", name, present),
("before"|"on"|"since"|"sentbefore"|"senton"|"sentsince", datetime.date),
("larger"|"smaller"|"modseq", int), ("from"|"to"|"cc"|"bcc"|"subject"|"body"|"text", str),
("header", field, str), ("emailid"|"threadid", str) (RFC 8474), ("savedbefore"|"savedon"|"savedsince", datetime.date),
("savedatesupported",) (RFC 8514), ("not", q), ("or", q1, q2),
("and", [q, ...]).

A sequence of keys (at the top or in parentheses) is their AND: one key stands alone,
several become ("and", [...]) with nested ANDs flattened into it. Key names are
case-insensitive. NOT, OR and parentheses nest at most MAX_NESTING deep together, and a
SEARCH holds at most MAX_KEYS keys (ParseError "LIMIT" for either).
Strings are astrings decoded per CHARSET: US-ASCII strictly; UTF-8, and no CHARSET
at all, as UTF-8 (clients send UTF-8 without naming it; ASCII is a subset).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from imapd import tokens as t
from imapd.syntax import ParseError

MAX_NESTING = 256
# Keys in one SEARCH, NOT/OR and parentheses included. A search costs about keys x messages
# (found by an attack: 9,000 TEXT keys over 1,500 messages, 15 s of CPU); clients send a
# handful, an address-book search a few hundred.
MAX_KEYS = 1000
_PRINTABLE = re.compile(r"[!-~]{1,64}")
CHARSETS = {"US-ASCII": "ascii", "UTF-8": "utf-8"}

_FLAGS = {  # key: (flag, present)
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_CONSTANT = {
    "ALL": ("all",),
    "RECENT": ("recent",),
    "OLD": ("not", ("recent",)),
    "SAVEDATESUPPORTED": ("savedatesupported",),  # RFC 8514 §4
}
_STRINGS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
_DATES = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE",
                    "SAVEDBEFORE", "SAVEDON", "SAVEDSINCE"})  # RFC 8514 the last three
_SIZES = frozenset({"LARGER", "SMALLER"})
_ENTRY_TYPES = frozenset({"PRIV", "SHARED", "ALL"})


def parse_search(args: t.Args) -> tuple[str | None, tuple]:
    """`[CHARSET name] key *(SP key)` -> (charset, query)."""
    charset = None
    first = args.peek()
    if isinstance(first, t.Atom) and first.text.upper() == "CHARSET":
        args.take("CHARSET")
        charset = parse_charset(args.take("charset name"))
    return charset, parse_criteria(args, charset)


def parse_charset(tok: t.Token) -> str:
    """SORT and THREAD's charset argument (RFC 5256 §3: not optional there)."""
    name = t.astring(tok, "charset name").decode("ascii", "replace").upper()
    if name not in CHARSETS:
        # Named back only when it is printable ASCII: a quoted string or literal can
        # hold controls, CR LF among them, which would break the response line.
        shown = f" {name}" if _PRINTABLE.fullmatch(name) else ""
        raise ParseError(f"unsupported charset{shown}", code="BADCHARSET", status="NO")
    return name


def parse_criteria(args: t.Args, charset: str | None) -> tuple:
    """The search keys that make up the rest of the command, as one query."""
    codec = CHARSETS.get(charset or "UTF-8")

    def decode(tok: t.Token, what: str) -> str:
        try:
            return t.astring(tok, what).decode(codec)
        except UnicodeDecodeError as exc:
            raise ParseError(f"{what} is not valid {charset or 'UTF-8'}") from exc

    keys = _Keys(decode).sequence(args.rest())
    if not keys:
        raise ParseError("missing search criteria")
    return _and(keys)


def _and(keys: list[tuple]) -> tuple:
    if len(keys) == 1:
        return keys[0]
    flat: list[tuple] = []
    for key in keys:
        flat.extend(key[1] if key[0] == "and" else [key])
    return ("and", flat)


class _Keys:
    def __init__(self, decode: Callable[[t.Token, str], str]):
        self.decode = decode
        self.count = 0

    def sequence(self, items: list[t.Token], nesting: int = 0) -> list[tuple]:
        args = t.Args(items)
        keys = []
        while args.more():
            keys.append(self.key(args, nesting))
        return keys

    def key(self, args: t.Args, nesting: int) -> tuple:
        if nesting > MAX_NESTING:
            raise ParseError("search criteria nested too deeply", code="LIMIT")
        self.count += 1
        if self.count > MAX_KEYS:
            raise ParseError(f"more than {MAX_KEYS} search keys", code="LIMIT")
        tok = args.take("search key")
        if isinstance(tok, t.Group):
            # A group nests too: counted from 0 again, 16 groups of 256 NOTs overflowed
            # Python's stack (RecursionError) instead of answering LIMIT.
            keys = self.sequence(list(tok.items), nesting + 1)
            if not keys:
                raise ParseError("empty parenthesized search criteria")
            return _and(keys)
        if t.is_sequence_set(tok):
            return ("seq", t.sequence_set(tok))
        if not isinstance(tok, t.Atom):
            raise ParseError("a search key must be an atom")
        name = tok.text.upper()
        what = f"{name} argument"
        if name in _FLAGS:
            return ("flag", *_FLAGS[name])
        if name in _CONSTANT:
            return _CONSTANT[name]
        if name == "NEW":
            return ("and", [("recent",), ("flag", "\\Seen", False)])
        if name in _STRINGS:
            return (name.lower(), self.decode(args.take(what), what))
        if name in _DATES:
            return (name.lower(), t.date(args.take(what), what))
        if name in _SIZES:
            return (name.lower(), t.number(args.take(what), what, 0, t.MAX_NUMBER64))
        if name in ("KEYWORD", "UNKEYWORD"):
            return ("flag", t.keyword(args.take(what), what), name == "KEYWORD")
        if name == "HEADER":
            field = self.decode(args.take("header field name"), "header field name")
            return ("header", field, self.decode(args.take(what), what))
        if name == "UID":
            return ("uidset", t.sequence_set(args.take(what), what))
        if name == "NOT":
            return ("not", self.key(args, nesting + 1))
        if name == "OR":
            first = self.key(args, nesting + 1)
            return ("or", first, self.key(args, nesting + 1))
        if name == "MODSEQ":
            return self._modseq(args)
        if name in ("EMAILID", "THREADID"):  # RFC 8474 §6
            return (name.lower(), t.atom(args.take(what), what))
        raise ParseError(f"unknown search key {tok.text}")

    def _modseq(self, args: t.Args) -> tuple:
        """MODSEQ [entry-name entry-type-req] mod-sequence-valzer (RFC 7162 §3.1.5); the
        entry is checked and ignored: one MODSEQ per message here, not per flag."""
        if isinstance(args.peek(), t.String):
            entry = args.take("MODSEQ entry name")
            if entry.literal or not entry.data.startswith(b"/flags/") or len(entry.data) <= len(b"/flags/"):
                raise ParseError("invalid MODSEQ entry name")
            t.flag(t.Atom(entry.data[len(b"/flags/"):].decode("ascii", "replace")), "MODSEQ entry flag")
            kind = args.take("MODSEQ entry type")
            if not isinstance(kind, t.Atom) or kind.text.upper() not in _ENTRY_TYPES:
                raise ParseError("invalid MODSEQ entry type")
        return ("modseq", t.number(args.take("MODSEQ value"), "MODSEQ value", 0, t.MAX_NUMBER64))
