"""The Twisted protocol base of imapd and pop3d: what a connection of either needs besides
its own protocol (limits, ids, timers, flow control, the read/write pump, closing).
Imported by those daemons only: `mtad` never loads Twisted.

The pump: bytes from the socket go into the subclass's sans-IO core (`feed`); its events
are taken one at a time (`next_event`) and answered (`dispatch`), either at once or by a
coroutine that runs alone: no further event is taken until it ends, so pipelined commands
are answered in order and a limit is checked against the state the session is really in.
Reading pauses while more than `read_ahead` bytes wait unparsed; no event is taken while
the client does not read our answers (the transport pauses us as a producer, `drain()`
waits), so a big answer never sits in memory whole and replies cannot pile up.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Container

from twisted.internet.protocol import Factory, Protocol

from conf.logfmt import EventLogger, session_id
from conf.tls import ServerTLS
from wire import metrics
from wire.connections import ConnectionLimit

CLOSE_GRACE = 10.0  # seconds a closing connection has to take what we wrote
GOODBYE_WAIT = 2.0  # seconds a stop waits for its clients to take their goodbye
# At a stop, a command whose client takes none of its answer for this long is cut off.
STALL_WAIT = 2.0
# Linux's struct tcp_info: tcpi_bytes_acked, a u64 after 8 one-byte fields, 24 u32 and two
# u64 pacing rates (include/uapi/linux/tcp.h, since 4.1).
_BYTES_ACKED = 120
_TCP_INFO_SIZE = 128


class ServerFactory(Factory):
    """One listener of a Twisted daemon: the connection limit its service's listeners share,
    the TLS context for STARTTLS (None without a certificate), and whether TLS starts at
    once (the port then wraps this factory in TLS)."""

    SERVICE = ""  # the metrics' name of the plain listener: "imap", "pop3"

    def __init__(self, *, connections: ConnectionLimit, tls: ServerTLS | None, implicit_tls: bool):
        self.service = self.SERVICE + "s" if implicit_tls else self.SERVICE  # imaps, pop3s
        self.connections = connections
        self.tls = tls
        self.implicit_tls = implicit_tls
        # Admitted connections, told when we stop, each until it is lost and its command (if
        # one runs) has ended: a stop closes the store's threads after them.
        self.live: set[ServerProtocol] = set()
        self._none_live = asyncio.Event()  # set while `live` is empty
        self._none_live.set()

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's interface
        """A protocol of this listener's daemon, given this factory."""
        raise NotImplementedError

    def admitted(self, protocol: ServerProtocol) -> None:
        self.live.add(protocol)
        self._none_live.clear()

    def gone(self, protocol: ServerProtocol) -> None:
        self.live.discard(protocol)
        if not self.live:
            self._none_live.set()

    async def none_live(self) -> None:
        """Returns once no admitted connection is left (at once if none is)."""
        await self._none_live.wait()

    def end_released(self, held: Container[int]) -> int:
        """Cluster mode (cluster/follow.py): end every session served here whose account's
        shard is not in `held`, the shards this node holds now; how many were told."""
        ended = 0
        for protocol in list(self.live):
            shard = protocol.local_shard()
            if shard is not None and shard not in held and not protocol.closing:
                protocol.end_released(shard)
                ended += 1
        return ended

    async def shutdown(self, grace: float) -> None:
        """The daemon stops: every client is told so (IMAP BYE, POP3 -ERR) and let go.
        Returns once the commands under way and the work sessions left behind have ended,
        or after `grace` seconds ([server] stop_grace), and once the clients are gone, or
        after GOODBYE_WAIT: a client that does not take its goodbye (a TLS close left
        unanswered) is closed by the process's exit, not waited for."""
        for protocol in list(self.live):
            if not protocol.closing:  # else gone or going (LOGOUT, QUIT, a timeout)
                protocol.tell_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # An APPEND's commit, a STORE, then what the sessions left behind (POP3's \Seen
        # writes after a QUIT that was under way): the store closes after them.
        for left in (self.commands, self.background):
            tasks = {task for task in left() if not task.done()}
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        try:
            await asyncio.wait_for(self.none_live(), min(grace, GOODBYE_WAIT))
        except TimeoutError:
            pass

    def commands(self) -> set[asyncio.Task]:
        """The commands under way in the sessions served here, but those waiting for their
        client (IDLE, a SASL exchange): they end with the connection."""
        return {protocol.running for protocol in self.live
                if protocol.running is not None and not protocol.awaiting_input()}

    def background(self) -> set[asyncio.Task]:
        """Work the sessions left running after their end (POP3's \\Seen writes), which a
        stop waits for within its grace as for the sessions themselves."""
        return set()


