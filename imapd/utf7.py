"""Modified UTF-7 for IMAP mailbox names (RFC 3501 §5.1.3), strict in both directions.

Printable US-ASCII (0x20-0x7e) stands for itself, except "&", written "&-". Anything else
is UTF-16BE in modified BASE64 (RFC 2045 alphabet with "," for "/", no "=" padding) between
"&" and "-". Decoding refuses what a careful encoder never writes, so every name has one
spelling on the wire: bytes outside printable ASCII, an unterminated shift, characters
outside the alphabet, leftover bits that are not zero or make a partial 16-bit unit,
broken surrogate pairs, printable ASCII inside a shift, and two shifts back to back
("-&" null shift). Twisted's "imap4-utf-7" codec accepts all of those, hence this module.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Once a client has sent ENABLE UTF8=ACCEPT (RFC 6855 §3), its mailbox names are UTF-8 both
# ways instead: the session says so around parsing and running each of its commands, and
# imapd.tokens (names read) and imapd.responses (names written) ask here. A context
# variable, so that the many places that read or write a name need not carry the flag.
NAMES_IN_UTF8: ContextVar[bool] = ContextVar("names_in_utf8", default=False)


@contextmanager
def utf8_names(on: bool) -> Iterator[None]:
    token = NAMES_IN_UTF8.set(on)
    try:
        yield
    finally:
        NAMES_IN_UTF8.reset(token)

_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


class UTF7Error(ValueError):
    """The bytes are not a valid modified UTF-7 mailbox name."""


def encode(name: str) -> bytes:
    """The wire form of a mailbox name."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            pending.append(ch)
    flush()
    return bytes(out)


def decode(data: bytes) -> str:
    """The mailbox name written as `data`; UTF7Error if it is not strict modified UTF-7."""
    out: list[str] = []
    i, n = 0, len(data)
    after_shift = False  # the previous thing was a base64 run: "&" may not follow at once
    while i < n:
        byte = data[i]
        if not 0x20 <= byte <= 0x7E:
            raise UTF7Error(f"byte 0x{byte:02x} is not printable US-ASCII")
        if byte != 0x26:  # "&"
            out.append(chr(byte))
            i += 1
            after_shift = False
            continue
        end = data.find(b"-", i + 1)
        if end < 0:
            raise UTF7Error("unterminated shift to base64")
        if end == i + 1:
            out.append("&")
            i = end + 1
            after_shift = False
            continue
        if after_shift:
            raise UTF7Error("null shift between base64 runs")
        out.append(_decode_run(data[i + 1:end]))
        i = end + 1
        after_shift = True
    return "".join(out)


def _decode_run(run: bytes) -> str:
    if any(b not in _ALPHABET for b in run):
        raise UTF7Error("character outside the modified base64 alphabet")
    bits = len(run) * 6
    if bits % 16 >= 6:
        raise UTF7Error("base64 run ends inside a UTF-16 unit")
    padded = run.replace(b",", b"/") + b"=" * (-len(run) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise UTF7Error("malformed base64 run") from exc
    # The leftover bits (fewer than 6) must be zero: one spelling per name.
    if bits % 16 and (_ALPHABET_INDEX[run[-1]] & ((1 << (bits % 16)) - 1)):
        raise UTF7Error("non-zero padding bits in a base64 run")
    try:
        text = raw.decode("utf-16-be")
    except UnicodeDecodeError as exc:
        raise UTF7Error("invalid UTF-16 in a base64 run") from exc
    if any(0x20 <= ord(ch) <= 0x7E for ch in text):
        raise UTF7Error("printable US-ASCII encoded in base64")
    return text


_ALPHABET_INDEX = {c: i for i, c in enumerate(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")}
