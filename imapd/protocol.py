"""The Twisted side of imapd: bytes from the socket into the framer, commands into the
session one at a time, responses back out; STARTTLS, flow control, limits and timeouts.

Commands are strictly sequential: the framer is pulled only while no command runs (or
while the running one waits for a line: IDLE's DONE, an AUTHENTICATE response). That way
a literal's size limit is checked against the state the session is really in, and a
client that pipelines many commands is answered in order. Reading pauses while more than
READ_AHEAD bytes wait unparsed; writing is paced by the transport (the session awaits
`drain()` between FETCH batches), so a big FETCH never sits in memory whole.
"""

from __future__ import annotations

import asyncio

from conf.server_protocol import ServerFactory, ServerProtocol
from imapd.parser import Close, Continue, Frame, Framer, Reject, parse_command
from imapd.session import LOGOUT, NOT_AUTHENTICATED, Session
from imapd.syntax import ParseError

MAX_LINE = 64 * 1024
READ_AHEAD = 256 * 1024


class IMAPProtocol(ServerProtocol):
    logger_name = "imapd.protocol"

    def __init__(self, factory: ServerFactory):
        super().__init__(factory)
        self.session: Session | None = None
        self.framer: Framer | None = None
        self.busy = False
        self._line_waiter: asyncio.Future | None = None
        self._task: asyncio.Future | None = None

    def refusal(self) -> bytes:
        return b"* BYE [UNAVAILABLE] too many connections, try again later\r\n"

    def timeout_reply(self) -> bytes:
        return b"* BYE autologout; idle for too long\r\n"

    def shutdown_reply(self) -> bytes:
        return b"* BYE [UNAVAILABLE] server shutting down, reconnect later\r\n"

    def first_timeout(self) -> float:
        # [imap] login_timeout in all before login, however the client trickles bytes (RFC
        # 3501 §5.4's 30 minutes are for authenticated sessions); then [imap] timeout idle.
        return float(self.factory.context.config.imap.login_timeout)

    def started(self) -> None:
        self.session = Session(self.factory.context, self, self.sid)
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
            self.restart_timer(float(self.factory.context.config.imap.timeout))

    # -- reading ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes):  # noqa: N802
        if self.closing or self.framer is None:
            return
        self.idle_timer()
        self.framer.feed(data)
        self.pace_reading(self.framer.buffered(), READ_AHEAD)
        self._pump()

    def _pump(self) -> None:
        assert self.framer is not None and self.session is not None
        while not self.closing:
            waiting_line = self._line_waiter is not None and not self._line_waiter.done()
            if self.busy and not waiting_line:
                break
            if not self.writable() and not waiting_line:
                break  # the client is not reading our answers: stop taking commands (resumeProducing)
            event = self.framer.next()
            if event is None:
                break
            if isinstance(event, Continue):
                self.transport.write(b"+ Ready for literal data\r\n")
            elif isinstance(event, Reject):
                status = event.status if event.tag else "BAD"
                self.session.tagged(event.tag or "*", status, event.text, event.code)
                self.session.note_error(status)
            elif isinstance(event, Close):
                self.transport.write(f"* BYE {event.text}\r\n".encode())
                self.close()
            elif isinstance(event, Frame):
                if waiting_line:
                    self._line_waiter.set_result(event.raw)
                    continue
                try:
                    command = parse_command(event)
                except ParseError as e:
                    self.session.parse_failed(e)
                    continue
                self.busy = True
                self._task = asyncio.ensure_future(self._run(command))  # held: the loop keeps only weak references
        self.pace_reading(self.framer.buffered(), READ_AHEAD)

    async def _run(self, command) -> None:
        assert self.session is not None
        try:
            await self.session.handle(command)
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - Session.handle answers its own errors; this is a bug in it
            self.log.error("session_failed", exc_info=True)
            self.close()
        finally:
            self.busy = False
            self._task = None
        if self.session.state == LOGOUT:
            self.close()
            return
        self.idle_timer()
        self._pump()

    # -- what the session calls ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data)

    def next_line(self) -> asyncio.Future:
        """The next line the client sends, raw (IDLE's DONE, a SASL response)."""
        loop = asyncio.get_running_loop()
        self._line_waiter = waiter = loop.create_future()
        loop.call_soon(self._pump)
        return waiter

    async def start_tls(self) -> None:
        assert self.framer is not None and self.session is not None
        # Whatever the client sent after STARTTLS in the clear must not count as sent over
        # TLS (the CVE-2011-0411 class): the framer starts empty.
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal,
                             literal_sink=self.session.literal_sink)
        self.start_tls_now()

    def resumeProducing(self):  # noqa: N802 - the client reads again: take its next commands
        super().resumeProducing()
        if not self.busy and self.framer is not None:
            self._pump()



class IMAPFactory(ServerFactory):
    """One IMAP listener (143 with STARTTLS, or 993); `context` is the service's."""

    protocol = IMAPProtocol