class ServerProtocol(Protocol):
    """What imapd's and pop3d's protocols share: the connection limit, a session id in
    every log line, one timer (`restart_timer`), the pump (see the module), write pacing
    (`drain()`), read pausing, and a close that a TLS transport honours.

    Subclasses say what to send (`refusal`, `timeout_reply`, `shutdown_reply`), what starts
    and ends a session (`started`, `ended`), and drive the pump: `feed`, `buffered`,
    `next_event`, `dispatch`, and optionally `awaiting_input` and `finished`."""

    logger_name = "wire.protocol"
    read_ahead = 64 * 1024  # unparsed bytes past which reading pauses

    def __init__(self, factory: ServerFactory):
        self.factory = factory
        self.sid = session_id()
        self.log = EventLogger(self.logger_name).bind(sid=self.sid)
        self.peer = ""
        self.tls = factory.implicit_tls
        self.closing = False
        self.counted = False
        self.busy = False  # a coroutine from `dispatch` runs
        self._open = False  # the session is started: the pump may run
        self._task: asyncio.Future | None = None  # held: the loop keeps only weak references
        self._lost = False  # connectionLost came: `live` lets go once _task has ended too
        self._stop_told = False  # the daemon stops: tell_shutdown once the command has ended
        self._writable = asyncio.Event()
        self._writable.set()
        self._resumes = 0  # times the client took what was written: a stop's progress check
        self._timer = None
        self._abort = None
        self._reading_paused = False
        self._released: int | None = None  # the shard let go while a command ran: end after it

    # -- what a subclass says -----------------------------------------------------------

    def refusal(self) -> bytes:
        raise NotImplementedError

    def timeout_reply(self) -> bytes:
        raise NotImplementedError

    def shutdown_reply(self) -> bytes:
        raise NotImplementedError

    def fault_reply(self) -> bytes:
        """The last words to a client whose connection a bug in our code ends (logged with
        its traceback); the text never carries the exception's."""
        return b""

    def first_timeout(self) -> float:
        raise NotImplementedError

    def local_shard(self) -> int | None:
        """The shard of the account this session serves from this node's store; None before
        login, and for a session proxied to the owner of the account's shard."""
        return None

    def released_reply(self) -> bytes:
        """The last words to a client whose account's shard this node let go."""
        raise NotImplementedError

    def let_go(self) -> None:
        """The account's shard is no longer this node's and the session is closing: drop,
        now, what the session holds open on the shard's volume (a POP3 maildrop lock, a
        message file read ahead, an APPEND's message file), not once the connection is
        gone, which a TLS close makes wait up to CLOSE_GRACE for the client: the node
        detaches the volume once nothing of it is open (cluster/pins.py)."""

    def started(self) -> None:
        """The connection is admitted: make the session, send the greeting."""

    def ended(self) -> None:
        """The connection is gone."""

    def feed(self, data: bytes) -> None:
        """Bytes from the client into the core."""
        raise NotImplementedError

    def buffered(self) -> int:
        """Bytes the core holds unparsed."""
        raise NotImplementedError

    def next_event(self) -> object | None:
        """The core's next event, or None until more bytes come."""
        raise NotImplementedError

    def dispatch(self, event: object) -> Awaitable[None] | None:
        """Answer `event` now (None), or return what answers it, to run alone."""
        raise NotImplementedError

    def awaiting_input(self) -> bool:
        """True while what runs waits for the client's next event (IMAP's IDLE DONE, a
        SASL response): the pump goes on taking events for it."""
        return False

    def finished(self) -> None:
        """What `dispatch` returned has ended; the pump goes on unless the connection closes."""

    # -- Twisted ------------------------------------------------------------------------

    def connectionMade(self):  # noqa: N802
        from twisted.internet import reactor

        self.peer = getattr(self.transport.getPeer(), "host", "")
        if not self.factory.connections.admit(self.peer):
            metrics.connection(self.factory.service, accepted=False)
            self.log.warning("refused", ip=self.peer, reason="too_many_connections")
            self.transport.write(self.refusal())
            self.transport.loseConnection()
            self.closing = True
            return
        self.counted = True
        metrics.connection(self.factory.service, accepted=True)
        self.factory.admitted(self)
        self.transport.registerProducer(self, True)
        self._timer = reactor.callLater(self.first_timeout(), self._timed_out)
        self.log.info("connect", ip=self.peer, tls=self.tls)
        self.started()
        self._open = True

    def connectionLost(self, reason=None):  # noqa: N802
        self.closing = True
        self._lost = True
        if self._task is None:
            self.factory.gone(self)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.counted:
            self.factory.connections.release(self.peer)
            metrics.connection_closed(self.factory.service)
            self.counted = False
        self._writable.set()
        self.ended()

    def dataReceived(self, data: bytes):  # noqa: N802
        if self.closing or not self._open:
            return
        self.feed(data)
        self.pace_reading(self.buffered(), self.read_ahead)
        self.pump()

    def _timed_out(self) -> None:
        self.log.info("timeout")
        reply = self.timeout_reply()
        if reply:
            self.transport.write(reply)
        self.close()

    # -- the pump -----------------------------------------------------------------------

    def pump(self) -> None:
        """Take and answer events while nothing runs and the client reads our answers."""
        while not self.closing:
            if (self.busy or not self.writable()) and not self.awaiting_input():
                break  # resumed by _run's end or by resumeProducing
            try:
                event = self.next_event()
                if event is None:
                    break
                work = self.dispatch(event)
            except Exception:  # noqa: BLE001 - a bug in the core costs this connection, said and logged
                self._failed()
                return
            if work is not None:
                self.busy = True
                self._task = asyncio.ensure_future(self._run(work))
        self.pace_reading(self.buffered(), self.read_ahead)

    async def _run(self, work: Awaitable[None]) -> None:
        try:
            await work
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - the session answers its own errors; this is a bug in it
            self._failed()
        finally:
            self.busy = False
            self._task = None
            if self._lost:
                self.factory.gone(self)
        self.finished()
        if self._stop_told and not self.closing:
            self.tell_shutdown()
        elif self._released is not None and not self.closing:
            self.end_released(self._released)
        if not self.closing:
            self.pump()

    def _failed(self) -> None:
        self.log.error("session_failed", exc_info=True)
        reply = self.fault_reply()
        if reply and not self.closing:
            self.transport.write(reply)
        self.close()

    def tell_shutdown(self) -> None:
        """The daemon stops: say so (IMAP BYE, POP3 -ERR) and close, now if no command runs
        (or the one running waits for the client: IDLE), else once it is answered, so that
        the client hears its answer (an APPEND's OK: without it the client appends again)
        and the goodbye never lands inside it; the commands pipelined behind it are not
        taken. A command whose client stops taking its answer (a big FETCH or RETR to a
        client that reads nothing) is cut off once it has taken nothing for STALL_WAIT, with
        no goodbye; one whose client goes on reading (a RETR to a slow link) goes on too,
        within the grace."""
        if self.busy and not self.awaiting_input():
            self._stop_told = True  # _run comes back here once the command has ended
            self._watch_for_stall(self._sent())
            return
        self.log.info("shutdown")
        self.transport.write(self.shutdown_reply())
        self.close()

    def _sent(self) -> tuple[int, int | None]:
        """What tells that the client takes our answer, as values that only grow: the
        transport's resumes (its buffer emptied into the socket: with MBs of socket buffer,
        seconds apart for a slow reader) and the bytes the client's side has acknowledged
        (TCP_INFO's tcpi_bytes_acked, which moves at every window the client opens)."""
        transport = self.transport
        while not hasattr(transport, "socket") and getattr(transport, "transport", None) is not None:
            transport = transport.transport  # under implicit TLS's wrapper, the TCP connection
        try:
            info = transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            acked = struct.unpack_from("Q", info, _BYTES_ACKED)[0] if len(info) >= _TCP_INFO_SIZE else None
        except (AttributeError, OSError):
            acked = None  # not a TCP socket we can ask: the resumes alone
        return self._resumes, acked

    def _watch_for_stall(self, sent: tuple[int, int | None]) -> None:
        from twisted.internet import reactor

        reactor.callLater(STALL_WAIT, self._cut_off_if_stalled, sent)

    def _cut_off_if_stalled(self, sent: tuple[int, int | None]) -> None:
        if self.closing or not self.busy:
            return  # ended: _run said goodbye
        now = self._sent()
        if not self.writable() and now == sent:  # the client took nothing since
            self.log.info("shutdown", cut_off=True, acked=now[1])
            self.close()
            self.unblock_drain()  # the command's drain() raises ConnectionError
            return
        self._watch_for_stall(now)

    def end_released(self, shard: int) -> None:
        """The account's shard is no longer this node's: say so and close, now if no command
        runs (or the one running waits for the client: IDLE), else once it is answered, so
        that the reply never lands inside another. A command that waits for the client to
        read its answer (a big RETR or FETCH to a slow reader) is cut off instead: it holds a
        file of the shard open for as long as the client likes, and the node's agent waits
        only so long before it detaches the volume under it (cluster/pins.py)."""
        if self.busy and not self.awaiting_input():
            if self.writable():
                self._released = shard  # the next look (cluster/follow.py) comes back
                return
            self.log.info("closed", reason="shard_released", shard=shard, cut_off=True)
            self.close()  # no reply: it would land inside the answer being sent
            self.unblock_drain()  # the command closes its file
            self.let_go()
            return
        self.log.info("closed", reason="shard_released", shard=shard)
        self.transport.write(self.released_reply())
        self.close()
        self.let_go()

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

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data)

    def writable(self) -> bool:
        return self._writable.is_set()

    @property
    def running(self) -> asyncio.Future | None:
        """The command under way, if one is."""
        return self._task

    def unblock_drain(self) -> None:
        """Closing: a command waiting in drain() for the client to read raises ConnectionError."""
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()
        if self.closing:
            raise ConnectionError("connection closed")

    def start_tls_now(self) -> None:
        assert self.factory.tls is not None, "STARTTLS is only offered with a certificate"
        self.transport.startTLS(self.factory.tls)
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
        self._resumes += 1
        self._writable.set()
        if not self.busy and self._open:
            self.pump()  # the client reads again: take its next commands

    def stopProducing(self):  # noqa: N802
        self._writable.set()
