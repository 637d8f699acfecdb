"""The IMAP argument tokenizer and the readers of typed values (RFC 3501 §4, §9 formal syntax).

`tokenize(parts, start)` turns a command's lines and literals (a `Frame`'s parts) into a list
of tokens: `Atom`, `String` (quoted or literal, as bytes), `Group` (a parenthesized list)
and `Bracketed` (`BODY[...]<...>`, whose brackets hold a section with spaces, lists and
even literals inside). NIL stays an atom: whether it means nothing or the string "NIL"
depends on where it stands. Tokens are separated by spaces (runs of them are tolerated);
two tokens stuck together are an error. The tokenizer is deliberately broader than the
grammar (`\\`, `%`, `*`, `[`, `]` may sit in atoms); the readers below check each value
against the grammar for its place.

Limits: groups nest at most MAX_DEPTH deep and a command holds at most MAX_TOKENS tokens;
past either, ParseError with code "LIMIT" (RFC 5530).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from imapd import utf7
from imapd.syntax import ParseError, SequenceSet

MAX_DEPTH = 16
MAX_TOKENS = 100_000
MAX_SET_ELEMENTS = 16_384
MAX_NUMBER = 2**32 - 1  # number, nz-number (RFC 3501 §9)
MAX_NUMBER64 = 2**63 - 1  # mod-sequence-value (RFC 7162 §7), number64 (RFC 9051)

_ATOM_STOP = frozenset(b' (){"')
_ATOM_CHARS = frozenset(range(0x21, 0x7F)) - frozenset(b'(){%*"\\]')  # ATOM-CHAR
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")}  # ASTRING-CHAR
_LIST_CHARS = _ASTRING_CHARS | {ord("%"), ord("*")}  # list-char
_BRACKET_PREFIXES = frozenset({"BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"})
_LONGEST_PREFIX = max(map(len, _BRACKET_PREFIXES))
# Possessive (*+, ++): the engine keeps no backtracking state per character, which made a
# long unterminated string cost memory and superlinear time (2 MiB of \" took 1.2 s).
_QUOTED_RE = re.compile(rb'"((?:[^"\\\x00\r\n]++|\\["\\])*+)"')
_LITERAL_RE = re.compile(rb"\{([0-9]{1,20})\+?\}\Z")
_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
_DATE_RE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\Z")
_DATE_TIME_RE = re.compile(
    r"( [0-9]|[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})\Z")
SYSTEM_FLAGS = {f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")}


@dataclass(frozen=True)
class Atom:
    text: str


@dataclass(frozen=True)
class String:
    data: bytes
    literal: bool = False
    binary: bool = False  # a literal8, `~{n}` (RFC 3516 §4.2): NUL allowed


@dataclass(frozen=True)
class Group:
    items: tuple


@dataclass(frozen=True)
class Bracketed:
    """`prefix[inner]suffix`, e.g. BODY.PEEK[HEADER.FIELDS (From)]<0.100>; `raw` is the
    token as written when it fits on one line (so an unquoted mailbox `body[x]` still reads)."""

    prefix: str
    inner: tuple
    suffix: str
    raw: bytes | None


Token = Atom | String | Group | Bracketed


def tokenize(parts: list[bytes], start: int = 0, *, partial: bool = False) -> list[Token]:
    """The tokens of a command from byte `start` of its first line on. `partial`: the
    command is cut short (the head of an APPEND whose literal is beginning), so lists still
    open at the end are closed there."""
    return _Lexer(parts, start, partial).run()


class _Lexer:
    def __init__(self, parts: list[bytes], start: int, partial: bool = False):
        self.partial = partial
        self.parts = parts
        self.index = 0
        self.line = parts[0]
        self.pos = start
        self.count = 0
        self.in_brackets = 0

    def run(self) -> list[Token]:
        return self._sequence(0, None)

    def _peek(self) -> int | None:
        return self.line[self.pos] if self.pos < len(self.line) else None

    def _sequence(self, depth: int, close: int | None) -> list[Token]:
        items: list[Token] = []
        while True:
            spaced = False
            while self._peek() == 0x20:
                self.pos += 1
                spaced = True
            c = self._peek()
            if c is None:
                if close is not None and not self.partial:
                    raise ParseError(f"missing {chr(close)!r}")
                return items
            if c == close:
                self.pos += 1
                return items
            if c == 0x29 or (c == 0x5D and self.in_brackets):
                raise ParseError(f"unexpected {chr(c)!r}")
            if items and not spaced:
                raise ParseError("arguments must be separated by a space")
            self.count += 1
            if self.count > MAX_TOKENS:
                raise ParseError("too many arguments", code="LIMIT")
            items.append(self._token(depth))

    def _token(self, depth: int) -> Token:
        c = self.line[self.pos]
        if c == 0x28:  # (
            if depth >= MAX_DEPTH:
                raise ParseError("lists nested too deeply", code="LIMIT")
            self.pos += 1
            return Group(tuple(self._sequence(depth + 1, 0x29)))
        if c == 0x22:  # "
            m = _QUOTED_RE.match(self.line, self.pos)
            if m is None:
                raise ParseError("malformed quoted string")
            self.pos = m.end()
            return String(_unescape(m.group(1)))
        if c == 0x7E and self.line[self.pos + 1:self.pos + 2] == b"{":  # ~{n}: literal8
            self.pos += 1
            literal = self._literal()
            return String(literal.data, literal=True, binary=True)
        if c == 0x7B:  # {
            return self._literal()
        return self._atom(depth)

    def _literal(self) -> String:
        """A literal `{n}` at the position: its bytes are the frame's next part."""
        m = _LITERAL_RE.match(self.line, self.pos)
        if m is None or self.index + 1 >= len(self.parts):
            raise ParseError("malformed literal")
        data = self.parts[self.index + 1]
        if len(data) != int(m.group(1)) or self.index + 2 >= len(self.parts):
            raise ParseError("malformed literal")
        self.index += 2
        self.line, self.pos = self.parts[self.index], 0
        return String(data, literal=True)

    def _atom(self, depth: int) -> Token:
        start = self.pos
        text = self._atom_chars()
        if not text:
            raise ParseError(f"unexpected {chr(self.line[self.pos])!r}")
        if self._peek() != 0x5B or text.upper() not in _BRACKET_PREFIXES:  # [
            return Atom(text)
        if depth >= MAX_DEPTH:
            raise ParseError("lists nested too deeply", code="LIMIT")
        first_line = self.index
        self.pos += 1
        self.in_brackets += 1
        inner = self._sequence(depth + 1, 0x5D)  # ]
        self.in_brackets -= 1
        suffix = self._atom_chars()
        raw = self.line[start:self.pos] if self.index == first_line else None
        return Bracketed(text.upper(), tuple(inner), suffix, raw)

    def _atom_chars(self) -> str:
        line, start, pos, end = self.line, self.pos, self.pos, len(self.line)
        while pos < end:
            c = line[pos]
            if c in _ATOM_STOP or (c == 0x5D and self.in_brackets) or \
                    (c == 0x5B and self._is_bracket_start(start, pos)):
                break
            if c < 0x21 or c > 0x7E:
                raise ParseError("invalid character in an atom")
            pos += 1
        text = line[start:pos].decode("ascii")
        self.pos = pos
        return text

    def _is_bracket_start(self, start: int, pos: int) -> bool:
        """Whether the `[` at `pos` opens a section: the atom so far is BODY, BINARY.PEEK...
        Only a prefix's length of it is ever looked at, so an atom of n `[` costs O(n), not
        O(n^2) as decoding the whole atom at each `[` did (64,000 of them took 4 s)."""
        return (0 < pos - start <= _LONGEST_PREFIX
                and self.line[start:pos].decode("ascii").upper() in _BRACKET_PREFIXES)


