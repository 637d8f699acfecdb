"""The Twisted side of imapd: bytes from the socket into the framer, commands into the
session one at a time, responses back out; STARTTLS, limits and timeouts. The pump, flow
control and closing are wire.protocol's.

Commands are strictly sequential: the framer is pulled only while no command runs (or
while the running one waits for a line: IDLE's DONE, an AUTHENTICATE response). That way
a literal's size limit is checked against the state the session is really in, and a
client that pipelines many commands is answered in order. Reading pauses while more than
READ_AHEAD bytes wait unparsed; writing is paced by the transport (the session awaits
`drain()` between FETCH batches), so a big FETCH never sits in memory whole.

COMPRESS=DEFLATE (RFC 4978, imapd/compress.py): once its tagged OK is out, the transport is
wrapped so that everything written, the BYE of a timeout or a shutdown included, is
compressed, and flushed once per reactor turn; what the client sends is kept compressed and
inflated only as far as the framer has room (READ_AHEAD), so reading pauses on a
decompression bomb as it does on a flood.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from imapd.compress import CompressionError, Deflate

from imapd.parser import Frame, Framer
from imapd.session import AUTHENTICATED, LOGOUT, NOT_AUTHENTICATED, SELECTED, IMAPContext, Session
from wire.protocol import ServerFactory, ServerProtocol
from wire.relay import Relay

MAX_LINE = 64 * 1024
READ_AHEAD = 256 * 1024


class IMAPFactory(ServerFactory):
    """One IMAP listener (143 with STARTTLS, or 993); `context` is the service's, which its
    two listeners share (with the connection limit and the TLS context in it)."""

    SERVICE = "imap"

    def __init__(self, context: IMAPContext, *, implicit_tls: bool):
        super().__init__(connections=context.connections, tls=context.tls, implicit_tls=implicit_tls)
        self.context = context

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's interface
        return IMAPProtocol(self)


class IMAPProtocol(ServerProtocol):
    logger_name = "imapd.protocol"
    read_ahead = READ_AHEAD

    def __init__(self, factory: IMAPFactory):
        super().__init__(factory)
        self.context = factory.context
        self.session: Session | None = None
        self.framer: Framer | None = None
        self._line_waiter: asyncio.Future | None = None
        self._deflate: Deflate | None = None  # COMPRESS=DEFLATE, once active
        # A cluster's proxy (imapd/proxy.py): the owner's connection, once the login there
        # is answered; from then on every byte is relayed and the session takes no command.
        self._relay_pending: Relay | None = None
        self._relay: Relay | None = None

    def refusal(self) -> bytes:
        return b"* BYE [UNAVAILABLE] too many connections, try again later\r\n"

    def timeout_reply(self) -> bytes:
        return b"* BYE autologout; idle for too long\r\n"

    def fault_reply(self) -> bytes:
        return f"* BYE [SERVERBUG] internal error, session {self.sid} (logged on the server)\r\n".encode()

    def shutdown_reply(self) -> bytes:
        return b"* BYE [UNAVAILABLE] server shutting down, reconnect later\r\n"

    def released_reply(self) -> bytes:
        # RFC 5530 §3: UNAVAILABLE, a temporary state; reconnecting reaches the new owner.
        return b"* BYE [UNAVAILABLE] your mailbox has moved to another server, reconnect\r\n"

    def let_go(self) -> None:
        if self.session is not None:
            self.session.end()  # again at the connection's end: nothing more then

    def local_shard(self) -> int | None:
        session = self.session
        if session is None or session.user is None or session.state not in (AUTHENTICATED, SELECTED):
            return None  # not logged in, logged out, or PROXIED: the owner's session
        return self.context.store.shard_number(session.user)

    def first_timeout(self) -> float:
        # [imap] login_timeout in all before login, however the client trickles bytes (RFC
        # 3501 §5.4's 30 minutes are for authenticated sessions); then [imap] timeout idle.
        return float(self.context.config.imap.login_timeout)

    def started(self) -> None:
        self.session = Session(self.context, self, self.sid)
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal,
                             literal_sink=self.session.literal_sink)
        self.transport.write(self.session.greeting())

    def ended(self) -> None:
        if self._relay is not None:
            self._relay.close()
        if self._line_waiter is not None and not self._line_waiter.done():
            self._line_waiter.set_exception(ConnectionError("connection closed"))
        if self.session is not None:
            self.session.end()
            self.log.info("disconnect", user=self.session.user)

    def idle_timer(self) -> None:
        """Logged in: [imap] timeout from the last command or byte."""
        if self.session is not None and self.session.state != NOT_AUTHENTICATED:
            self.restart_timer(float(self.context.config.imap.timeout))

    # -- the pump's steps (wire.protocol) ---------------------------------------------------

    def feed(self, data: bytes) -> None:
        assert self.framer is not None
        self.idle_timer()
        if self._relay is not None:
            self._to_owner(data)
            return
        if self._deflate is None:
            self.framer.feed(data)
            return
        self._deflate.received(data)
        self._inflate()

    def buffered(self) -> int:
        assert self.framer is not None
        backlog = self._deflate.backlog() if self._deflate is not None else 0
        return self.framer.buffered() + backlog

    def next_event(self):
        assert self.framer is not None
        if self._relay is not None or self._relay_pending is not None:
            return None  # the owner answers: imapd/proxy.py
        while True:
            event = self.framer.next()
            if event is not None or self._deflate is None or not self._inflate():
                return event

    def _inflate(self) -> bool:
        """Inflate what the client sent into the framer while it has room: whether any came."""
        assert self.framer is not None and self._deflate is not None
        came = False
        while not self.closing and self.framer.buffered() < READ_AHEAD:
            try:
                data = self._deflate.inflate(READ_AHEAD - self.framer.buffered())
            except CompressionError as e:
                self.log.warning("closed", reason="bad_compressed_data", error=str(e)[:100])
                self.write(b"* BYE [PARSE] compressed data is corrupt\r\n")
                self.close()
                return False
            if not data:
                break
            self.framer.feed(data)
            came = True
        return came

    def awaiting_input(self) -> bool:
        return self._line_waiter is not None and not self._line_waiter.done()

    def dispatch(self, event) -> Awaitable[None] | None:
        assert self.session is not None
        if isinstance(event, Frame) and self.awaiting_input():
            self._line_waiter.set_result(event.raw)  # IDLE's DONE, a SASL response
            return None
        return self.session.take(event)

    def finished(self) -> None:
        assert self.session is not None
        if self._relay_pending is not None:
            self._start_relay()
            return
        if self.session.state == LOGOUT:
            self.close()
            return
        self.idle_timer()

    # -- what the session calls ---------------------------------------------------------------

    def next_line(self) -> asyncio.Future:
        """The next line the client sends, raw (IDLE's DONE, a SASL response)."""
        loop = asyncio.get_running_loop()
        self._line_waiter = waiter = loop.create_future()
        loop.call_soon(self.pump)
        return waiter

    @property
    def compressing(self) -> bool:
        return self._deflate is not None

    def start_compression(self) -> None:
        """From now on both ways are DEFLATE (the tagged OK has been written in the clear).
        Whatever the client sent after COMPRESS before seeing the OK is taken as compressed
        (RFC 4978 §3: it may not send anything else meanwhile)."""
        assert self.framer is not None and self._deflate is None
        self._deflate = Deflate()
        self.transport = _CompressingTransport(self.transport, self._deflate)
        self.log.info("compress", mechanism="DEFLATE")
        unread = self.framer.take_unread()
        if unread:
            self._deflate.received(unread)
            self._inflate()

    # -- a cluster's proxy: the relay (wire/relay.py) ---------------------------------------

    def relay_to(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay to and from the owner's session once the current command's reply is out."""
        self._relay_pending = Relay(self, reader, writer)

    def _start_relay(self) -> None:
        assert self.framer is not None and self._relay_pending is not None
        self._relay, self._relay_pending = self._relay_pending, None
        self._relay.start(self.framer.take_unread())  # pipelined behind LOGIN (inflated already)
        if self._deflate is not None:
            self._to_owner(b"")

    def _to_owner(self, data: bytes) -> None:
        assert self._relay is not None
        if self._deflate is None:
            self._relay.to_owner(data)
            return
        self._deflate.received(data)
        while piece := self._deflate.inflate(READ_AHEAD):
            self._relay.to_owner(piece)

    async def start_tls(self) -> None:
        assert self.framer is not None and self.session is not None
        # Whatever the client sent after STARTTLS in the clear must not count as sent over
        # TLS (the CVE-2011-0411 class): the framer starts empty.
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal,
                             literal_sink=self.session.literal_sink)
        self.start_tls_now()


class _CompressingTransport:
    """The Twisted transport with DEFLATE on what is written: each write goes through the
    compressor, and one Z_SYNC_FLUSH per reactor turn sends what a burst of writes made
    (a FETCH of 1,000 lines is one flush, not 1,000). Anything else is the transport's."""

    def __init__(self, transport, deflate: Deflate):
        self._transport = transport
        self._deflate = deflate
        self._flush_pending = False

    def write(self, data: bytes) -> None:
        out = self._deflate.compress(data)
        if out:
            self._transport.write(out)
        if not self._flush_pending:
            from twisted.internet import reactor

            self._flush_pending = True
            reactor.callLater(0, self._flush)

    def writeSequence(self, data) -> None:  # noqa: N802 - Twisted's interface
        self.write(b"".join(data))

    def _flush(self) -> None:
        self._flush_pending = False
        if self._transport.connected and not self._transport.disconnecting:
            self._transport.write(self._deflate.flush())

    def loseConnection(self) -> None:  # noqa: N802 - Twisted's interface
        if self._flush_pending:
            self._flush()
        self._transport.loseConnection()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)
