"""The writer process ([smtp] writer = true): the MX's small deliveries committed in a
process of their own, not in the interpreter of the event loop that took them.

Why: a shard's committer is a thread, and in mtad it shares its interpreter lock with the
sessions' event loop. What it does after a 250 (LMDB's commit, the file made in cur/, its
Python between system calls) waits for that lock while the loop serves the next commands,
and the loop waits for it in turn; the two mtad workers also take turns at each shard's
LMDB writer lock. In the writer process one interpreter parses, indexes and commits for
every mtad process, beside their loops (bench/RESULTS.md, "a writer process").

The wire: a Unix socket in the data dir (SOCKET_NAME, mode 0600: the data dir's owner
only), one connection per mtad process, frames of a 4-byte length and a msgpack map. A
request carries an id, the message (up to storage.delivery.IN_MEMORY bytes: what a session
holds in memory), its targets and the terms Store.begin_delivery was given; the reply, in
any order, carries the same id and comes once every copy is durable (then the UIDs) or
none is (the writer withdraws a partial delivery, as mtad/routing.py's commit_from_loop
does: the sender's retry must not find half of it).

What a 250 promises is unchanged: the writer answers after the shard's log is flushed. If
the writer is gone (killed, restarting) the session's commit fails with StoreError, a 451
4.3.0; the message was then stored, not stored, or (killed between two shards' commits)
stored for some of its recipients, and a sender's retry finds each stored copy by its
Message-ID (storage/dedupe.py) and adds only the missing ones, as after a crash of mtad.

The writer trusts nobody's frames: a request that is not the map Request describes closes
its connection (that mtad process's sessions answer 451 and it connects again), a frame is
at most MAX_FRAME bytes (which bounds the targets too), and a connection with
MAX_PENDING commits under way, or whose replies are not being read, is not read further
until that changes: one peer cannot grow the writer without bound.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from pathlib import Path

import msgspec

import storage
from conf.logfmt import EventLogger
from storage import IN_MEMORY, Delivered, Delivery, DeliveryError, Store, StoreError

SOCKET_NAME = "writer.sock"
# A request is one message held in memory and its targets; anything larger is not ours.
MAX_FRAME = IN_MEMORY + (1 << 20)
_LENGTH = struct.Struct(">I")
# Commits under way for one mtad process before the writer stops reading its requests: far
# more than a shard's group commit takes at once, few enough to bound the memory they hold.
MAX_PENDING = 512
_log = EventLogger("mtad.writer")


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


class WriterGone(StoreError):
    """The writer process is not there (stopped, restarting): the session says 451 4.3.0."""


class Request(msgspec.Struct, frozen=True):
    """One commit asked of the writer: the frame mtad sends, checked as it is decoded."""
    id: int
    targets: list[tuple[str, str]]
    raw: bytes
    flags: list[str]
    internal_date: float | None
    dedupe_from: int | None


class _Frames(asyncio.Protocol):
    """Length-prefixed msgpack frames both ways."""

    decoder = msgspec.msgpack.Decoder()

    def __init__(self) -> None:
        self._in = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._in += data
        self._take()

    def _take(self) -> None:
        """The whole frames received, each to frame(), until held() says wait."""
        while len(self._in) >= _LENGTH.size and not self.held():
            (size,) = _LENGTH.unpack_from(self._in)
            if size > MAX_FRAME:
                _log.error("writer_frame_too_big", size=size)
                self.transport.abort()
                return
            if len(self._in) < _LENGTH.size + size:
                return
            frame = bytes(self._in[_LENGTH.size:_LENGTH.size + size])
            del self._in[:_LENGTH.size + size]
            try:
                message = self.decoder.decode(frame)
            except msgspec.DecodeError as e:  # ValidationError too: not the frame we take
                _log.error("writer_frame_unreadable", size=size, error=str(e))
                self.transport.abort()
                return
            self.frame(message)

    def held(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def frame(self, message) -> None:
        raise NotImplementedError

    def send(self, message: dict) -> None:
        data = msgspec.msgpack.encode(message)
        self.transport.write(_LENGTH.pack(len(data)) + data)


# -- mtad's side ----------------------------------------------------------------------------

class WriterClient:
    """One mtad process's connection to the writer, made at its first commit and again after
    a loss. `commit(delivery)`: the copies (and the delivery's message_id), or DeliveryError /
    StoreError."""

    def __init__(self, path: Path):
        self.path = path
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Future | None = None

    async def commit(self, delivery: Delivery) -> list[Delivered]:
        raw = delivery.in_memory()
        if raw is None:
            raise StoreError("only a message held in memory goes to the writer")
        connection = await self._connected()
        reply = await connection.ask({"targets": [list(t) for t in delivery.targets], "raw": raw,
                                      **delivery.terms()})
        delivery.message_id = reply["message_id"] or None  # as the parse of a local commit sets it
        delivered = [Delivered(*d) for d in reply["delivered"]]
        if reply["errors"]:
            raise DeliveryError(delivered, [((a, m), _error(kind, text)) for a, m, kind, text in reply["errors"]])
        return delivered

    async def _connected(self) -> _ClientConnection:
        if self._connection is not None and not self._connection.lost:
            return self._connection
        if self._connecting is None:  # sessions committing at once share one attempt
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _ClientConnection:
        try:
            _, connection = await asyncio.get_running_loop().create_unix_connection(_ClientConnection, str(self.path))
        except OSError as e:
            raise WriterGone(f"the writer process is not there: {e.strerror or e}") from None
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.close()


class _ClientConnection(_Frames):
    def __init__(self) -> None:
        super().__init__()
        self._waiting: dict[int, asyncio.Future] = {}
        self._next = 0
        self.lost = False

    async def ask(self, request: dict) -> dict:
        if self.lost:
            raise WriterGone("the writer process went away")
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        self.send({"id": self._next, **request})
        return await future

    def frame(self, message: dict) -> None:
        future = self._waiting.pop(message.get("id"), None)
        if future is not None and not future.done():
            future.set_result(message)

    def connection_lost(self, exc) -> None:
        self.lost = True
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                # Stored or not, nobody can say: 451, and dedupe catches the sender's retry.
                future.set_exception(WriterGone("the writer process went away during a commit"))


def _error(kind: str, text: str) -> BaseException:
    """The writer's error as the store's own class (DiskFullError, QuotaExceededError...),
    so that the session's reply is the one a local commit would have given."""
    cls = getattr(storage, kind, None) if kind.endswith("Error") else None
    if isinstance(cls, type) and issubclass(cls, StoreError):
        try:
            return cls(text)
        except TypeError:  # a class that wants more than a message
            pass
    return StoreError(text)


# -- the writer's side ----------------------------------------------------------------------

class WriterServer:
    """The writer process's service: commits what the mtad processes send."""

    def __init__(self, store: Store, commit: Callable[[Store, Delivery], "asyncio.Future"]):
        self.store = store
        self._commit = commit  # mtad/routing.py's _commit_and_settle, with its thread pool
        self.in_flight: set[asyncio.Task] = set()
        self.connections: set[_ServerConnection] = set()

    def connection(self) -> _ServerConnection:
        return _ServerConnection(self)

    async def drained(self) -> None:
        """Until every mtad process has hung up and every commit begun is answered: a stop
        (SIGTERM, or SIGINT to a terminal's whole process group) must not cut off sessions
        still finishing their messages; mtad hangs up once its last session has ended."""
        while self.connections or self.in_flight:
            if self.in_flight:
                await asyncio.gather(*list(self.in_flight), return_exceptions=True)
            else:
                await asyncio.sleep(0.05)

    async def commit(self, request: Request) -> dict:
        targets = request.targets
        reply: dict = {"id": request.id, "delivered": [], "errors": [], "message_id": ""}
        try:
            delivery = self.store.begin_delivery(
                targets, flags=request.flags, internal_date=request.internal_date,
                dedupe_from=request.dedupe_from)
        except (StoreError, ValueError) as e:  # ValueError: a flag or a date the store refuses
            reply["errors"] = [[a, m, type(e).__name__, str(e)] for a, m in targets]
            return reply
        try:
            delivery.write(request.raw)
            delivered = await self._commit(self.store, delivery)  # closes the delivery
            reply["message_id"] = delivery.message_id or ""
            reply["delivered"] = [_copy(d) for d in delivered]
        except DeliveryError as e:
            reply["delivered"] = [_copy(d) for d in e.delivered]
            reply["errors"] = [[t[0], t[1], type(error).__name__, str(error)] for t, error in e.errors]
        except StoreError as e:
            reply["errors"] = [[a, m, type(e).__name__, str(e)] for a, m in delivery.targets]
        finally:
            delivery.close()
        return reply


def _copy(d: Delivered) -> list:
    return [d.account, d.mailbox, d.uidvalidity, d.uid, d.duplicate]


class _ServerConnection(_Frames):
    decoder = msgspec.msgpack.Decoder(Request)

    def __init__(self, server: WriterServer):
        super().__init__()
        self.server = server
        self._pending = 0
        self._writes_paused = False
        self._reads_paused = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)

    def frame(self, message: Request) -> None:
        task = asyncio.ensure_future(self._answer(message))
        self.server.in_flight.add(task)
        task.add_done_callback(self.server.in_flight.discard)
        self._pending += 1
        self._flow()

    async def _answer(self, request: Request) -> None:
        try:
            reply = await self.server.commit(request)
        except Exception:  # a bug: this request fails, the writer goes on
            _log.error("writer_commit_failed", exc_info=True)
            reply = {"id": request.id, "delivered": [], "message_id": "",
                     "errors": [[a, m, "StoreError", "internal error"] for a, m in request.targets]}
        finally:
            self._pending -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.send(reply)
            self._flow()

    # Backpressure: asyncio's transport says when its buffer of replies is high or low again.
    def pause_writing(self) -> None:
        self._writes_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._writes_paused = False
        self._flow()

    def _flow(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        stop = self.held()
        if stop and not self._reads_paused:
            self.transport.pause_reading()
        elif not stop and self._reads_paused:
            self.transport.resume_reading()
            asyncio.get_running_loop().call_soon(self._take)  # the frames that came meanwhile
        self._reads_paused = stop

    def held(self) -> bool:
        return super().held() or self._writes_paused or self._pending >= MAX_PENDING


async def listen(server: WriterServer, path: Path) -> asyncio.AbstractServer:
    """The writer's socket, for the data dir's owner only. A socket left by a writer that
    died is replaced: mtad's data-dir lock says no other writer of this data dir runs."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    try:
        return await asyncio.get_running_loop().create_unix_server(server.connection, str(path))
    finally:
        os.umask(old)
