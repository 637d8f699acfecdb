"""A MIME part's body with its content transfer encoding undone, for FETCH BINARY[...] and
BINARY.SIZE[...] (RFC 3516 §4.2, RFC 2045 §6). Pure functions over bytes.

    decode(body, encoding) -> bytes     UnknownEncodingError for an encoding we cannot undo

- 7bit, 8bit, binary (and no Content-Transfer-Encoding at all) are the bytes as stored.
- base64: characters outside the alphabet are ignored (RFC 2045 §6.8: line breaks, and
  whatever a broken sender put in); the data ends at the first `=`; a last group of 2 or
  3 characters decodes as if padded, a lone last character is dropped.
- quoted-printable: trailing spaces and tabs of each line are dropped (RFC 2045 §6.7 rule
  3: a transport may have added them), `=` at the end of a line joins it to the next (a
  soft line break), `=XX` is the octet XX; a `=` not followed by two hex digits stays as
  it is (rule 1 lets a decoder keep it). Line ends come out as CRLF.
- anything else (x-uuencode, a misspelling): UnknownEncodingError, answered
  `NO [UNKNOWN-CTE]` (RFC 3516 §4.3).
"""

from __future__ import annotations

import binascii
import re

IDENTITY = frozenset({"", "7bit", "8bit", "binary"})
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|\Z)")


class UnknownEncodingError(ValueError):
    """A Content-Transfer-Encoding this server does not decode."""


def decode(body: bytes, encoding: str | None) -> bytes:
    name = (encoding or "").strip().lower()
    if name in IDENTITY:
        return body
    if name == "base64":
        return decode_base64(body)
    if name == "quoted-printable":
        return decode_quoted_printable(body)
    raise UnknownEncodingError(name)


def decode_base64(body: bytes) -> bytes:
    chars = _NOT_BASE64.sub(b"", body.split(b"=", 1)[0])
    extra = len(chars) % 4
    if extra == 1:
        chars = chars[:-1]
    elif extra:
        chars += b"=" * (4 - extra)
    return binascii.a2b_base64(chars)


def decode_quoted_printable(body: bytes) -> bytes:
    out: list[bytes] = []
    for m in _LINE.finditer(body):
        line, end = m.group(1).rstrip(b" \t"), m.group(2)
        if not line and not end:
            break  # finditer's empty match at the very end
        if line.endswith(b"="):
            out.append(binascii.a2b_qp(line[:-1]))
        else:
            out.append(binascii.a2b_qp(line) + (b"\r\n" if end else b""))
    return b"".join(out)
