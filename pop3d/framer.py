"""POP3 bytes in and out, sans-IO: the client's stream cut into command lines with a length
limit (`LineFramer`), and a stored message encoded as the body of a multi-line response
(`BodyEncoder`, RFC 1939 §3: dot-stuffing, the CRLF "." CRLF terminator, TOP's cut).

Both are linear in their input however it is chunked: the framer scans each byte for LF
once, the encoder looks at each byte once, and neither keeps more than a line's worth of
state (plus, for the framer, complete lines not yet taken).
"""

from __future__ import annotations

# RFC 2449 §4 caps commands at 255 octets, but RFC 5034 §4 lets an AUTH response be longer:
# one generous limit for every line.
MAX_LINE = 8 * 1024


class LineTooLong:
    """A line over the limit: its bytes are discarded up to its end."""


TOO_LONG = LineTooLong()


class LineFramer:
    """Bytes into lines (CRLF, or a bare LF, ends one); memory stays bounded by `max_line`
    plus whatever complete lines wait unread (the adapter stops reading when that grows)."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # no LF in _buffer[:_scanned]: a line fed byte by byte is scanned once
        self._skipping = False  # inside an over-long line, already reported

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def buffered(self) -> int:
        return len(self._buffer)

    def take_unread(self) -> bytes:
        """What is buffered and not yet a line taken, handed over (a cluster's proxy)."""
        data = bytes(self._buffer)
        self.clear()
        return data

    def clear(self) -> None:
        self._buffer.clear()
        self._scanned = 0
        self._skipping = False

    def next_line(self) -> bytes | LineTooLong | None:
        """The next line without its line end, TOO_LONG once for a line over the limit, or
        None until a whole line is there."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if self._skipping:
                if end < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                if len(self._buffer) > self.max_line:
                    self._buffer.clear()
                    self._scanned = 0
                    self._skipping = True
                    return TOO_LONG
                self._scanned = len(self._buffer)
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) + 2 > self.max_line:
                return TOO_LONG
            return line


class BodyEncoder:
    """A stored message (CRLF lines) as the body of a multi-line response: each line that
    starts with "." gets one more (RFC 1939 §3), for RETR the whole message, for TOP the
    header, the blank line and `lines` body lines. Chunks may be cut anywhere; `done` says
    TOP needs no more input; `end()` is the terminator (after a CRLF if the message did not
    end with one)."""

    def __init__(self, lines: int | None = None):
        self._lines_left = lines
        self._in_header = lines is not None
        self._line_start = True  # the next byte starts a line
        self._line_head = b""  # the first (up to two) bytes of the current line, for TOP
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self._lines_left is not None:
            cut = self._cut(chunk)
            if cut is not None:
                chunk = chunk[:cut]
                self.done = True
        return self._stuff(chunk)

    def end(self) -> bytes:
        return b".\r\n" if self._line_start else b"\r\n.\r\n"

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        # The chunk edge case twisted.mail.pop3 gets wrong: a line that starts a chunk.
        if self._line_start and data[:1] == b".":
            out = b"." + out
        self._line_start = data[-1:] == b"\n"
        return out

    def _cut(self, chunk: bytes) -> int | None:
        """Where TOP's output ends within `chunk` (just after a line's LF), or None."""
        pos = 0
        while True:
            end = chunk.find(b"\n", pos)
            if end < 0:
                self._line_head = (self._line_head + chunk[pos : pos + 2])[:2]
                return None
            head = (self._line_head + chunk[pos : min(end, pos + 2)])[:2]
            self._line_head = b""
            pos = end + 1
            if self._in_header:
                if head in (b"", b"\r"):  # the blank line that ends the header
                    self._in_header = False
                    if self._lines_left == 0:
                        return pos
            else:
                assert self._lines_left is not None
                self._lines_left -= 1
                if self._lines_left <= 0:
                    return pos
