"""The header section of a submitted message, read before its body (mtad/submission.py):
where it ends, its fields, the addresses of its From: field, and the fields a submission
server adds when the client left them out (RFC 6409 §8.2 Date:, §8.3 Message-ID:).

HeaderBlock collects a message's first bytes until the empty line that ends the header
section (RFC 5322 §2.1), bounded by the SMTP core's own header limit (mtad/readers.py
MAX_HEADER: the core passes no more than that of a header on). It looks at each byte once,
however the data is cut.

from_addresses() reads a From: field's mailbox-list (RFC 5322 §3.4, §3.6.2) in one pass of
its own: quoted strings with their escapes, comments (nested), one angle-addr per mailbox.
It is strict on purpose, since what it returns decides whose name a user may send in:
anything it cannot read with certainty (groups, an unbalanced quote, comment or bracket, a
mailbox with two angle-addrs) is None, and the message is refused. The stdlib parsers were
no fit: email.utils.getaddresses reads `alice@a)<bob@b>` as three addresses (CVE-2023-27043
class), and email.headerregistry recurses once per "(" and dies on a thousand of them.
"""

from __future__ import annotations

import email.utils
import secrets
import time

from mtad.readers import MAX_HEADER, SPOOL_CHUNK

# The most a HeaderBlock holds: the core passes on a header of at most MAX_HEADER, in
# chunks of about SPOOL_CHUNK.
MAX_HELD = MAX_HEADER + 2 * SPOOL_CHUNK


class HeaderTooBigError(Exception):
    pass


class HeaderBlock:
    """The header section, collected chunk by chunk: `feed` until it says the header is
    complete (then `header` holds it, without the empty line, and `rest` what followed),
    or `finish` at the end of a message that has no body."""

    def __init__(self) -> None:
        self._held = bytearray()
        self._scanned = 0  # no header end starts before this position
        self.complete = False
        self.header = b""  # each line with its CRLF; the empty line not included
        self.rest = b""  # the empty line, if any, and what came after it

    def feed(self, data: bytes) -> bool:
        if self.complete:
            raise RuntimeError("the header is complete")
        self._held += data
        if self._held.startswith(b"\r\n"):  # no header field at all
            return self._split(0)
        end = self._held.find(b"\r\n\r\n", self._scanned)
        if end >= 0:
            return self._split(end + 2)
        self._scanned = max(0, len(self._held) - 3)
        if len(self._held) > MAX_HELD:
            raise HeaderTooBigError()
        return False

    def finish(self) -> None:
        """The message ended inside its header: all of it is header."""
        if not self.complete:
            self._split(len(self._held))

    def _split(self, at: int) -> bool:
        self.header, self.rest = bytes(self._held[:at]), bytes(self._held[at:])
        self._held.clear()
        self.complete = True
        return True


def fields(header: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field; UTF-8 (RFC 6532), any byte that is
    not kept as a surrogate escape. A line that is neither a field nor a continuation is
    given the name "" (RFC 5322 has none such; a reader may guess at it, so it counts)."""
    out: list[tuple[str, str]] = []
    for line in header.decode("utf-8", "surrogateescape").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and out:
            name, value = out[-1]
            out[-1] = (name, value + line)
            continue
        name, colon, value = line.partition(":")
        # "From :" is the obsolete syntax (RFC 5322 §4.5.3), still read by some clients.
        out.append((name.rstrip(" \t").lower(), value) if colon else ("", line))
    return out


def from_addresses(value: str) -> list[str] | None:
    """The addr-spec of each mailbox of a From: field's value, or None if it is not a
    mailbox-list read with certainty (see the module's docstring)."""
    addresses: list[str] = []
    mailbox: list[str] = []  # the current mailbox's characters outside comments, quotes kept
    angle: list[str] | None = None  # inside <...>
    angles = 0  # angle-addrs in the current mailbox
    quoted = escaped = False
    depth = 0  # comment nesting

    def end_mailbox() -> bool:
        text = "".join(mailbox).strip()
        if angles == 0:
            if not text or '"' in text or " " in text.strip():
                return False
            addresses.append(text)
        elif angles > 1:
            return False
        return True

    for c in value + ",":
        if escaped:
            escaped = False
            (angle if angle is not None else mailbox).append(c)
            continue
        if c == "\\" and (quoted or depth):
            escaped = True
            if quoted:
                (angle if angle is not None else mailbox).append(c)
            continue
        if depth:
            depth += {"(": 1, ")": -1}.get(c, 0)
            continue
        if quoted:
            quoted = c != '"'
            (angle if angle is not None else mailbox).append(c)
            continue
        if c == '"':
            quoted = True
            (angle if angle is not None else mailbox).append(c)
        elif c == "(":
            depth = 1
        elif c == ")":
            return None
        elif angle is not None:
            if c == ">":
                address = "".join(angle).strip()
                if not address:
                    return None
                addresses.append(address)
                angle, angles = None, angles + 1
            elif c in "<,:;":
                return None
            else:
                angle.append(c)
        elif c == "<":
            angle = []
        elif c in ">:;":
            return None  # a stray bracket; a group (RFC 6854) is not taken here
        elif c == ",":
            if not end_mailbox():
                return None
            mailbox, angles = [], 0
        elif angles:
            if not c.isspace():
                return None  # something after the angle-addr
        else:
            mailbox.append(c)
    if quoted or depth or angle is not None or not addresses:
        return None
    return addresses


def missing_fields(header_fields: list[tuple[str, str]], hostname: str, now: float | None = None) -> bytes:
    """The Date: and Message-ID: fields a message lacks (RFC 6409 §8.2, §8.3), as lines."""
    names = {name for name, _ in header_fields}
    added = b""
    if "date" not in names:
        added += f"Date: {email.utils.formatdate(now if now is not None else time.time(), localtime=True)}\r\n".encode()
    if "message-id" not in names:
        added += f"Message-ID: <{int(time.time() * 1000)}.{secrets.token_hex(8)}@{hostname}>\r\n".encode()
    return added
