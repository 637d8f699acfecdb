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

from conf.server_protocol import ServerFactory, ServerProtocol
from pop3d.core import Authenticate, Retrieve, Update, err
from pop3d.session import Session

READ_AHEAD = 64 * 1024


class POP3Protocol(ServerProtocol):
    logger_name = "pop3d.protocol"

    def __init__(self, factory: ServerFactory):
        super().__init__(factory)
        self.session: Session | None = None
        self.busy = False
        self._task: asyncio.Future | None = None

    def refusal(self) -> bytes:
        return err("too many connections, try again later", "SYS/TEMP")

    def timeout_reply(self) -> bytes:
        # RFC 1939 §3: on autologout the server closes "without removing any messages or
        # sending any response" (a reply could land in the middle of a message body).
        return b""

    def shutdown_reply(self) -> bytes:
        # RFC 1939: closing without QUIT deletes nothing, so the client loses no work.
        return err("server shutting down, reconnect later", "SYS/TEMP")

    def first_timeout(self) -> float:
        # [pop3] login_timeout in all before login, however the client trickles bytes;
        # then [pop3] timeout (RFC 1939 §3: at least 10 minutes) from the last activity.
        return float(self.factory.context.config.pop3.login_timeout)

    def started(self) -> None:
        self.session = Session(self.factory.context, self, self.sid, implicit_tls=self.tls)
        self.transport.write(self.session.greeting())

    def ended(self) -> None:
        if self.session is not None:
            self.session.end()
            self.log.info("disconnect", user=self.session.user, state=self.session.core.state)

    def _touch(self) -> None:
        if self.session is not None and self.session.user is not None:
            self.restart_timer(float(self.factory.context.config.pop3.timeout))

    # -- reading ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes):  # noqa: N802
        if self.closing or self.session is None:
            return
        self._touch()
        self.session.core.receive_data(data)
        self.pace_reading(self.session.core.buffered(), READ_AHEAD)
        self._pump()

    def _pump(self) -> None:
        assert self.session is not None
        core = self.session.core
        # While the client does not read our replies, its next commands wait unparsed (and
        # reading pauses past READ_AHEAD): pipelined commands cannot pile replies up here.
        while not self.closing and not self.busy and self.writable():
            event = core.next_event()
            if event is None:
                break
            if isinstance(event, (Authenticate, Retrieve, Update)):
                self.busy = True
                self._task = asyncio.ensure_future(self._perform(event))  # held: the loop keeps weak references
            else:
                self.session.emit(event)
        self.pace_reading(core.buffered(), READ_AHEAD)

    async def _perform(self, event) -> None:
        assert self.session is not None
        try:
            await self.session.perform(event)
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - the session answers its own errors; this is a bug in it
            self.log.error("session_failed", exc_info=True)
            self.close()
        finally:
            self.busy = False
            self._task = None
        if not self.closing:
            self._pump()

    # -- what the session calls ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self._touch()
            self.transport.write(data)

    def start_tls(self) -> None:
        self.start_tls_now()

    def resumeProducing(self):  # noqa: N802 - the client reads again: answer its next commands
        super().resumeProducing()
        if not self.busy and self.session is not None:
            self._pump()


class POP3Factory(ServerFactory):
    """One POP3 listener (110 with STLS, or 995); `context` is the service's."""

    protocol = POP3Protocol
