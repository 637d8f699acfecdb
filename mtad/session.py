"""The SMTP server session as a sans-IO state machine (RFC 5321, 3030 CHUNKING, 3207
STARTTLS, 2920 PIPELINING, 6531 SMTPUTF8, 1870 SIZE, 2034 ENHANCEDSTATUSCODES).

Bytes go in (`receive`), events come out (`next_event`), and replies go out as bytes
(`data_to_send`). The session owns syntax, sequence, limits and framing; every decision
about people and mail (who may send, who exists here, whether the message is stored) is
asked of the adapter with an event and answered with `answer(reply)`. While a question is
open the session reads no further input, so pipelined commands are answered in order.

Framing that matters for security:
- DATA ends only at <CRLF>.<CRLF>. A bare LF or bare CR anywhere in the message does not
  end it; the message is read to its real end and refused with 550 5.6.11 (SMTP smuggling,
  CVE-2023-51764 class). Dot-stuffing is undone (RFC 5321 §4.5.2).
- After STARTTLS, whatever the client pipelined behind it is discarded (CVE-2011-0411) and
  the session starts over, as RFC 3207 §4.2 requires.
- A command line ends at LF (with the CR before it, if any). A control character left in
  it (C0 including a bare CR and NUL, DEL; in UTF-8 the C1 controls and U+2028/U+2029) is
  refused 501 5.5.2, whatever the command: the EHLO name and the paths go into headers.
- Command lines over MAX_LINE octets are refused 500 5.5.2 and skipped whole; after
  `max_errors` refused commands the session says 421 and closes.
- A message over `max_message_size` is read to its end, discarded, and refused 552 5.3.4;
  the session stays usable.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass, field

from mtad import replies
from mtad.replies import Reply

MAX_LINE = 512  # RFC 5321 §4.5.3.1.4, including CRLF
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets
PARTIAL_LINE = 8192  # a DATA line longer than this is spooled in pieces
# A header section beyond this is refused 552 5.3.4: header lines cost ~20x the CPU of body
# lines, here and in the store's parser (an attack's 20 MB of one-line fields took 19 s).
MAX_HEADER = 1 << 20


# -- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    """EHLO/HELO: answer with a Reply (replies.OK to accept; the session adds the keywords)."""
    name: str
    extended: bool


@dataclass(frozen=True)
class MailFrom:
    address: str  # "" for the null reverse-path
    params: dict[str, str | None]


@dataclass(frozen=True)
class RcptTo:
    address: str
    params: dict[str, str | None]


@dataclass(frozen=True)
class DataChunk:
    """Message bytes (unstuffed) to spool. No answer."""
    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """The whole message has arrived: answer with the final reply for the transaction.
    If `refusal` is set the session already knows the answer; the adapter must discard the
    spool and answer it (or a reply of its own, never 250)."""
    size: int
    received_headers: int
    refusal: Reply | None


@dataclass(frozen=True)
class StartTLS:
    """Upgrade the transport, then call `tls_established()`. No answer."""


@dataclass(frozen=True)
class Close:
    """Send what is pending, then close the connection."""


class NeedData:
    """No event until more bytes arrive."""


class Paused:
    """Waiting for the adapter's answer to the last event."""


NEED_DATA = NeedData()
PAUSED = Paused()


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    max_message_size: int
    max_recipients: int
    tls_available: bool
    is_tls: bool = False  # implicit TLS (port 465) or after STARTTLS
    max_errors: int = 10
    smtputf8: bool = True
    chunking: bool = True


@dataclass
class _Transaction:
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    size: int = 0
    received: int = 0
    in_headers: bool = True
    line_head: bytes = b""  # BDAT: the first bytes of the header line being read
    bare_lf: bool = False
    cr_pending: bool = False  # BDAT: the last chunk ended in a CR, which the next must follow with LF
    too_big: bool = False
    header_too_big: bool = False
    bdat: bool = False
    smtputf8: bool = False


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # C0 controls (a bare CR and a NUL among them) and DEL
# Beyond ASCII: the C1 controls (U+0080-U+009F) and the line and paragraph separators,
# which str.splitlines() takes for line ends, as it does U+0085.
# And the invisible format characters (U+200B zero-width space, U+202E right-to-left
# override...): in a name or an address they only ever serve to mislead the reader.
_UNICODE_BREAKS = frozenset({"Cc", "Zl", "Zp", "Cf"})
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~\u0080-\U0010FFFF]+))?$")