def _unescape(data: bytes) -> bytes:
    """A quoted string's value: `\\"` -> `"` and `\\\\` -> `\\`. Every `"` inside is escaped, so
    the backslash just before it is its escape and can go first; the backslashes left are
    escaped pairs. (A regex sub built a piece per escape: 3 MB for a 64 KB string.)"""
    if b"\\" not in data:
        return data
    return data.replace(b'\\"', b'"').replace(b"\\\\", b"\\")


class Args:
    """Reads a command's tokens in order."""

    def __init__(self, items):
        self.items = list(items)
        self.i = 0

    def more(self) -> bool:
        return self.i < len(self.items)

    def peek(self) -> Token | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self, what: str) -> Token:
        if self.i >= len(self.items):
            raise ParseError(f"missing {what}")
        tok = self.items[self.i]
        self.i += 1
        return tok

    def rest(self) -> list[Token]:
        out, self.i = self.items[self.i:], len(self.items)
        return out

    def done(self) -> None:
        if self.i < len(self.items):
            raise ParseError("unexpected extra arguments")


def atom(tok: Token | None, what: str) -> str:
    """An atom (ATOM-CHAR only), as written."""
    if not isinstance(tok, Atom) or not tok.text or not all(ord(c) in _ATOM_CHARS for c in tok.text):
        raise ParseError(f"{what} must be an atom")
    return tok.text


