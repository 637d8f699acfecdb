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

from twisted.internet.protocol import Factory, Protocol

from conf.logfmt import EventLogger, session_id
from imapd.parser import Close, Continue, Frame, Framer, Reject, parse_command
from imapd.session import LOGOUT, NOT_AUTHENTICATED, IMAPContext, Session
from imapd.syntax import ParseError

MAX_LINE = 64 * 1024
READ_AHEAD = 256 * 1024


class IMAPFactory(Factory):
    def __init__(self, context: IMAPContext, *, implicit_tls: bool):
        self.context = context
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's interface
        return IMAPProtocol(self)


class IMAPProtocol(Protocol):
    def __init__(self, factory: IMAPFactory):
        self.factory = factory
        self.sid = session_id()
        self.log = EventLogger("imapd.protocol").bind(sid=self.sid)
        self.peer = ""
        self.tls = factory.implicit_tls
        self.session: Session | None = None
        self.framer: Framer | None = None
        self.busy = False
        self.closing = False
        self.counted = False
        self._line_waiter: asyncio.Future | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer = None
        self._reading_paused = False
        self._task: asyncio.Future | None = None

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self):  # noqa: N802
        from twisted.internet import reactor

        self.peer = getattr(self.transport.getPeer(), "host", "")
        config = self.factory.context.config.imap
        if not self.factory.context.connections.admit(self.peer):
            self.log.warning("refused", ip=self.peer, reason="too_many_connections")
            self.transport.write(b"* BYE [UNAVAILABLE] too many connections, try again later\r\n")
            self.transport.loseConnection()
            self.closing = True
            return
        self.counted = True
        self.session = Session(self.factory.context, self, self.sid)
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal)
        self.transport.registerProducer(self, True)
        # [imap] login_timeout in all before login, however the client trickles bytes (RFC
        # 3501 §5.4's 30 minutes are for authenticated sessions); then [imap] timeout idle.
        self._timer = reactor.callLater(float(config.login_timeout), self._timed_out)
        self.log.info("connect", ip=self.peer, tls=self.tls)
        self.transport.write(self.session.greeting())

    def connectionLost(self, reason=None):  # noqa: N802
        self.closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.counted:
            self.factory.context.connections.release(self.peer)
            self.counted = False
        if self._line_waiter is not None and not self._line_waiter.done():
            self._line_waiter.set_exception(ConnectionError("connection closed"))
        self._writable.set()
        if self.session is not None:
            self.session.end()
            self.log.info("disconnect", user=self.session.user)

    def _timed_out(self) -> None:
        self.log.info("timeout", user=self.session.user if self.session else None)
        self.transport.write(b"* BYE autologout; idle for too long\r\n")
        self.close()

    # -- reading ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes):  # noqa: N802
        if self.closing or self.framer is None:
            return
        if self._timer is not None and self._timer.active() and self.session.state != NOT_AUTHENTICATED:
            self._timer.reset(float(self.factory.context.config.imap.timeout))
        self.framer.feed(data)
        if self.framer.buffered() > READ_AHEAD and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        self._pump()

    def _pump(self) -> None:
        assert self.framer is not None and self.session is not None
        while not self.closing:
            waiting_line = self._line_waiter is not None and not self._line_waiter.done()
            if self.busy and not waiting_line:
                break
            if not self._writable.is_set() and not waiting_line:
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
        if self._reading_paused and self.framer.buffered() <= READ_AHEAD // 2 and not self.closing:
            self._reading_paused = False
            self.transport.resumeProducing()

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
        if self._timer is not None and self._timer.active() and self.session.state != NOT_AUTHENTICATED:
            self._timer.reset(float(self.factory.context.config.imap.timeout))  # logged in: the idle timer
        self._pump()

    # -- what the session calls ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()
        if self.closing:
            raise ConnectionError("connection closed")

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
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal)
        self.transport.startTLS(self.factory.context.tls)
        self.tls = True
        self.log.info("starttls")

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            # A registered producer keeps a TLS transport open until it is unregistered.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    # -- IPushProducer: the transport tells us when its write buffer is full ------------------

    def pauseProducing(self):  # noqa: N802
        self._writable.clear()

    def resumeProducing(self):  # noqa: N802
        self._writable.set()
        if not self.busy and self.framer is not None:
            self._pump()

    def stopProducing(self):  # noqa: N802
        self._writable.set()
