"""The Twisted side of imapd: bytes from the socket into the framer, commands into the
session one at a time, responses back out; STARTTLS, limits and timeouts. The pump, flow
control and closing are wire.protocol's.

Commands are strictly sequential: the framer is pulled only while no command runs (or
while the running one waits for a line: IDLE's DONE, an AUTHENTICATE response). That way
a literal's size limit is checked against the state the session is really in, and a
client that pipelines many commands is answered in order. Reading pauses while more than
READ_AHEAD bytes wait unparsed; writing is paced by the transport (the session awaits
`drain()` between FETCH batches), so a big FETCH never sits in memory whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from imapd.parser import Frame, Framer
from imapd.session import LOGOUT, NOT_AUTHENTICATED, IMAPContext, Session
from wire.protocol import ServerFactory, ServerProtocol

MAX_LINE = 64 * 1024
READ_AHEAD = 256 * 1024


class IMAPFactory(ServerFactory):
    """One IMAP listener (143 with STARTTLS, or 993); `context` is the service's, which its
    two listeners share (with the connection limit and the TLS context in it)."""

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

    def refusal(self) -> bytes:
        return b"* BYE [UNAVAILABLE] too many connections, try again later\r\n"

    def timeout_reply(self) -> bytes:
        return b"* BYE autologout; idle for too long\r\n"

    def fault_reply(self) -> bytes:
        return f"* BYE [SERVERBUG] internal error, session {self.sid} (logged on the server)\r\n".encode()

    def shutdown_reply(self) -> bytes:
        return b"* BYE [UNAVAILABLE] server shutting down, reconnect later\r\n"

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
        self.framer.feed(data)

    def buffered(self) -> int:
        assert self.framer is not None
        return self.framer.buffered()

    def next_event(self):
        assert self.framer is not None
        return self.framer.next()

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

    async def start_tls(self) -> None:
        assert self.framer is not None and self.session is not None
        # Whatever the client sent after STARTTLS in the clear must not count as sent over
        # TLS (the CVE-2011-0411 class): the framer starts empty.
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal,
                             literal_sink=self.session.literal_sink)
        self.start_tls_now()