def group(tok: Token | None, what: str) -> tuple:
    if not isinstance(tok, Group):
        raise ParseError(f"{what} must be a parenthesized list")
    return tok.items


def astring(tok: Token | None, what: str, chars: frozenset = _ASTRING_CHARS) -> bytes:
    """An astring (atom, quoted string or literal) as bytes."""
    if isinstance(tok, String):
        if tok.binary:
            raise ParseError(f"{what} cannot be a literal8")  # RFC 3516 §4.2: APPEND's message only
        return tok.data
    if isinstance(tok, Atom):
        data = tok.text.encode("ascii")
    elif isinstance(tok, Bracketed) and tok.raw is not None:
        data = tok.raw
    else:
        raise ParseError(f"{what} must be a string")
    if not all(b in chars for b in data):
        raise ParseError(f"invalid character in {what}")
    return data


def text(tok: Token | None, what: str) -> str:
    """An astring decoded as UTF-8."""
    try:
        return astring(tok, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"{what} is not valid UTF-8") from exc


def mailbox(tok: Token | None, what: str = "mailbox name") -> str:
    """A mailbox name: modified UTF-7 decoded, INBOX in any case made "INBOX"."""
    return _decode_name(astring(tok, what), what)


def list_mailbox(tok: Token | None, what: str = "mailbox pattern") -> str:
    """A LIST pattern: like a mailbox name, `*` and `%` kept."""
    return _decode_name(astring(tok, what, _LIST_CHARS), what)


# Put in front of a name that is not valid modified UTF-7: a lone surrogate, which no
# mailbox name may hold (storage/names.py), so that such a name is a mailbox that cannot
# exist (SELECT, CREATE... answer NO) and such a LIST pattern matches nothing (OK, no
# results), as Dovecot answers, rather than BAD: the command's syntax is fine.
CANNOT_EXIST = "\udcff"


def _decode_name(data: bytes, what: str) -> str:
    try:
        # RFC 6855 §3: after ENABLE UTF8=ACCEPT, names are UTF-8 (imapd.utf7.NAMES_IN_UTF8)
        name = data.decode("utf-8") if utf7.NAMES_IN_UTF8.get() else utf7.decode(data)
    except (utf7.UTF7Error, UnicodeDecodeError):
        return CANNOT_EXIST + data.decode("ascii", "replace")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ParseError(f"control character in {what}")
    head, sep, tail = name.partition("/")
    if head.upper() == "INBOX":
        return "INBOX" + sep + tail
    return name


