"""IMAP response values as bytes (RFC 3501 §4 data formats, §9 formal syntax): atoms,
quoted strings, literals, NIL, parenthesized lists, flag lists, the INTERNALDATE
date-time and mailbox names in modified UTF-7 (§5.1.3, imapd.utf7).

Every function returns bytes ready to be put on the wire; none writes anything. A string
is sent quoted when it can be (RFC 3501 §4.3: no CR, LF or NUL, 7-bit, `\\` and `"`
escaped) and short enough to keep response lines readable (MAX_QUOTED octets), else as a
literal `{n}\\r\\n` + octets. Octets go out as given, NUL included (RFC 3501's CHAR8
excludes NUL even in literals; Dovecot rewrites NUL as 0x80, we send what is stored).

INTERNALDATE is written in UTC (`+0000`): the store keeps the instant only, and a fixed
zone makes the same message answer the same string on every node and under any server
TZ or daylight-saving change, so a client's cache never sees a date "change".
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable

from imapd import utf7

MAX_QUOTED = 1000  # longer strings go as literals

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# One regex search per value, not a Python loop over its octets: FETCH ENVELOPE of 1,000
# messages formats ~14,000 strings (bench/imap.py). RFC 3501 §4.3: a quoted string carries
# no CR, LF, NUL or 8-bit octet. §9: ASTRING-CHAR is any 7-bit CHAR but the atom-specials
# `(){ %*"\` and CTLs ("]" is allowed, as resp-specials are).
_QUOTED_BAD = re.compile(rb"[\r\n\0\x80-\xff]")
_ASTRING_BAD = re.compile(rb'[(){ %*"\\\x00-\x1f\x7f-\xff]')
_NEEDS_ESCAPE = re.compile(rb'["\\]')
_MIN_DATE = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
_MAX_DATE = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc).timestamp()

NIL = b"NIL"


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def number(n: int) -> bytes:
    return b"%d" % n


def literal(data: bytes) -> bytes:
    """`{n}\\r\\n` followed by the octets (RFC 3501 §4.3). Copies `data` once."""
    return b"{%d}\r\n%b" % (len(data), data)


def quoted(value: str | bytes) -> bytes:
    """A quoted string; ValueError for what a quoted string cannot carry (use string())."""
    data = _bytes(value)
    if _QUOTED_BAD.search(data):
        raise ValueError("CR, LF, NUL and 8-bit octets need a literal")
    return _quote(data)


def _quote(data: bytes) -> bytes:
    if _NEEDS_ESCAPE.search(data):
        data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + data + b'"'


def string(value: str | bytes) -> bytes:
    """A string, quoted when it can be, else a literal. str is sent as UTF-8."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(data) > MAX_QUOTED or _QUOTED_BAD.search(data):
        return literal(data)
    return _quote(data)


def nstring(value: str | bytes | None) -> bytes:
    return NIL if value is None else string(value)


def astring(value: str | bytes) -> bytes:
    """An atom when the value is one (and not NIL, which a reader may take for nil), else a string."""
    data = _bytes(value)
    if data and len(data) <= MAX_QUOTED and data.upper() != NIL and not _ASTRING_BAD.search(data):
        return data
    return string(data)


def plist(items: Iterable[bytes]) -> bytes:
    """A parenthesized list of already formatted values."""
    return b"(" + b" ".join(items) + b")"


def flag_list(flags: Iterable[str]) -> bytes:
    """`(\\Seen $Forwarded)`. Flags are atoms (the store accepts no others), sent as they are."""
    return plist(f.encode("ascii") for f in flags)


def date_time(timestamp: float) -> bytes:
    """RFC 3501 date-time, `"05-Mar-2026 14:07:09 +0000"`, in UTC (see the module docstring);
    instants beyond what 4-digit years can write are clamped."""
    moment = datetime.datetime.fromtimestamp(min(max(timestamp, _MIN_DATE), _MAX_DATE), datetime.timezone.utc)
    text = f"{moment.day:02d}-{_MONTHS[moment.month - 1]}-{moment.year:04d} {moment:%H:%M:%S} +0000"
    return b'"' + text.encode("ascii") + b'"'


def mailbox(name: str) -> bytes:
    """A mailbox name as IMAP4rev1 sends it: modified UTF-7 (RFC 3501 §5.1.3), as an astring;
    to a client that enabled UTF8=ACCEPT, UTF-8, quoted (RFC 6855 §3 lets a quoted string
    carry UTF-8 then)."""
    if not utf7.NAMES_IN_UTF8.get():
        return astring(utf7.encode(name))
    data = name.encode("utf-8")
    if data.isascii() or len(data) > MAX_QUOTED or any(b in b"\r\n\0" for b in data):
        return astring(data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
