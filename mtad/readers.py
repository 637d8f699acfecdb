"""Reading a message's bytes: DATA (RFC 5321 §4.1.1.4, §4.5.2) and BDAT chunks (RFC 3030 §2).

Both readers take bytes from the session's input buffer, append DataChunk events (message
bytes as stored, dot-stuffing undone) and keep the message's accounting in a MessageCheck:
its size against the limit, the Received: fields of its header (a loop check for the
adapter), the size of its header section, and line ends that are not CRLF. Once the session
knows a message will be refused (too big, bare LF or CR) nothing more of it is passed on,
but it is still read to its end, so the session stays in step with the client.

Framing that matters for security:
- DATA ends only at <CRLF>.<CRLF>. A bare LF or bare CR anywhere in the message does not
  end it; the message is read to its real end and refused with 550 5.6.11 (SMTP smuggling,
  CVE-2023-51764 class). BDAT chunks hold the message as it is, and their line ends are
  checked the same way, also where a CRLF is cut between two chunks.
- A header section over MAX_HEADER is refused 552 5.3.4; a message over the size limit
  552 5.3.4.

Linear in the input: every byte is looked at a bounded number of times however the reads
are cut (DataReader remembers how far it has looked for a CRLF), and body lines are handled
in blocks with C-speed bytes methods.
"""

from __future__ import annotations

from collections import deque

from mtad import replies
from mtad.events import DataChunk
from mtad.replies import Reply

PARTIAL_LINE = 8192  # a DATA line longer than this is passed on in pieces
# A header section beyond this is refused 552 5.3.4: header lines cost ~20x the CPU of body
# lines, here and in the store's parser (an attack's 20 MB of one-line fields took 19 s).
MAX_HEADER = 1 << 20
SPOOL_CHUNK = 65536  # DATA: message bytes are passed on in chunks of about this size


class MessageCheck:
    """One message's accounting, across all its BDAT chunks."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.size = 0  # message octets so far (unstuffed)
        self.received = 0  # Received: fields in the header section
        self.in_headers = True
        self.line_head = b""  # BDAT: the first bytes of the header line being read
        self.bare_lf = False  # a CR or LF not part of a CRLF
        self.cr_pending = False  # BDAT: the last chunk ended in a CR, which the next must follow with LF
        self.too_big = False
        self.header_too_big = False

    @property
    def wanted(self) -> bool:
        """Whether the message's bytes are still worth passing on."""
        return not self.too_big and not self.bare_lf

    def add(self, size: int) -> None:
        self.size += size
        if self.size > self.max_size:
            self.too_big = True

    def refuse_header(self) -> None:
        """The rest is read and dropped, at body speed (no more header lines to count)."""
        self.header_too_big = self.too_big = True
        self.in_headers = False

    def refusal(self) -> Reply | None:
        """What the end of the message is answered, when the session knows it already."""
        if self.header_too_big:
            return replies.HEADER_TOO_BIG
        if self.too_big:
            return replies.MESSAGE_TOO_BIG
        return replies.BARE_LF if self.bare_lf else None