def number(tok: Token | None, what: str, low: int = 0, high: int = MAX_NUMBER) -> int:
    """A decimal number in low..high (RFC 3501 `number`; no sign, leading zeros allowed)."""
    if not isinstance(tok, Atom) or not tok.text.isascii() or not tok.text.isdigit() or len(tok.text) > 20:
        raise ParseError(f"{what} must be a number")
    value = int(tok.text)
    if not low <= value <= high:
        raise ParseError(f"{what} out of range")
    return value


def sequence_set(tok: Token | None, what: str = "sequence set") -> SequenceSet:
    """`1`, `1:5`, `*`, `5:*`, `1,3:4,10:*`: numbers 1..2^32-1 (RFC 3501 `sequence-set`);
    `$`, the saved search result, alone (RFC 5182 §3 `seq-last-command`)."""
    if not isinstance(tok, Atom):
        raise ParseError(f"{what} must be an atom")
    if tok.text == "$":
        return SequenceSet((), saved=True)
    elements = tok.text.split(",")
    if len(elements) > MAX_SET_ELEMENTS:
        raise ParseError(f"{what} has too many elements", code="LIMIT")
    ranges = []
    for element in elements:
        low, colon, high = element.partition(":")
        first = _seq_number(low, what)
        ranges.append((first, _seq_number(high, what) if colon else first))
    return SequenceSet(tuple(ranges))


def is_sequence_set(tok: Token) -> bool:
    return isinstance(tok, Atom) and tok.text[:1] in set("0123456789*$")


def _seq_number(text: str, what: str) -> int | None:
    if text == "*":
        return None
    if not (text.isascii() and text.isdigit()) or text[0] == "0" or len(text) > 10 or int(text) > MAX_NUMBER:
        raise ParseError(f"invalid {what}")
    return int(text)


def flag(tok: Token | None, what: str = "flag") -> str:
    """A flag: a system flag (its case made standard), `\\extension` or a keyword atom."""
    if isinstance(tok, Atom) and tok.text.startswith("\\"):
        name = atom(Atom(tok.text[1:]), what)
        return SYSTEM_FLAGS.get(tok.text.upper(), "\\" + name)
    return atom(tok, what)


def keyword(tok: Token | None, what: str = "keyword") -> str:
    return atom(tok, what)


def flag_list(tok: Token | None, what: str = "flag list") -> tuple[str, ...]:
    return tuple(flag(item) for item in group(tok, what))


def date(tok: Token | None, what: str = "date") -> datetime.date:
    """`d-Mon-yyyy`, bare or quoted (RFC 3501 `date`)."""
    if isinstance(tok, Atom) or (isinstance(tok, String) and not tok.literal):
        raw = tok.text if isinstance(tok, Atom) else tok.data.decode("latin-1")
        m = _DATE_RE.match(raw)
        if m and m.group(2).upper() in _MONTHS:
            try:
                return datetime.date(int(m.group(3)), _MONTHS[m.group(2).upper()], int(m.group(1)))
            except ValueError:
                pass
    raise ParseError(f"invalid {what}")


def date_time(tok: Token | None, what: str = "date-time") -> datetime.datetime:
    """`"dd-Mon-yyyy hh:mm:ss +zzzz"` (RFC 3501 `date-time`; the day may be space-padded)."""
    if isinstance(tok, String) and not tok.literal:
        m = _DATE_TIME_RE.match(tok.data.decode("latin-1"))
        if m and m.group(2).upper() in _MONTHS:
            day, _, year, hour, minute, second, sign, zh, zm = m.groups()
            if int(zm) < 60 and int(zh) < 24:
                offset = datetime.timedelta(hours=int(zh), minutes=int(zm))
                try:
                    return datetime.datetime(
                        int(year), _MONTHS[m.group(2).upper()], int(day), int(hour), int(minute), int(second),
                        tzinfo=datetime.timezone(-offset if sign == "-" else offset))
                except ValueError:
                    pass
    raise ParseError(f"invalid {what}")
