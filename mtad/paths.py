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
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets
# esmtp-keyword and esmtp-value (any printable but "=" and SP; UTF-8 beyond ASCII).
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~\u0080-\U0010FFFF]+))?$")


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
        if not m:
            return None
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
