"""A cluster's proxied session, once logged in at the node that owns the mailbox
(imapd/proxy.py, pop3d/proxy.py): every byte both ways, untouched, between the client's
connection (a wire.protocol.ServerProtocol) and the owner's stream, until either side
closes. Reading from the client pauses while the owner has not taken READ_AHEAD bytes yet;
the owner's stream is read as fast as the client takes what we write (ServerProtocol.drain).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

READ_AHEAD = 64 * 1024
MAX_LINE = 64 * 1024  # of a line the owner sends while the proxy logs in
T = TypeVar("T")


class ProxyError(Exception):
    """The owner could not be reached or would not take the login: the client is told to
    try again later (IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP])."""


async def reach_owner(host: str, port: int, timeout: float,
                      log_in: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]]
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, T]:
    """A connection to the owner with `log_in(reader, writer)` done on it, each bounded by
    `timeout`: (reader, writer, what log_in returned). Any failure is ProxyError, and the
    connection closed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE), timeout)
    except (OSError, TimeoutError) as e:
        raise ProxyError(f"cannot connect to {host}:{port}: {e}") from None
    try:
        return reader, writer, await asyncio.wait_for(log_in(reader, writer), timeout)
    except BaseException as e:
        writer.close()
        if isinstance(e, (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, ssl.SSLError)):
            raise ProxyError(f"{host}:{port}: {type(e).__name__}: {e}") from None
        raise


class Relay:
    def __init__(self, protocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._protocol = protocol
        self._reader = reader
        self._writer = writer
        self._task: asyncio.Task | None = None
        self._paused = False

    def start(self, unread: bytes) -> None:
        """From now on: `unread` (what the client sent behind its login) first."""
        self._protocol.log.info("relay_started")
        if unread:
            self.to_owner(unread)
        self._task = asyncio.ensure_future(self._from_owner())

    def to_owner(self, data: bytes) -> None:
        if data:
            self._writer.write(data)
        if self._writer.transport.get_write_buffer_size() > READ_AHEAD and not self._paused:
            self._paused = True
            self._protocol.transport.pauseProducing()
            asyncio.ensure_future(self._resume_reading())

    async def _resume_reading(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            return
        if self._paused and not self._protocol.closing:
            self._paused = False
            self._protocol.transport.resumeProducing()

    async def _from_owner(self) -> None:
        protocol = self._protocol
        try:
            while not protocol.closing:
                data = await self._reader.read(READ_AHEAD)
                if not data:
                    break
                protocol.write(data)
                await protocol.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            protocol.log.info("relay_ended")
            protocol.close()

    def close(self) -> None:
        self._writer.close()
        if self._task is not None:
            self._task.cancel()
