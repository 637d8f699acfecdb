"""The Twisted side of pop3d: bytes from the socket into the core, its events to the
session one at a time, replies back out; STLS, limits and timeouts. The pump, flow control
and closing are wire.protocol's.

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
import time
from collections.abc import Awaitable

from pop3d.core import Authenticate, Retrieve, Update, err
from pop3d.session import POP3Context, Session
from wire import metrics
from wire.protocol import ServerFactory, ServerProtocol
from wire.relay import Relay

READ_AHEAD = 64 * 1024


class POP3Factory(ServerFactory):
    """One POP3 listener (110 with STLS, or 995); `context` is the service's, which its two
    listeners share (with the connection limit and the TLS context in it)."""

    SERVICE = "pop3"

    def __init__(self, context: POP3Context, *, implicit_tls: bool):
        super().__init__(connections=context.connections, tls=context.tls, implicit_tls=implicit_tls)
        self.context = context

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's interface
        return POP3Protocol(self)

    def background(self) -> set[asyncio.Task]:
        return self.context.background  # \Seen writes of sessions that have ended


class POP3Protocol(ServerProtocol):
    logger_name = "pop3d.protocol"
    read_ahead = READ_AHEAD

    _command_started = 0.0

    def __init__(self, factory: POP3Factory):
        super().__init__(factory)
        self.context = factory.context
        self.session: Session | None = None
        # A cluster's proxy (pop3d/proxy.py): once logged in at the owner, every byte relayed.
        self._relay_pending: Relay | None = None
        self._relay: Relay | None = None

    def refusal(self) -> bytes:
        return err("too many connections, try again later", "SYS/TEMP")

    def timeout_reply(self) -> bytes:
        # RFC 1939 §3: on autologout the server closes "without removing any messages or
        # sending any response" (a reply could land in the middle of a message body).
        return b""

    def fault_reply(self) -> bytes:
        return err(f"internal error, session {self.sid} (logged on the server)", "SYS/TEMP")

    def shutdown_reply(self) -> bytes:
        # RFC 1939: closing without QUIT deletes nothing, so the client loses no work.
        return err("server shutting down, reconnect later", "SYS/TEMP")

    def released_reply(self) -> bytes:
        # Read by the client as the answer to its next command; closing without QUIT
        # deletes nothing (RFC 1939 §6), and the next login reaches the new owner.
        return err("your mailbox has moved to another server, reconnect", "SYS/TEMP")

    def let_go(self) -> None:
        if self.session is not None:
            self.session.end()  # again at the connection's end: nothing more then

    def local_shard(self) -> int | None:
        session = self.session
        if session is None or session.user is None or self._relay is not None or self._relay_pending is not None:
            return None  # not logged in, or proxied: the owner's session
        return self.context.store.shard_number(session.user)

    def first_timeout(self) -> float:
        # [pop3] login_timeout in all before login, however the client trickles bytes;
        # then [pop3] timeout (RFC 1939 §3: at least 10 minutes) from the last activity.
        return float(self.context.config.pop3.login_timeout)

    def started(self) -> None:
        self.session = Session(self.context, self, self.sid, implicit_tls=self.tls)
        self.transport.write(self.session.greeting())

    def ended(self) -> None:
        if self._relay is not None:
            self._relay.close()
        if self.session is not None:
            self.session.end()
            self.log.info("disconnect", user=self.session.user, state=self.session.core.state)

    def _touch(self) -> None:
        if self.session is not None and self.session.user is not None:
            self.restart_timer(float(self.context.config.pop3.timeout))

    # -- the pump's steps (wire.protocol) ---------------------------------------------------

    def feed(self, data: bytes) -> None:
        assert self.session is not None
        self._touch()
        if self._relay is not None:
            self._relay.to_owner(data)
            return
        self.session.core.receive_data(data)

    def buffered(self) -> int:
        assert self.session is not None
        return self.session.core.buffered()

    def next_event(self):
        assert self.session is not None
        if self._relay is not None or self._relay_pending is not None:
            return None  # the owner answers: pop3d/proxy.py
        self._command_started = time.perf_counter()  # a command's time counts from its parsing
        return self.session.core.next_event()

    def dispatch(self, event) -> Awaitable[None] | None:
        assert self.session is not None
        session = self.session
        if isinstance(event, Retrieve) and session.retrieve_now(event):
            pass  # read ahead whole: sent at once, the pump goes on to the next command
        elif isinstance(event, (Authenticate, Retrieve, Update)):
            return self._timed(session.perform(event), session.core.verb)  # the store's work: runs alone
        else:
            session.emit(event)
        metrics.pop3_command(session.core.verb, time.perf_counter() - self._command_started)
        return None

    async def _timed(self, work: Awaitable[None], verb: str) -> None:
        started = self._command_started
        await work
        metrics.pop3_command(verb, time.perf_counter() - started)

    # -- what the session calls ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self._touch()
        super().write(data)

    def start_tls(self) -> None:
        self.start_tls_now()

    def relay_to(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay to and from the owner's session once the PASS reply is out (finished())."""
        self._relay_pending = Relay(self, reader, writer)

    def finished(self) -> None:
        if self._relay_pending is not None:
            assert self.session is not None
            self._relay, self._relay_pending = self._relay_pending, None
            self._relay.start(self.session.core.take_unread())
