"""In-memory adapters for the three sans-IO protocol cores, shared by the linear-time tests
(test_linear_time.py), the property tests (test_fuzz_cores.py) and bench/fuzz.py.

Each plays its daemon's part the plain way: feeds the bytes in the pieces it is given,
answers every question the core asks (accepting, except where told), and records what
matters for comparing runs: the events (message bodies joined, however they were cut
into chunks), the bytes a client would read, and the most bytes the core kept waiting.

A stream is fed as segments: a segment ends where the client starts TLS (SMTP STARTTLS,
POP3 STLS). Once the core says to start TLS, the rest of that segment is plaintext the
client pipelined behind the command and is never read; the next segment is what comes
over TLS. That way a stream gives the same result fed whole or in any pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from imapd.parser import Close as IMAPClose
from imapd.parser import Continue, Frame, Framer, Reject, parse_command
from imapd.syntax import ParseError
from mtad import replies
from mtad import events as smtp
from mtad.session import Session, SessionConfig
from pop3d import core as pop3
from pop3d import replies as pop3_replies
from pop3d.framer import BodyEncoder
from pop3d.maildrop import Maildrop

QUEUED = replies.Reply(250, "2.0.0", "OK queued as TEST")
POP3_PASSWORD = "s3cret"
SMTP_PASSWORD = "s3cret"  # the one password SMTPDriver takes for AUTH


def cut(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    """`data` in pieces of the given sizes (the last size repeats); every byte kept."""
    sizes = [max(1, size) for size in sizes] or [len(data) or 1]
    out, pos = [], 0
    for size in sizes[:-1]:
        if pos >= len(data):
            return out
        out.append(data[pos:pos + size])
        pos += size
    last = sizes[-1]  # the bulk of a long input: sliced in one comprehension, not a step a piece
    out.extend(data[start:start + last] for start in range(pos, len(data), last))
    return out


class _SegmentDriver:
    """Feeds one segment of a stream piece by piece, until the core closes or starts TLS."""

    closed = False
    _segment_over = False

    def feed(self, pieces: Iterable[bytes]) -> None:
        self._segment_over = False
        for piece in pieces:
            if self.closed or self._segment_over:
                return
            self._receive(piece)

    def _receive(self, piece: bytes) -> None:
        raise NotImplementedError


class SMTPDriver(_SegmentDriver):
    """mtad.inbound's part: RCPT to an address `refuse` names gets 550 5.1.1; a message
    with a refusal is answered with it, any other with 250. AUTH (mtad.submission's part)
    succeeds with SMTP_PASSWORD, for any user."""

    def __init__(self, config: SessionConfig, refuse: Callable[[str], bool] = lambda address: False):
        self.session = Session(config)
        self.refuse = refuse
        self.wire = bytearray(self.session.data_to_send())
        self.events: list[tuple] = []
        self.asked: list = []  # the MailFrom and RcptTo events, as the session made them
        self.messages: list[bytes] = []  # accepted messages, as spooled
        self.peaks = {False: 0, True: 0}  # most bytes left waiting, outside / inside a message
        self._spool = bytearray()

    def _receive(self, piece: bytes) -> None:
        self.session.receive(piece)
        self._drain()

    def _drain(self) -> None:
        session = self.session
        while True:
            event = session.next_event()
            if event is smtp.NEED_DATA:
                receiving = session.receiving
                self.peaks[receiving] = max(self.peaks[receiving], session.buffered())
                break
            if event is smtp.PAUSED:
                raise AssertionError("the session still waits, though every question was answered")
            if isinstance(event, smtp.Hello):
                self.events.append(("hello", event.name, event.extended))
                session.answer(event, replies.OK)
            elif isinstance(event, smtp.Auth):
                self.events.append(("auth", event.mechanism, event.authcid, event.authzid))
                session.answer(event, replies.AUTH_OK if event.password == SMTP_PASSWORD else replies.AUTH_FAILED)
            elif isinstance(event, smtp.MailFrom):
                self.events.append(("mail", event.address, tuple(sorted(event.params.items(), key=repr))))
                self.asked.append(event)
                session.answer(event, replies.SENDER_OK)
            elif isinstance(event, smtp.RcptTo):
                refused = self.refuse(event.address)
                self.events.append(("rcpt", event.address, refused))
                self.asked.append(event)
                session.answer(event, replies.NO_SUCH_USER if refused else replies.RECIPIENT_OK)
            elif isinstance(event, smtp.DataChunk):
                self._spool += event.data
            elif isinstance(event, smtp.DataEnd):
                # A refused message's spool is thrown away: what was spooled before the
                # session knew depends on how the bytes arrived, and is no event.
                message = bytes(self._spool) if event.refusal is None else None
                self.events.append(("end", event.size, event.received_headers, event.refusal, message))
                if message is not None:
                    self.messages.append(message)
                self._spool.clear()
                session.answer(event, event.refusal or QUEUED)
            elif isinstance(event, smtp.StartTLS):
                self.events.append(("tls",))
                self.wire += session.data_to_send()
                session.tls_established()
                self._segment_over = True
            elif isinstance(event, smtp.Close):
                self.events.append(("close",))
                self.closed = True
            else:
                raise AssertionError(f"unexpected event {event!r}")
            self.wire += session.data_to_send()
        self.wire += session.data_to_send()


class IMAPDriver:
    """imapd.protocol's reading part: the framer pulled until it needs bytes, every Frame
    parsed. `events` holds ("continue",), ("reject", tag, text, code, status),
    ("close", text), ("command", Command) and ("bad", tag, text, code, status)."""

    def __init__(self, parse: bool = True, **limits):
        self.framer = Framer(**limits)
        self.parse = parse
        self.events: list[tuple] = []
        self.frames: list[Frame] = []
        self.errors: list[ParseError] = []
        self.closed = False
        self.peak_buffered = 0  # bytes fed and not taken, once the framer needs more
        self.peak_held = 0  # bytes of the command being read (its lines and literals so far)

    def feed(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            if self.closed:
                return
            self.framer.feed(piece)
            while (event := self.framer.next()) is not None:
                self._take(event)
            self.peak_buffered = max(self.peak_buffered, self.framer.buffered())
            self.peak_held = max(self.peak_held, self.framer.held())

    def _take(self, event) -> None:
        if isinstance(event, Continue):
            self.events.append(("continue",))
        elif isinstance(event, Reject):
            self.events.append(("reject", event.tag, event.text, event.code, event.status))
        elif isinstance(event, IMAPClose):
            self.events.append(("close", event.text))
            self.closed = True
        elif isinstance(event, Frame):
            self.frames.append(event)
            if not self.parse:
                self.events.append(("frame", tuple(event.parts)))
                return
            try:
                self.events.append(("command", parse_command(event)))
            except ParseError as error:
                self.errors.append(error)
                self.events.append(("bad", error.tag, str(error), error.code, error.status))
        else:
            raise AssertionError(f"unexpected event {event!r}")


class POP3Driver(_SegmentDriver):
    """pop3d.session's part: POP3_PASSWORD logs in to a maildrop of `messages` (uid ->
    bytes), RETR and TOP stream through BodyEncoder in `chunk`-byte pieces, QUIT removes.
    `replies` holds each response as sent, a message's whole multi-line response as one."""

    def __init__(self, settings: pop3.Settings, messages: dict[int, bytes], chunk: int = 4096):
        self.core = pop3.POP3Core(settings)
        self.messages = messages
        self.chunk = chunk
        self.replies: list[bytes] = [self.core.greeting()]
        self.retrieved: list[tuple[int, int | None, bytes]] = []  # (uid, TOP lines, response)
        self.events: list[tuple] = []
        self.peak_buffered = 0  # bytes waiting in the line buffer, once an open session needs more

    def _receive(self, piece: bytes) -> None:
        self.core.receive_data(piece)
        while not self.closed and (event := self.core.next_event()) is not None:
            self._act(event)
        if not self.closed:
            self.peak_buffered = max(self.peak_buffered, self.core.buffered())

    def _act(self, event) -> None:
        core = self.core
        if isinstance(event, pop3.Reply):
            self.replies.append(event.data)
        elif isinstance(event, pop3.Close):
            self.replies.append(event.data)
            self.closed = True
        elif isinstance(event, pop3.StartTLS):
            self.replies.append(event.data)
            self.events.append(("tls",))
            self._segment_over = True
        elif isinstance(event, pop3.Authenticate):
            self.events.append(("login", event.user, event.mechanism))
            if event.password == POP3_PASSWORD:
                listing = ((uid, len(raw)) for uid, raw in sorted(self.messages.items()))
                self._act(core.logged_in(Maildrop(7, listing)))
            else:
                self._act(core.login_refused(pop3_replies.WRONG_PASSWORD))
        elif isinstance(event, pop3.Retrieve):
            self.events.append(("retrieve", event.uid, event.lines))
            raw = self.messages[event.uid]
            encoder = BodyEncoder(event.lines)
            out = bytearray(event.ok)
            for pos in range(0, len(raw), self.chunk):
                if encoder.done:
                    break
                out += encoder.feed(raw[pos:pos + self.chunk])
            out += encoder.end()
            self.replies.append(bytes(out))
            self.retrieved.append((event.uid, event.lines, bytes(out)))
            core.finished(event)
        elif isinstance(event, pop3.Update):
            self.events.append(("update", event.uids))
            self._act(core.updated(len(event.uids)))
        else:
            raise AssertionError(f"unexpected event {event!r}")
