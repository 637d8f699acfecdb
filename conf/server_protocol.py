"""The Twisted protocol base of imapd and pop3d: what a connection of either needs besides
its own protocol (limits, ids, timers, flow control, closing). Imported by those daemons
only: `mtad` alone never loads Twisted."""

from __future__ import annotations

import asyncio

from twisted.internet.protocol import Factory, Protocol

from conf.logfmt import EventLogger, session_id

CLOSE_GRACE = 10.0  # seconds a closing connection has to take what we wrote


class ServerFactory(Factory):
    """One listener of a Twisted daemon: its service context and whether TLS starts at once."""

    def __init__(self, context, *, implicit_tls: bool):
        self.context = context
        self.implicit_tls = implicit_tls
        self.live: set[ServerProtocol] = set()  # admitted connections, told when we stop

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's interface
        return self.protocol(self)

    async def shutdown(self, grace: float = 2.0) -> None:
        """The daemon stops: every client is told so (IMAP BYE, POP3 -ERR) and let go;
        returns once they are gone, or after `grace` seconds."""
        for protocol in list(self.live):
            protocol.log.info("shutdown")
            protocol.transport.write(protocol.shutdown_reply())
            protocol.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.live and loop.time() < deadline:
            await asyncio.sleep(0.02)


class ServerProtocol(Protocol):
    """What imapd's and pop3d's protocols share: the connection limit, a session id in
    every log line, one timer (`restart_timer`), write pacing (the transport pauses us
    as a producer; `drain()` waits), read pausing, and a close that a TLS transport
    honours. Subclasses say what to send (`refusal`, `timeout_reply`) and what starts
    and ends a session (`started`, `ended`)."""

    logger_name = "server.protocol"

    def __init__(self, factory):
        self.factory = factory
        self.sid = session_id()
        self.log = EventLogger(self.logger_name).bind(sid=self.sid)
        self.peer = ""
        self.tls = factory.implicit_tls
        self.closing = False
        self.counted = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer = None
        self._abort = None
        self._reading_paused = False

    # -- hooks --------------------------------------------------------------------------

    def refusal(self) -> bytes:
        raise NotImplementedError

    def timeout_reply(self) -> bytes:
        raise NotImplementedError

    def shutdown_reply(self) -> bytes:
        raise NotImplementedError

    def first_timeout(self) -> float:
        raise NotImplementedError

    def started(self) -> None:
        """The connection is admitted: make the session, send the greeting."""

    def ended(self) -> None:
        """The connection is gone."""

    # -- Twisted ------------------------------------------------------------------------

    def connectionMade(self):  # noqa: N802
        from twisted.internet import reactor

        self.peer = getattr(self.transport.getPeer(), "host", "")
        if not self.factory.context.connections.admit(self.peer):
            self.log.warning("refused", ip=self.peer, reason="too_many_connections")
            self.transport.write(self.refusal())
            self.transport.loseConnection()
            self.closing = True
            return
        self.counted = True
        self.factory.live.add(self)
        self.transport.registerProducer(self, True)
        self._timer = reactor.callLater(self.first_timeout(), self._timed_out)
        self.log.info("connect", ip=self.peer, tls=self.tls)
        self.started()

    def connectionLost(self, reason=None):  # noqa: N802
        self.closing = True
        self.factory.live.discard(self)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.counted:
            self.factory.context.connections.release(self.peer)
            self.counted = False
        self._writable.set()
        self.ended()

    def _timed_out(self) -> None:
        self.log.info("timeout")
        reply = self.timeout_reply()
        if reply:
            self.transport.write(reply)
        self.close()

    def restart_timer(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)

    def pace_reading(self, buffered: int, read_ahead: int) -> None:
        """Stop reading while more than `read_ahead` bytes wait unparsed; go on below half."""
        if buffered > read_ahead and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif self._reading_paused and buffered <= read_ahead // 2 and not self.closing:
            self._reading_paused = False
            self.transport.resumeProducing()

    # -- what sessions call -------------------------------------------------------------

    def writable(self) -> bool:
        return self._writable.is_set()

    async def drain(self) -> None:
        await self._writable.wait()
        if self.closing:
            raise ConnectionError("connection closed")

    def start_tls_now(self) -> None:
        self.transport.startTLS(self.factory.context.tls)
        self.tls = True
        self.log.info("starttls")

    def close(self) -> None:
        """Close after what is written has gone out; a client that does not read it within
        CLOSE_GRACE is cut off (its session must end: a POP3 maildrop lock goes with it)."""
        if not self.closing:
            from twisted.internet import reactor

            self.closing = True
            # A registered producer keeps a TLS transport open until it is unregistered.
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            self._abort = reactor.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # -- IPushProducer: the transport says when its write buffer is full ---------------

    def pauseProducing(self):  # noqa: N802
        self._writable.clear()

    def resumeProducing(self):  # noqa: N802
        self._writable.set()

    def stopProducing(self):  # noqa: N802
        self._writable.set()
