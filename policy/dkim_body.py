"""A message's DKIM inputs computed as its bytes pass, so that signing never holds the
message: its header section (kept, bounded) and the SHA-256 of its body in relaxed
canonicalization (RFC 6376 §3.4.4, §3.7), hashed chunk by chunk.

Relaxed body canonicalization, as dkimpy applies it to a whole body (policy/dkim.py signs
with dkimpy, and a verifier must get the same hash):
- a line end is CRLF; a bare LF counts as one (dkimpy's parser reads `\\r?\\n`);
- whitespace (SP, HTAB) before a line end is removed, any other run of it becomes one SP;
- empty lines at the end are removed; a non-empty body ends with exactly one CRLF, an
  empty one hashes as the empty string.

Streamed, each of these depends on bytes not seen yet, so three things are carried from
one chunk to the next, each of bounded size: a trailing whitespace run (as one SP: any run
canonicalizes as a single one), a trailing CR (it may be the start of a CRLF), and the
number of line ends not yet hashed (they vanish if only empty lines follow). The rest of
a chunk is canonicalized with the same two substitutions dkimpy uses, so the work is
linear in the message and memory is a few chunks whatever the body holds.
"""

from __future__ import annotations

import hashlib
import re

MAX_HEADER_HELD = 4 << 20  # the submission agent refuses a header over 1 MiB long before this
PIECE = 1 << 14  # digested in pieces of at most this: each is copied a few times on its way,
# and re.sub holds one small object per whitespace run of it (~28 bytes of the piece each)
_LINE_END = re.compile(rb"\r?\n")
_WSP = re.compile(rb"[\t ]+")  # greedy and never backtracks: linear


class RelaxedBodyHash:
    """SHA-256 of a body in relaxed canonicalization, fed in pieces cut anywhere."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._carry = b""  # b"", b" ", b"\r" or b" \r": the undecided end of what came so far
        self._line_ends = 0  # CRLFs seen after the last hashed content, not yet hashed
        self._content = False  # anything other than line ends hashed
        self._done = False

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise RuntimeError("the body hash is finished")
        if not data:
            return
        if len(data) > PIECE:  # each piece is copied a few times on its way: keep them small
            view = memoryview(data)
            for start in range(0, len(view), PIECE):
                self.update(view[start:start + PIECE])
            return
        text = self._carry + bytes(data)
        # The undecided end: a whitespace run and a CR after it (found from the right, not
        # by a regex anchored at the end, which would try every start: quadratic).
        end = len(text) - 1 if text.endswith(b"\r") else len(text)
        cut = len((text if end == len(text) else text[:end]).rstrip(b" \t"))
        tail = text[cut:]
        # A whitespace run canonicalizes to one SP, whatever its length: carry just that.
        self._carry = (b" " if tail[:1] in (b" ", b"\t") else b"") + (b"\r" if tail.endswith(b"\r") else b"")
        self._canonical(text[:cut])

    def digest(self) -> bytes:
        """The hash of the whole body (feeding ends here)."""
        if not self._done:
            self._canonical(self._carry)  # at the very end, no line end follows: kept as is
            self._carry = b""
            if self._content:
                self._hash.update(b"\r\n")  # trailing empty lines gone, one CRLF at the end
            self._done = True
        return self._hash.digest()

    def _canonical(self, text: bytes) -> None:
        if not text:
            return
        if text.count(b"\n") != text.count(b"\r\n"):  # a bare LF (the SMTP core refuses them)
            text = _LINE_END.sub(b"\r\n", text)
        # dkimpy strips `[\t ]+\r\n` and then compresses runs; compressing first and then
        # dropping the one SP left before a CRLF is the same, and linear.
        text = _WSP.sub(b" ", text).replace(b" \r\n", b"\r\n")
        run = len(text)
        while text.endswith(b"\r\n", 0, run):
            run -= 2
        if run == 0:  # only line ends: they count only if content follows them
            self._line_ends += len(text) // 2
            return
        if self._line_ends:
            self._hash.update(b"\r\n" * self._line_ends)
        self._hash.update(memoryview(text)[:run])
        self._line_ends = (len(text) - run) // 2
        self._content = True


class MessageDigest:
    """A message fed in pieces: its header section kept (each field with its CRLF, without
    the empty line), its body hashed (RelaxedBodyHash). `header` is None when the header
    section grew past MAX_HEADER_HELD (the message is then not signed)."""

    def __init__(self) -> None:
        self.body = RelaxedBodyHash()
        self._held: bytearray | None = bytearray()
        self._header: bytes | None = None
        self._scanned = 0  # no header end starts before this position

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._header is None and len(data) > PIECE:  # a whole message: only its header is held
            view = memoryview(data)
            for start in range(0, len(view), PIECE):
                self.update(view[start:start + PIECE])
            return
        if self._header is not None:
            self.body.update(data)
            return
        if self._held is None:
            return  # the header was too long: nothing more is kept
        self._held += data
        if self._held.startswith(b"\r\n"):  # no header field at all
            self._split(0, 2)
            return
        end = self._held.find(b"\r\n\r\n", self._scanned)
        if end >= 0:
            self._split(end + 2, end + 4)
        elif len(self._held) > MAX_HEADER_HELD:
            self._held = None
        else:
            self._scanned = max(0, len(self._held) - 3)

    @property
    def header(self) -> bytes | None:
        """The header section, once the message is complete."""
        if self._header is None and self._held is not None:
            self._header = bytes(self._held)  # a message that is all header: its body is empty
            self._held = None
        return self._header

    def _split(self, header_end: int, body_start: int) -> None:
        held, self._held = self._held, None
        self._header = bytes(held[:header_end])
        self.body.update(memoryview(held)[body_start:])