class Session:
    def __init__(self, config: SessionConfig):
        self.config = config
        self._in = bytearray()
        self._scanned = 0  # no line end in _in[:_scanned] (a command's LF, DATA's CRLF)
        self._out = bytearray()
        self._events: deque = deque()
        self._state = "connected"  # connected, ready, data, bdat, closed
        self._waiting: str | None = None  # which answer the session awaits
        self._helo: str | None = None
        self._extended = False
        self._tls = config.is_tls
        self._errors = 0
        self._txn = _Transaction()
        self._data_line_start = True
        self._bdat_left = 0
        self._bdat_last = False
        self._skip_line = False
        self._reply(Reply(220, "", f"{config.hostname} ESMTP Postroom"))

    # -- the adapter's side ---------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self._state != "closed":
            self._in += data

    def buffered(self) -> int:
        """Bytes received and not yet consumed. Outside a message at most MAX_LINE wait
        (a partial command line) once next_event() says NEED_DATA; inside DATA at most
        PARTIAL_LINE; inside a BDAT chunk none. What arrives while the session is PAUSED
        waits here: the adapter stops reading then."""
        return len(self._in)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    @property
    def receiving(self) -> bool:
        """Inside a message's data (DATA or BDAT chunks): its own timeout applies."""
        return self._state in ("data", "bdat")

    @property
    def helo_name(self) -> str | None:
        return self._helo

    def next_event(self):
        while True:
            if self._events:
                return self._events.popleft()
            if self._waiting is not None:
                return PAUSED
            if self._state == "closed":
                return NEED_DATA
            if not self._step():
                return NEED_DATA

    def answer(self, reply: Reply) -> None:
        """The adapter's decision on the open Hello, MailFrom, RcptTo or DataEnd."""
        waiting, self._waiting = self._waiting, None
        if waiting == "hello":
            if reply.is_error:
                self._reply(reply)
                return
            self._helo = self._pending_helo
            self._extended = self._pending_extended
            self._txn = _Transaction()
            self._state = "ready"
            if self._extended:
                self._out += Reply(250, "", f"{self.config.hostname}").lines(self._keywords())
            else:
                self._reply(Reply(250, "", f"{self.config.hostname}"))
        elif waiting == "mail":
            if not reply.is_error:
                self._txn.sender = self._pending_sender
                self._txn.smtputf8 = self._pending_smtputf8
            self._reply(reply)
        elif waiting == "rcpt":
            if not reply.is_error:
                self._txn.recipients.append(self._pending_rcpt)
            self._reply(reply)
        elif waiting == "data":
            self._reply(reply)
            self._txn = _Transaction()
            self._state = "ready"
        else:
            raise RuntimeError("answer() without an open question")

    def tls_established(self) -> None:
        """The transport is now TLS: forget everything said before (RFC 3207 §4.2)."""
        self._in.clear()  # whatever was pipelined behind STARTTLS is never executed
        self._scanned = 0
        self._waiting = None
        self._tls = True
        self._helo = None
        self._extended = False
        self._txn = _Transaction()
        self._state = "connected"

    def close(self, reply: Reply) -> None:
        """Say `reply` (421 timeout, shutdown) and close. Nothing more is read."""
        self._reply(reply)
        self._state = "closed"
        self._in.clear()
        self._events.append(Close())

    # -- the machine --------------------------------------------------------------------

    def _step(self) -> bool:
        """Consume some input; False when nothing more can be done with what is buffered."""
        if self._state == "data":
            return self._data_step()
        if self._state == "bdat":
            return self._bdat_step()
        end = self._in.find(b"\n", self._scanned)
        if end < 0:
            if len(self._in) > MAX_LINE:
                del self._in[:]  # keep skipping until the end of this line
                self._scanned = 0
                if not self._skip_line:
                    self._skip_line = True
                    self._refuse(replies.LINE_TOO_LONG)
                return True
            self._scanned = len(self._in)  # a line fed byte by byte is scanned once
            return False
        line = bytes(self._in[:end + 1])
        del self._in[:end + 1]
        self._scanned = 0
        if self._skip_line:
            self._skip_line = False
            return True
        if len(line) > MAX_LINE:
            self._refuse(replies.LINE_TOO_LONG)
            return True
        # The line ends at its LF; a CR just before it is part of the line end, and any
        # other CR in it is a bare CR, refused with the other control characters.
        self._command(line[:-2] if line.endswith(b"\r\n") else line[:-1])
        return True

    def _command(self, line: bytes) -> None:
        # RFC 5321 §4.1.1.1, §4.1.2: no control character belongs in a command: not in a
        # Domain or address literal, an atom, a quoted string (qtextSMTP, quoted-pairSMTP)
        # nor in parameters. Refused first, so none reaches the Received: and Return-Path:
        # headers built from the EHLO name and the paths (a bare CR became a header line).
        if _CONTROL.search(line):
            self._refuse(replies.CONTROL_CHARACTER)
            return
        verb, _, rest = line.partition(b" ")
        try:
            name = verb.decode("ascii").upper()
            arg = rest.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(replies.SYNTAX_ERROR)
            return
        if not arg.isascii() and any(unicodedata.category(c) in _UNICODE_BREAKS for c in arg):
            self._refuse(replies.CONTROL_CHARACTER)  # C1 controls, U+2028, U+2029 (SMTPUTF8, RFC 6531)
            return
        arg = arg.strip(" ")
        handler = _COMMANDS.get(name)
        if handler is None:
            self._refuse(replies.UNKNOWN_COMMAND)
            return
        allowed = _ALLOWED[self._state]
        if name not in allowed:
            self._refuse(replies.BAD_SEQUENCE)
            return
        handler(self, arg)

    def _reply(self, reply: Reply) -> None:
        self._out += reply.lines()

    def _refuse(self, reply: Reply) -> None:
        """A refused command: counts against the session's error budget."""
        self._errors += 1
        if self._errors >= self.config.max_errors:
            self.close(replies.TOO_MANY_ERRORS)
        else:
            self._reply(reply)

    def _ask(self, waiting: str, event) -> None:
        self._waiting = waiting
        self._events.append(event)

    def _keywords(self) -> tuple[str, ...]:
        words = ["PIPELINING", f"SIZE {self.config.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.config.smtputf8:
            words.append("SMTPUTF8")
        if self.config.chunking:
            words.append("CHUNKING")
        if self.config.tls_available and not self._tls:
            words.append("STARTTLS")
        return tuple(words)

    # -- commands ---------------------------------------------------------------------------

    def _ehlo(self, arg: str, extended: bool = True) -> None:
        if not arg or " " in arg:
            self._refuse(replies.SYNTAX_ERROR)
            return
        self._pending_helo, self._pending_extended = arg, extended
        self._ask("hello", Hello(arg, extended))

    def _helo_cmd(self, arg: str) -> None:
        self._ehlo(arg, extended=False)

    def _mail(self, arg: str) -> None:
        if self._txn.sender is not None:
            self._refuse(Reply(503, "5.5.1", "Sender already given"))
            return
        parsed = _path_and_params(arg, "FROM:")
        if parsed is None:
            self._refuse(replies.BAD_SENDER_SYNTAX)
            return
        address, params = parsed
        smtputf8 = "SMTPUTF8" in params
        problem = self._check_params(params, {"SIZE", "BODY", "SMTPUTF8"})
        if problem:
            self._refuse(problem)
            return
        if smtputf8 and not self.config.smtputf8:
            self._refuse(replies.PARAM_NOT_IMPLEMENTED)
            return
        if not address.isascii() and not smtputf8:
            self._refuse(replies.UTF8_NOT_ALLOWED)
            return
        size = params.get("SIZE")
        if size is not None:
            if not _is_number(size):
                self._refuse(replies.SYNTAX_ERROR)
                return
            if int(size) > self.config.max_message_size:
                self._refuse(replies.MESSAGE_TOO_BIG)
                return
        body = params.get("BODY")
        # BINARYMIME (RFC 3030 §3) is not offered: its bare CRs and LFs are what smuggling and
        # header injection are made of.
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            self._refuse(replies.SYNTAX_ERROR)
            return
        self._pending_sender, self._pending_smtputf8 = address, smtputf8
        self._ask("mail", MailFrom(address, params))

    def _rcpt(self, arg: str) -> None:
        if self._txn.sender is None:
            self._refuse(Reply(503, "5.5.1", "Need MAIL before RCPT"))
            return
        parsed = _path_and_params(arg, "TO:")
        if parsed is None or not parsed[0]:
            self._refuse(replies.BAD_RECIPIENT_SYNTAX)
            return
        address, params = parsed
        problem = self._check_params(params, set())
        if problem:
            self._refuse(problem)
            return
        if not address.isascii() and not self._txn.smtputf8:
            self._refuse(replies.UTF8_NOT_ALLOWED)
            return
        if len(self._txn.recipients) >= self.config.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)  # not the client's error: it retries the rest
            return
        self._pending_rcpt = address
        self._ask("rcpt", RcptTo(address, params))

    def _data(self, arg: str) -> None:
        if arg:
            self._refuse(replies.SYNTAX_ERROR)
            return
        if self._txn.bdat:
            self._refuse(Reply(503, "5.5.1", "DATA after BDAT"))
            return
        if self._txn.sender is None:
            self._refuse(Reply(503, "5.5.1", "Need MAIL before DATA"))
            return
        if not self._txn.recipients:
            self._refuse(replies.NO_VALID_RECIPIENTS)
            return
        self._reply(replies.START_DATA)
        self._state = "data"
        self._data_line_start = True

    def _bdat(self, arg: str) -> None:
        parts = arg.split()
        if not self.config.chunking or not 1 <= len(parts) <= 2 or not _is_number(parts[0]) or \
                (len(parts) == 2 and parts[1].upper() != "LAST"):
            self._refuse(replies.SYNTAX_ERROR)
            return
        self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        # RFC 3030 §3: the chunk is read whatever the answer will be.
        self._state = "bdat"
        if self._txn.sender is None or not self._txn.recipients:
            self._bdat_refusal = Reply(503, "5.5.1", "Need MAIL and RCPT before BDAT") \
                if self._txn.sender is None else replies.NO_VALID_RECIPIENTS
        else:
            self._bdat_refusal = None
            self._txn.bdat = True

    def _rset(self, arg: str) -> None:
        self._txn = _Transaction()
        if self._state != "connected":
            self._state = "ready"
        self._reply(replies.RESET_OK)

    def _noop(self, arg: str) -> None:
        self._reply(replies.NOOP_OK)

    def _quit(self, arg: str) -> None:
        self.close(replies.BYE)

    def _vrfy(self, arg: str) -> None:
        self._reply(replies.VRFY_CANNOT)  # RFC 5321 §3.5.3: no address harvesting here

    def _starttls(self, arg: str) -> None:
        if arg:
            self._refuse(replies.SYNTAX_ERROR)
        elif self._tls:
            self._refuse(replies.ALREADY_TLS)
        elif not self.config.tls_available:
            self._refuse(replies.TLS_NOT_AVAILABLE)
        elif self._txn.sender is not None:
            self._refuse(Reply(503, "5.5.1", "STARTTLS not allowed during a mail transaction"))
        else:
            self._reply(replies.READY_TLS)
            self._events.append(StartTLS())
            self._waiting = "tls"

    def _check_params(self, params: dict[str, str | None], known: set[str]) -> Reply | None:
        unknown = set(params) - known
        return replies.PARAM_NOT_IMPLEMENTED if unknown else None

    # -- message data -------------------------------------------------------------------

    def _data_step(self) -> bool:
        """Consume DATA: lines end only at CRLF; a line that is "." alone ends the message;
        a leading dot is removed (RFC 5321 §4.5.2); a CR or LF not in a CRLF is remembered."""
        progressed = False
        chunk = bytearray()
        while self._state == "data":
            # Nothing to do before a CRLF arrives (or the line grows too long); the bytes
            # already looked at are not looked at again, however small the reads.
            end = self._in.find(b"\r\n", self._scanned)
            if end < 0:
                if len(self._in) <= PARTIAL_LINE:
                    self._scanned = max(0, len(self._in) - 1)  # the last byte may be the CR
                    break
                # A very long line: pass it on in pieces, keeping the last byte back (it
                # may be the CR of the CRLF that ends the line).
                piece = bytes(self._in[:-1])
                del self._in[:-1]
                self._scanned = 0
                self._take(piece, chunk, complete=False)
                progressed = True
                continue
            self._scanned = 0
            progressed = True
            if self._data_line_start and not self._txn.in_headers:
                # The body, past the headers: whole lines at once rather than one by one,
                # up to the end of data or the last CRLF (there is one: `end`).
                if self._in.startswith(b".\r\n"):
                    del self._in[:3]
                    self._flush(chunk)
                    self._finish()
                    break
                stop = self._in.find(b"\r\n.\r\n")
                cut = stop + 2 if stop >= 0 else self._in.rfind(b"\r\n") + 2
                block = bytes(self._in[:cut])
                del self._in[:cut]
                self._take_lines(block, chunk)
                continue
            line = bytes(self._in[:end + 2])
            del self._in[:end + 2]
            if self._data_line_start and line == b".\r\n":
                self._flush(chunk)
                self._finish()
                break
            self._take(line, chunk, complete=True)
        self._flush(chunk)
        return progressed

    def _take(self, piece: bytes, chunk: bytearray, complete: bool) -> None:
        txn = self._txn
        if self._data_line_start:
            if piece.startswith(b"."):
                piece = piece[1:]
            if txn.in_headers:
                if piece == b"\r\n":
                    txn.in_headers = False
                elif piece[:9].lower() == b"received:":
                    txn.received += 1
        content = piece[:-2] if complete else piece
        if b"\r" in content or b"\n" in content:
            txn.bare_lf = True
        self._data_line_start = complete
        self._keep(piece, chunk)
        if txn.in_headers and txn.size > MAX_HEADER:
            _header_too_big(txn)

    def _take_lines(self, block: bytes, chunk: bytearray) -> None:
        """Complete body lines (the block starts a line and ends with CRLF, and holds no
        end-of-data line): what _take does line by line, with C-speed bytes methods."""
        txn = self._txn
        ends = block.count(b"\r\n")
        if block.count(b"\r") != ends or block.count(b"\n") != ends:
            txn.bare_lf = True  # a CR or LF that is not part of a CRLF
        if block.startswith(b"."):
            block = block[1:]
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        self._keep(block, chunk)

    def _keep(self, data: bytes, chunk: bytearray) -> None:
        """Count unstuffed message bytes, and spool them while the message is still wanted."""
        txn = self._txn
        txn.size += len(data)
        if txn.size > self.config.max_message_size:
            txn.too_big = True
        if not txn.too_big and not txn.bare_lf:
            chunk += data
            if len(chunk) >= 65536:
                self._flush(chunk)

    def _flush(self, chunk: bytearray) -> None:
        if chunk and not self._txn.too_big and not self._txn.bare_lf:
            self._events.append(DataChunk(bytes(chunk)))
        chunk.clear()

    def _finish(self) -> None:
        txn = self._txn
        refusal = _refusal(txn)
        self._state = "ready"
        self._ask("data", DataEnd(txn.size, txn.received, refusal))

    def _bdat_step(self) -> bool:
        if self._bdat_left and not self._in:
            return False
        take = min(self._bdat_left, len(self._in))
        piece = bytes(self._in[:take])
        del self._in[:take]
        self._bdat_left -= take
        txn = self._txn
        if self._bdat_refusal is None and piece:
            if txn.in_headers and txn.size + _count_received(txn, piece) > MAX_HEADER:
                _header_too_big(txn)
            _check_line_ends(txn, piece)
            txn.size += len(piece)
            if txn.size > self.config.max_message_size:
                txn.too_big = True
            if not txn.too_big and not txn.bare_lf:
                self._events.append(DataChunk(piece))
        if self._bdat_left:
            return True
        self._state = "ready"
        if self._bdat_refusal is not None:
            self._refuse(self._bdat_refusal)
            return True
        if self._bdat_last:
            if txn.cr_pending:
                txn.bare_lf = True  # the message ends in a CR of its own
            self._ask("data", DataEnd(txn.size, txn.received, _refusal(txn)))
        else:
            self._reply(Reply(250, "2.0.0", f"{txn.size} octets received"))
        return True


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses (ValueError)."""
    return text.isascii() and text.isdigit()


def _header_too_big(txn: _Transaction) -> None:
    """The rest is read and dropped, at body speed (no more header lines to count)."""
    txn.header_too_big = txn.too_big = True
    txn.in_headers = False


def _refusal(txn: _Transaction) -> Reply | None:
    """What the end of a message is answered, when the session knows it already."""
    if txn.header_too_big:
        return replies.HEADER_TOO_BIG
    if txn.too_big:
        return replies.MESSAGE_TOO_BIG
    return replies.BARE_LF if txn.bare_lf else None


def _check_line_ends(txn: _Transaction, piece: bytes) -> None:
    """BDAT chunks hold the message as it is, so its line ends are checked as DATA's are: a
    CR or LF that is not part of a CRLF, also where a CRLF is cut between two chunks, makes
    the message refused with 550 5.6.11 (read to its end first, RFC 3030 §3)."""
    if txn.bare_lf:
        return
    if txn.cr_pending:
        txn.cr_pending = False
        if not piece.startswith(b"\n"):
            txn.bare_lf = True
            return
        piece = piece[1:]
    if piece.endswith(b"\r"):
        txn.cr_pending = True
        piece = piece[:-1]
    pairs = piece.count(b"\r\n")
    if piece.count(b"\r") != pairs or piece.count(b"\n") != pairs:
        txn.bare_lf = True


def _count_received(txn: _Transaction, piece: bytes) -> int:
    """Count the Received: fields of a header that arrives in BDAT chunks of any size (a
    field may start in one chunk and end in the next), up to its empty line; how many bytes
    of `piece` are header fields (as DATA counts them: the empty line not included)."""
    start = 0
    while txn.in_headers:
        end = piece.find(b"\n", start)
        if len(txn.line_head) < 9:
            txn.line_head += piece[start:end + 1 if end >= 0 else len(piece)][:9 - len(txn.line_head)]
        if end < 0:
            return len(piece)
        if txn.line_head in (b"\r\n", b"\n"):
            txn.in_headers = False
            return start
        if txn.line_head.lower() == b"received:":
            txn.received += 1
        txn.line_head = b""
        start = end + 1
    return start


def _path_and_params(arg: str, keyword: str) -> tuple[str, dict[str, str | None]] | None:
    """("local@domain" or "", {PARAM: value}) from "FROM:<path> PARAMS", or None."""
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
    return path, params


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
        elif c in "<" and not quoted:
            return None
    return None


_COMMANDS = {
    "EHLO": Session._ehlo, "HELO": Session._helo_cmd, "MAIL": Session._mail, "RCPT": Session._rcpt,
    "DATA": Session._data, "BDAT": Session._bdat, "RSET": Session._rset, "NOOP": Session._noop,
    "QUIT": Session._quit, "VRFY": Session._vrfy, "STARTTLS": Session._starttls,
}
# Which commands each state takes (RFC 5321 §4.1.4; MAIL needs a greeting first).
_ALLOWED = {
    "connected": {"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "STARTTLS"},
    "ready": {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "STARTTLS"},
}