class DataReader:
    """DATA: lines end only at CRLF; a line that is "." alone ends the message; a leading dot
    is removed (RFC 5321 §4.5.2); a CR or LF not in a CRLF is remembered."""

    def __init__(self, message: MessageCheck):
        self.message = message
        self.done = False  # the end-of-data line has been read
        self._line_start = True
        self._scanned = 0  # no CRLF in the buffer before this position

    def read(self, buffer: bytearray, events: deque) -> bool:
        """Consume what `buffer` holds of the message; False if nothing could be done."""
        progressed = False
        chunk = bytearray()
        while not self.done:
            # Nothing to do before a CRLF arrives (or the line grows too long); the bytes
            # already looked at are not looked at again, however small the reads.
            end = buffer.find(b"\r\n", self._scanned)
            if end < 0:
                if len(buffer) <= PARTIAL_LINE:
                    self._scanned = max(0, len(buffer) - 1)  # the last byte may be the CR
                    break
                # A very long line: pass it on in pieces, keeping the last byte back (it
                # may be the CR of the CRLF that ends the line).
                piece = bytes(buffer[:-1])
                del buffer[:-1]
                self._scanned = 0
                self._line_piece(piece, chunk, events, complete=False)
                progressed = True
                continue
            self._scanned = 0
            progressed = True
            if self._line_start and not self.message.in_headers:
                # The body, past the headers: whole lines at once rather than one by one,
                # up to the end of data or the last CRLF (there is one: `end`).
                if buffer.startswith(b".\r\n"):
                    del buffer[:3]
                    self.done = True
                    break
                stop = buffer.find(b"\r\n.\r\n")
                cut = stop + 2 if stop >= 0 else buffer.rfind(b"\r\n") + 2
                block = bytes(buffer[:cut])
                del buffer[:cut]
                self._body_lines(block, chunk, events)
                continue
            line = bytes(buffer[:end + 2])
            del buffer[:end + 2]
            if self._line_start and line == b".\r\n":
                self.done = True
                break
            self._line_piece(line, chunk, events, complete=True)
        self._emit(chunk, events)
        return progressed

    def _line_piece(self, piece: bytes, chunk: bytearray, events: deque, complete: bool) -> None:
        """A line, or a piece of a long one (`complete` when it ends with the CRLF)."""
        message = self.message
        if self._line_start:
            if piece.startswith(b"."):
                piece = piece[1:]
            if message.in_headers:
                if piece == b"\r\n":
                    message.in_headers = False
                elif piece[:9].lower() == b"received:":
                    message.received += 1
        content = piece[:-2] if complete else piece
        if b"\r" in content or b"\n" in content:
            message.bare_lf = True
        self._line_start = complete
        self._pass_on(piece, chunk, events)
        if message.in_headers and message.size > MAX_HEADER:
            message.refuse_header()

    def _body_lines(self, block: bytes, chunk: bytearray, events: deque) -> None:
        """Complete body lines (the block starts a line and ends with CRLF, and holds no
        end-of-data line): what _line_piece does line by line, with C-speed bytes methods."""
        ends = block.count(b"\r\n")
        if block.count(b"\r") != ends or block.count(b"\n") != ends:
            self.message.bare_lf = True  # a CR or LF that is not part of a CRLF
        if block.startswith(b"."):
            block = block[1:]
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        self._pass_on(block, chunk, events)

    def _pass_on(self, data: bytes, chunk: bytearray, events: deque) -> None:
        """Count unstuffed message bytes, and pass them on while the message is still wanted."""
        self.message.add(len(data))
        if self.message.wanted:
            chunk += data
            if len(chunk) >= SPOOL_CHUNK:
                self._emit(chunk, events)

    def _emit(self, chunk: bytearray, events: deque) -> None:
        if chunk and self.message.wanted:
            events.append(DataChunk(bytes(chunk)))
        chunk.clear()


class BdatReader:
    """One BDAT chunk: exactly `size` octets, read whatever the answer will be (RFC 3030 §3).
    With a `refusal` (no sender or no recipient) they are dropped unexamined, and the
    session answers the refusal; otherwise they count towards `message`."""

    def __init__(self, message: MessageCheck | None, size: int, last: bool, refusal: Reply | None):
        assert (message is None) == (refusal is not None)
        self.message = message
        self.last = last
        self.refusal = refusal
        self._left = size

    @property
    def done(self) -> bool:
        return self._left == 0

    def read(self, buffer: bytearray, events: deque) -> bool:
        """Consume what `buffer` holds of the chunk; False if nothing could be done."""
        if self._left and not buffer:
            return False
        take = min(self._left, len(buffer))
        piece = bytes(buffer[:take])
        del buffer[:take]
        self._left -= take
        message = self.message
        if message is not None and piece:
            if message.in_headers and message.size + _count_received(message, piece) > MAX_HEADER:
                message.refuse_header()
            _check_line_ends(message, piece)
            message.add(len(piece))
            if message.wanted:
                events.append(DataChunk(piece))
        if self.done and self.last and message is not None and message.cr_pending:
            message.bare_lf = True  # the message ends in a CR of its own
        return True


def _check_line_ends(message: MessageCheck, piece: bytes) -> None:
    """BDAT chunks hold the message as it is, so its line ends are checked as DATA's are: a
    CR or LF that is not part of a CRLF, also where a CRLF is cut between two chunks, makes
    the message refused with 550 5.6.11 (read to its end first, RFC 3030 §3)."""
    if message.bare_lf:
        return
    if message.cr_pending:
        message.cr_pending = False
        if not piece.startswith(b"\n"):
            message.bare_lf = True
            return
        piece = piece[1:]
    if piece.endswith(b"\r"):
        message.cr_pending = True
        piece = piece[:-1]
    pairs = piece.count(b"\r\n")
    if piece.count(b"\r") != pairs or piece.count(b"\n") != pairs:
        message.bare_lf = True


def _count_received(message: MessageCheck, piece: bytes) -> int:
    """Count the Received: fields of a header that arrives in BDAT chunks of any size (a
    field may start in one chunk and end in the next), up to its empty line; how many bytes
    of `piece` are header fields (as DATA counts them: the empty line not included)."""
    start = 0
    while message.in_headers:
        end = piece.find(b"\n", start)
        if len(message.line_head) < 9:
            message.line_head += piece[start:end + 1 if end >= 0 else len(piece)][:9 - len(message.line_head)]
        if end < 0:
            return len(piece)
        if message.line_head in (b"\r\n", b"\n"):
            message.in_headers = False
            return start
        if message.line_head.lower() == b"received:":
            message.received += 1
        message.line_head = b""
        start = end + 1
    return start
