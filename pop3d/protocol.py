"""The Twisted side of pop3d: bytes from the socket into the core, its events to the
session one at a time, replies back out; STLS, flow control, limits and timeouts.

Events that need the store (a login, a RETR, QUIT's UPDATE) run as coroutines on the event
loop; the core gives no further event until one finishes, so pipelined commands are
answered in order. Reading pauses while more than READ_AHEAD bytes wait unparsed; writing
is paced by the transport (the session awaits `drain()` between chunks of a message), so
a large RETR never sits in memory whole. The idle timer (RFC 1939 §3: at least 10 minutes)
restarts on every read and every chunk written: a client that stops reading a RETR is
dropped after it as one that stops talking.
"""

from __future__ import annotations

import asyncio

from twisted.internet.protocol import Factory, Protocol

from conf.logfmt import EventLogger, session_id
from pop3d.core import Authenticate, Retrieve, Update, err
from pop3d.session import POP3Context, Session

READ_AHEAD = 64 * 1024


class POP3Factory(Factory):
    def __init__(self, context: POP3Context, *, implicit_tls: bool):
        self.context = context
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's interface
        return POP3Protocol(self)


class POP3Protocol(Protocol):
    def __init__(self, factory: POP3Factory):
        self.factory = factory
        self.sid = session_id()
        self.log = EventLogger("pop3d.protocol").bind(sid=self.sid)
        self.peer = ""
        self.tls = factory.implicit_tls
        self.session: Session | None = None
        self.busy = False
        self.closing = False
        self.counted = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer = None
        self._reading_paused = False

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self):  # noqa: N802
        from twisted.internet import reactor

        self.peer = getattr(self.transport.getPeer(), "host", "")
        config = self.factory.context.config.pop3
        if not self.factory.context.connections.admit(self.peer):
            self.log.warning("refused", ip=self.peer, reason="too_many_connections")
            self.transport.write(err("too many connections, try again later", "SYS/TEMP"))
            self.transport.loseConnection()
            self.closing = True
            return
        self.counted = True
        self.session = Session(self.factory.context, self, self.sid, implicit_tls=self.tls)
        self.transport.registerProducer(self, True)
        self._timer = reactor.callLater(float(config.timeout), self._timed_out)
        self.log.info("connect", ip=self.peer, tls=self.tls)
        self.transport.write(self.session.greeting())

    def connectionLost(self, reason=None):  # noqa: N802
        self.closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.counted:
            self.factory.context.connections.release(self.peer)
            self.counted = False
        self._writable.set()
        if self.session is not None:
            self.session.end()
            self.log.info("disconnect", user=self.session.user, state=self.session.core.state)

    def _timed_out(self) -> None:
        self.log.info("timeout", user=self.session.user if self.session else None)
        self.transport.write(err("autologout: idle for too long"))
        self.close()

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(float(self.factory.context.config.pop3.timeout))

    # -- reading ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes):  # noqa: N802
        if self.closing or self.session is None:
            return
        self._touch()
        self.session.core.receive_data(data)
        if self.session.core.buffered() > READ_AHEAD and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        self._pump()

    def _pump(self) -> None:
        assert self.session is not None
        core = self.session.core
        while not self.closing and not self.busy:
            event = core.next_event()
            if event is None:
                break
            if isinstance(event, (Authenticate, Retrieve, Update)):
                self.busy = True
                asyncio.ensure_future(self._perform(event))
            else:
                self.session.emit(event)
        if self._reading_paused and core.buffered() <= READ_AHEAD // 2 and not self.closing:
            self._reading_paused = False
            self.transport.resumeProducing()

    async def _perform(self, event) -> None:
        assert self.session is not None
        try:
            await self.session.perform(event)
        except ConnectionError:
            pass
        finally:
            self.busy = False
        if not self.closing:
            self._pump()

    # -- what the session calls ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self._touch()
            self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()
        if self.closing:
            raise ConnectionError("connection closed")

    def start_tls(self) -> None:
        self.transport.startTLS(self.factory.context.tls)
        self.tls = True
        self.log.info("starttls")

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.loseConnection()

    # -- IPushProducer: the transport tells us when its write buffer is full ------------------

    def pauseProducing(self):  # noqa: N802
        self._writable.clear()

    def resumeProducing(self):  # noqa: N802
        self._writable.set()

    def stopProducing(self):  # noqa: N802
        self._writable.set()
