"""Cuts the client's byte stream into IMAP commands (RFC 3501 §2.2, §4.3; RFC 7888 LITERAL+).

Sans-IO and pull-driven, so the session handles strictly one command at a time:

    framer.feed(data)      buffer bytes, nothing else
    framer.next()          -> Frame | Continue | Reject | Close | None (None: needs more bytes)
    framer.buffered()      bytes fed and not yet taken by next() (the adapter pauses above a mark)
    framer.held()          bytes of the command being read: its lines and literals so far

A command is a line, and each line that ends in a literal marker `{n}` or `{n+}` goes on
with n bytes of literal and then another line. `Frame.parts` holds them in order (line,
literal, line, ...), lines without their line end; a plain line is a one-part Frame, which
is also how the session reads IDLE's `DONE` and AUTHENTICATE's base64 lines.

Limits, each answered without buffering what it refuses:
- a line longer than `max_line` octets: the rest of the command is read and dropped, then
  `Reject(tag, ..., status="BAD", code="TOOBIG")`. RFC 7162 §4 asks servers to take lines
  of at least 8192 octets and to answer BAD to longer ones they refuse; TOOBIG (RFC 4469,
  RFC 9051 §7.1) names the reason.
- a literal larger than `max_literal(command name)`, or a command whose lines and held
  literals, its largest literal aside, exceed `max_command` (streamed literals, below, are
  not held: MULTIAPPEND's messages count only against `max_literal` each):
  - synchronizing `{n}`: `Reject(tag, ..., status="NO", code="TOOBIG")` at once; the client
    waits for a continuation that never comes, so the next bytes are a new command.
  - non-synchronizing `{n+}`: the client sends the bytes regardless, so a server that will
    not take the literal (RFC 7888 §4; §5 for LITERAL-) either reads and discards its
    octets and rejects the command with a tagged BAD carrying TOOBIG, or says BYE and
    closes the connection. We discard (never buffering) and then `Reject(..., status="BAD")`,
    unless n is absurd (over 1 GiB, or over 4x the limit and over 1 MiB): then
    `Close(text)` (the adapter sends `* BYE` and closes) rather than read it to throw it away.
A command being dropped is dropped to its end: a `{n+}` literal on its lines is skipped too;
a `{n}` ends it (that client is waiting for our answer). What is dropped is bounded too: a
line past ABSURD_LINE, or literals of one command past the bounds of one literal, close.

Streamed literals: `literal_sink(command name, parts so far, size)` is asked as each
literal begins; when it returns a sink (APPEND's message: imapd/append.py), the literal's
bytes go to `sink.write(piece)` as they arrive instead of being held, and the sink itself
stands in the Frame's parts where the literal's bytes would be (`len(sink)` is its size). A
Frame hands its sinks on; a command dropped or cut off has its sinks closed here.

Line ends: CRLF, and a bare LF is taken as a line end too, as Dovecot does (a person typing
into `nc` sends LF; IMAP has no relay in between that a second reading could confuse).

Memory held: at most max_line + 2 bytes of a partial line plus the command being read (its
lines and its literals not streamed, bounded by max_literal + max_command), whatever the
client sends.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

ABSURD_LITERAL = 1 << 30  # a refused {n+} beyond this closes the connection,
ABSURD_FACTOR = 4  # and so does one beyond 4x the limit,
ABSURD_FLOOR = 1 << 20  # unless it is at most 1 MiB: dropping that costs little
# A line being dropped (over max_line) closes the connection past this many octets, and the
# literals of a command being dropped do past the same bounds as one literal: under
# COMPRESS=DEFLATE a client sent 6 MB that inflated to a 6 GB line, read and dropped at
# 0.8 GB/s of the worker's CPU (the same with gigabytes of {n+} literals in one command).
ABSURD_LINE = 1 << 20
_TAIL = 32  # bytes kept from a line being dropped, to see a literal marker at its end
_PREFIX = 128  # bytes of a too-long first line that its tag and command name are read from
_LITERAL_RE = re.compile(rb"\{([0-9]{1,20})(\+?)\}\Z")
_TAG_RE = re.compile(rb"([\x21-\x7e]+) ([A-Za-z]+)(?: ([A-Za-z]+))?")
_TAG_CHARS = frozenset(range(0x21, 0x7F)) - frozenset(b'(){%*"\\+')


@dataclass
class Frame:
    """One complete command: `parts` alternates line, literal, line, ... (lines without
    CRLF). `raw` is the first line."""

    parts: list[bytes] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        return self.parts[0]


@dataclass(frozen=True)
class Continue:
    """The client waits for `+ Ready for literal data` before sending a `{n}` literal."""


@dataclass(frozen=True)
class Reject:
    """A command refused before it was complete: answer `<tag or *> <status> [<code>] <text>`."""

    tag: str | None
    text: str
    code: str | None = "TOOBIG"
    status: str = "NO"


@dataclass(frozen=True)
class Close:
    """Answer `* BYE <text>` and close the connection."""

    text: str


Event = Frame | Continue | Reject | Close


class Sink(Protocol):
    def write(self, piece: bytes) -> None: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...


SinkFactory = Callable[[str, list, int], "Sink | None"]

_LINE, _LITERAL, _SKIP_LINE, _SKIP_LITERAL, _CLOSED = range(5)


def _absurd(size: int, limit: int) -> bool:
    return size > ABSURD_LITERAL or size > max(ABSURD_FACTOR * limit, ABSURD_FLOOR)


def _marker(line: bytes) -> re.Match | None:
    """The literal marker ending `line`, if any."""
    if not line.endswith(b"}"):
        return None
    return _LITERAL_RE.search(line, max(0, line.rfind(b"{")))


def read_tag(line: bytes) -> str | None:
    """The tag a command line starts with, if it is a valid one (RFC 3501 §9 `tag`)."""
    end = line.find(b" ")
    tag = line if end < 0 else line[:end]
    if tag and all(b in _TAG_CHARS for b in tag):
        return tag.decode("ascii")
    return None


def read_name(line: bytes) -> str:
    """The command name from `tag SP name`, "UID " + the next word for UID commands;
    "" when there is none. Used to pick the literal limit."""
    m = _TAG_RE.match(line)
    if not m:
        return ""
    name = m.group(2).decode("ascii").upper()
    if name == "UID" and m.group(3):
        name += " " + m.group(3).decode("ascii").upper()
    return name


class Framer:
    def __init__(self, max_line: int = 65536, max_literal: Callable[[str], int] = lambda name: 65536,
                 max_command: int = 262144, literal_sink: SinkFactory = lambda name, parts, size: None):
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_command = max_command
        self.literal_sink = literal_sink
        self._sink: Sink | None = None  # where the literal being read goes, if it is streamed
        self._buf = bytearray()
        self._scanned = 0  # no LF in _buf[:_scanned]
        self._state = _LINE
        self._need = 0  # literal bytes still to read or drop
        self._literal = bytearray()
        self._tail = b""
        self._pending: Reject | None = None
        self._reset()

    def _reset(self) -> None:
        self._parts: list[bytes] = []
        self._held = 0  # their bytes
        self._tag: str | None = None
        self._name = ""
        self._total = 0  # lines and literals of the command so far
        self._largest = 0  # its largest literal
        self._dropped = 0  # literals of the command skipped, while it is dropped
        self._line_dropped = 0  # octets of the line being dropped

    def feed(self, data: bytes) -> None:
        if self._state != _CLOSED:
            self._buf += data

    def buffered(self) -> int:
        """At most max_line + 1 once next() has returned None."""
        return len(self._buf)

    def take_unread(self) -> bytes:
        """The bytes fed and not yet read into a command, taken out (between commands:
        COMPRESS turns what follows into compressed data, imapd/protocol.py)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return data

    def held(self) -> int:
        """At most max_command + the largest literal max_literal() allows."""
        return self._held + len(self._literal)

    def next(self) -> Event | None:
        while True:
            state = self._state
            if state == _CLOSED:
                return None
            if state in (_LITERAL, _SKIP_LITERAL):
                take = min(self._need, len(self._buf))
                if state == _LITERAL:
                    if self._sink is None:
                        self._literal += self._buf[:take]
                    elif take:
                        self._sink.write(bytes(self._buf[:take]))
                del self._buf[:take]
                self._need -= take
                if self._need:
                    return None
                if state == _LITERAL:
                    if self._sink is not None:
                        self._parts.append(self._sink)
                        self._sink = None
                    else:
                        self._parts.append(bytes(self._literal))
                        self._held += len(self._literal)
                        self._literal = bytearray()
                    self._state = _LINE
                else:
                    self._state = _SKIP_LINE
                continue
            if state == _SKIP_LINE:
                end = self._buf.find(b"\n")
                if end < 0:
                    self._tail = (self._tail + bytes(self._buf[-_TAIL:]))[-_TAIL:]
                    self._line_dropped += len(self._buf)
                    self._buf.clear()
                    if self._line_dropped > max(ABSURD_LINE, self.max_line):
                        return self._close("line too long")
                    return None
                self._line_dropped = 0
                tail = (self._tail + bytes(self._buf[max(0, end - _TAIL):end]))[-_TAIL:]
                del self._buf[:end + 1]
                event = self._dropped_line_end(tail)
                if event is not None:
                    return event
                continue
            event = self._read_line()
            if event is not None or self._state == _LINE:
                return event

    def _read_line(self) -> Event | None:
        """In _LINE state: None with the state unchanged means more bytes are needed."""
        limit = self.max_line + 2  # the line, CR, LF
        end = self._buf.find(b"\n", self._scanned, limit)
        if end < 0:
            if len(self._buf) < limit:
                self._scanned = len(self._buf)
                return None
            self._start_dropping("line too long", bytes(self._buf[:_PREFIX]))
            self._scanned = 0
            self._state = _SKIP_LINE  # which drops up to the line end, wherever it is
            return None
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        self._scanned = 0
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            self._start_dropping("line too long", line)
            return self._dropped_line_end(line[-_TAIL:])
        if not self._parts:
            self._tag, self._name = read_tag(line), read_name(line)
        self._parts.append(line)
        self._held += len(line)
        self._total += len(line)
        if self._total - self._largest > self.max_command:
            self._start_dropping("command too long", line)
            return self._dropped_line_end(line[-_TAIL:])
        marker = _marker(line)
        if marker is None:
            frame = Frame(self._parts)
            self._reset()
            return frame
        size, sync = int(marker.group(1)), not marker.group(2)
        limit = self.max_literal(self._name)
        total, largest = self._total + size, max(self._largest, size)
        sink = self.literal_sink(self._name, self._parts, size) if size <= limit else None
        if sink is not None or (size <= limit and total - largest <= self.max_command):
            if sink is None:  # held: it counts against max_command (a streamed one is not held)
                self._total, self._largest = total, largest
            self._need = size
            self._state = _LITERAL
            self._sink = sink
            return Continue() if sync else None
        text = "literal too big" if size > limit else "command too long"
        if sync:
            reject = Reject(self._tag, text)
            self._close_sinks()
            self._reset()
            return reject
        if _absurd(size, limit):
            return self._close(text)
        self._pending = Reject(self._tag, text, status="BAD")
        self._dropped = size
        self._need = size
        self._state = _SKIP_LITERAL
        return None

    def _start_dropping(self, text: str, first: bytes) -> None:
        """Drop the rest of the current command; `first` starts the offending line. Its tag
        and name are read from the same prefix however the bytes arrived (a too-long line
        is seen either whole or as its first max_line + 2 bytes)."""
        if not self._parts:
            first = first[:min(self.max_line + 1, _PREFIX)]
            self._tag = read_tag(first) if b" " in first else None
            self._name = read_name(first)
        # What was read of it goes now, not after its {n+} literals have been skipped: a
        # line over the command limit would otherwise be held on top of the limit.
        self._close_sinks()
        self._parts, self._held = [], 0
        self._dropped = self._line_dropped = 0
        self._pending = Reject(self._tag, text, status="BAD")

    def _dropped_line_end(self, tail: bytes) -> Event | None:
        """A dropped line ended: skip its {n+} literal, or answer."""
        if tail.endswith(b"\r"):
            tail = tail[:-1]
        marker = _marker(tail)
        if marker is not None and marker.group(2):
            size = int(marker.group(1))
            limit = self.max_literal(self._name)
            self._dropped += size
            if _absurd(self._dropped, limit):
                return self._close("literal too big")
            self._need = size
            self._state = _SKIP_LITERAL
            self._tail = b""
            return None
        reject = self._pending
        self._pending = None
        self._tail = b""
        self._state = _LINE
        self._reset()
        return reject

    def _close(self, text: str) -> Close:
        self._state = _CLOSED
        self._buf.clear()
        self._literal = bytearray()
        self._close_sinks()
        self._reset()
        return Close(text)

    def _close_sinks(self) -> None:
        """The command is dropped: its streamed literals, whole or in progress, go too."""
        for part in self._parts:
            if not isinstance(part, bytes):
                part.close()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
