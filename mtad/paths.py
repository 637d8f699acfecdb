"""The arguments of MAIL and RCPT: a path and ESMTP parameters (RFC 5321 §4.1.2, §4.1.1.11).

    mail-arg = "FROM:" Reverse-path [SP Mail-parameters]
    rcpt-arg = "TO:" Forward-path [SP Rcpt-parameters]
    esmtp-param = esmtp-keyword ["=" esmtp-value]

What is taken: "<>" (the null reverse-path) or "<local@domain>", a quoted local part with
its backslash escapes included, at most MAX_PATH octets with the brackets (§4.5.3.1.3).
What is not: source routes ("<@relay:user@domain>", §4.1.2 says to accept and ignore them;
they are relay tricks here), a bare local part, whitespace in the path. Keywords are
upper-cased; a value may hold UTF-8 (RFC 6531 §3.3). Checking that a parameter is known is
the session's job. One pass over the argument: linear whatever the quoting.

The DSN parameters' values (RFC 3461 §4): RET, ENVID, NOTIFY and ORCPT, the last two in
xtext (§4: "+" and two upper-case hex digits for any octet outside "!".."~", "+" and "=").
A decoded ENVID or ORCPT address holding a control character is refused: both are written
into delivery status reports (RFC 3464), whose fields they must not break.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets
# esmtp-keyword and esmtp-value (any printable but "=" and SP; UTF-8 beyond ASCII).
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~\u0080-\U0010FFFF]+))?$")
# RFC 3461 §4: xtext = *( xchar / hexchar ); beyond ASCII only with SMTPUTF8 (RFC 6533 §3).
_XTEXT = re.compile(r"(?:[!-*,-<>-~\u0080-\U0010FFFF]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # an atom (RFC 3461 §4.2)
_XTEXT_SAFE = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")


class PathArgument(NamedTuple):
    address: str  # "local@domain", or "" for the null path
    params: dict[str, str | None]  # KEYWORD -> value (None for a keyword alone)


def parse_path_argument(arg: str, keyword: str) -> PathArgument | None:
    """PathArgument from "FROM:<path> PARAMS" (keyword "FROM:") or "TO:<path> ..." (keyword
    "TO:"), or None when it is not one we take."""
    if not arg[:len(keyword)].upper() == keyword:
        return None
    rest = arg[len(keyword):].lstrip()
    if not rest.startswith("<"):
        return None
    close = _closing_bracket(rest)
    if close is None or close + 1 > MAX_PATH:
        return None
    path = rest[1:close]
    params: dict[str, str | None] = {}
    for word in rest[close + 1:].split():
        m = _PARAM.match(word)
        if not m or m.group(1).upper() in params:
            return None  # RFC 3461 §4: a parameter given twice is a syntax error (501)
        params[m.group(1).upper()] = m.group(2)
    if path and (path.startswith("@") or "@" not in path or any(c.isspace() for c in path)):
        return None  # source routes and bare local parts are not addresses we take
    return PathArgument(path, params)


def _closing_bracket(text: str) -> int | None:
    """Index of the ">" closing the path, honouring quoted local parts."""
    quoted = escaped = False
    for i, c in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        elif c == "<" and not quoted:
            return None
    return None


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses (ValueError)."""
    return text.isascii() and text.isdigit()


def decode_xtext(text: str) -> str | None:
    """The text an xtext value stands for, or None if it is not xtext (RFC 3461 §4)."""
    if not _XTEXT.fullmatch(text):
        return None
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)


def encode_xtext(text: str) -> str:
    """xtext for `text` (RFC 3461 §4), e.g. to pass ENVID and ORCPT on to the next hop;
    characters beyond ASCII are kept (RFC 6533 §3, for a next hop that offers SMTPUTF8)."""
    return "".join(c if ord(c) in _XTEXT_SAFE or ord(c) > 0x7F else f"+{ord(c):02X}" for c in text)


def parse_ret(value: str | None) -> str | None:
    """"FULL" or "HDRS" (RFC 3461 §4.3), or None if it is neither."""
    word = (value or "").upper()
    return word if word in ("FULL", "HDRS") else None


def parse_envid(value: str | None) -> str | None:
    """The decoded ENVID (RFC 3461 §4.4): printable ASCII, at most MAX_ENVID; else None."""
    if value is None or len(value) > MAX_ENVID:
        return None
    decoded = decode_xtext(value)
    if not decoded or not all(" " <= c <= "~" for c in decoded):
        return None
    return decoded


def parse_notify(value: str | None) -> tuple[str, ...] | None:
    """("NEVER",) or some of SUCCESS, FAILURE, DELAY, each once (RFC 3461 §4.1); else None."""
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",)
    if not all(word in NOTIFY_WORDS for word in words) or len(set(words)) != len(words):
        return None  # NEVER with others, an empty item, an unknown word, a word twice
    return tuple(words)


def parse_orcpt(value: str | None, utf8: bool = False) -> str | None:
    """"addr-type;address" with the address decoded (RFC 3461 §4.2), or None."""
    if value is None or len(value) > MAX_ORCPT:
        return None
    addr_type, semicolon, xtext = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or (not utf8 and not xtext.isascii()):
        return None
    address = decode_xtext(xtext)
    if not address or any(c < " " or c == "\x7f" or "\x80" <= c <= "\x9f" for c in address):
        return None
    return f"{addr_type};{address}"
