"""A message's DKIM inputs computed as its bytes pass, so that neither signing nor
verifying ever holds the message: its header section (kept, bounded) and the hashes of its
body in the canonicalizations DKIM defines (RFC 6376 §3.4.3 simple, §3.4.4 relaxed, §3.7),
hashed chunk by chunk.

Body canonicalization, as dkimpy applies it to a whole body (policy/dkim.py signs with
dkimpy, policy/dkim_verify.py verifies with it, so the streamed hash must be the same):
- a line end is CRLF; a bare LF counts as one (dkimpy's parser reads `\\r?\\n`);
- relaxed only: whitespace (SP, HTAB) before a line end is removed, any other run of it
  becomes one SP;
- empty lines at the end are removed; a non-empty body ends with exactly one CRLF. An empty
  body hashes as the empty string (relaxed) or as one CRLF (simple).
- l= (RFC 6376 §3.5): only the first `limit` bytes of the canonical body are hashed.

Streamed, each of these depends on bytes not seen yet, so three things are carried from
one chunk to the next, each of bounded size: a trailing whitespace run (relaxed: as one SP,
any run canonicalizes as a single one), a trailing CR (it may be the start of a CRLF), and
the number of line ends not yet hashed (they vanish if only empty lines follow). The rest of
a chunk is canonicalized with the same two substitutions dkimpy uses, so the work is
linear in the message and memory is a few chunks whatever the body holds. One
canonicalization feeds every hash that asks for it (BodyHashes): a message with several
signatures is canonicalized at most twice (simple and relaxed).
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple
MAX_HEADER_HELD = 4 << 20  # the submission agent refuses a header over 1 MiB long before this
PIECE = 1 << 14  # digested in pieces of at most this: each is copied a few times on its way,
# and re.sub holds one small object per whitespace run of it (~28 bytes of the piece each)
_LINE_END = re.compile(rb"\r?\n")
_WSP = re.compile(rb"[\t ]+")  # greedy and never backtracks: linear


class BodySpec(NamedTuple):
    """What one signature asks to be hashed of the body."""
    canonicalization: str  # "simple" or "relaxed"
    algorithm: str  # a hashlib name: "sha256" (or "sha1")
    limit: int | None = None  # l=: the number of canonical bytes hashed, None for all


class _Sink:
    """One hash of the canonical body, cut at `limit` bytes."""

    def __init__(self, algorithm: str, limit: int | None):
        self.hash = hashlib.new(algorithm)
        self.left = limit  # bytes still to hash, None: all

    def update(self, data) -> None:
        if self.left is None:
            self.hash.update(data)
        elif self.left > 0:
            data = memoryview(data)[:self.left]
            self.hash.update(data)
            self.left -= len(data)


class CanonicalBody:
    """A body canonicalized (simple or relaxed) as it is fed in pieces cut anywhere, each
    canonical piece handed to every sink."""

    def __init__(self, relaxed: bool, sinks: list[_Sink]):
        self._relaxed = relaxed
        self._sinks = sinks
        self._carry = b""  # b"", b" ", b"\r" or b" \r": the undecided end of what came so far
        self._line_ends = 0  # CRLFs seen after the last hashed content, not yet hashed
        self._content = False  # anything other than line ends hashed
        self.done = False

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self.done:
            raise RuntimeError("the body hash is finished")
        if not data:
            return
        if len(data) > PIECE:  # each piece is copied a few times on its way: keep them small
            view = memoryview(data)
            for start in range(0, len(view), PIECE):
                self.update(view[start:start + PIECE])
            return
        text = self._carry + bytes(data)
        # The undecided end: a whitespace run (relaxed) and a CR after it (found from the
        # right, not by a regex anchored at the end, which would try every start: quadratic).
        end = len(text) - 1 if text.endswith(b"\r") else len(text)
        if self._relaxed:
            cut = len((text if end == len(text) else text[:end]).rstrip(b" \t"))
        else:
            cut = end
        tail = text[cut:]
        # A whitespace run canonicalizes to one SP, whatever its length: carry just that.
        self._carry = (b" " if tail[:1] in (b" ", b"\t") else b"") + (b"\r" if tail.endswith(b"\r") else b"")
        self._canonical(text[:cut])

    def finish(self) -> None:
        """The end of the body: what was held back is decided and hashed."""
        if self.done:
            return
        self._canonical(self._carry)  # at the very end, no line end follows: kept as is
        self._carry = b""
        if self._content or not self._relaxed:
            # Trailing empty lines gone, one CRLF at the end; simple turns an empty body
            # into one CRLF (RFC 6376 §3.4.3), relaxed leaves it empty (§3.4.4).
            self._emit(b"\r\n")
        self.done = True

    def _emit(self, data) -> None:
        for sink in self._sinks:
            sink.update(data)

    def _canonical(self, text: bytes) -> None:
        if not text:
            return
        if text.count(b"\n") != text.count(b"\r\n"):  # a bare LF (the SMTP core refuses them)
            text = _LINE_END.sub(b"\r\n", text)
        if self._relaxed:
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
            self._emit(b"\r\n" * self._line_ends)
        self._emit(memoryview(text)[:run])
        self._line_ends = (len(text) - run) // 2
        self._content = True


class RelaxedBodyHash:
    """SHA-256 of a body in relaxed canonicalization, fed in pieces cut anywhere."""

    def __init__(self) -> None:
        self._sink = _Sink("sha256", None)
        self._body = CanonicalBody(True, [self._sink])

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._body.update(data)

    def digest(self) -> bytes:
        """The hash of the whole body (feeding ends here)."""
        self._body.finish()
        return self._sink.hash.digest()


class BodyHashes:
    """The body hashes a set of signatures ask for (BodySpec each), computed in one pass."""

    def __init__(self, specs) -> None:
        self._sinks: dict[BodySpec, _Sink] = {}
        bodies: dict[str, list[_Sink]] = {}
        for spec in dict.fromkeys(specs):
            sink = self._sinks[spec] = _Sink(spec.algorithm, spec.limit)
            bodies.setdefault(spec.canonicalization, []).append(sink)
        self._bodies = [CanonicalBody(name == "relaxed", sinks) for name, sinks in bodies.items()]

    def update(self, data: bytes | bytearray | memoryview) -> None:
        for body in self._bodies:
            body.update(data)

    def digests(self) -> dict[BodySpec, bytes]:
        """Each spec's hash (feeding ends here)."""
        for body in self._bodies:
            body.finish()
        return {spec: sink.hash.digest() for spec, sink in self._sinks.items()}


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
