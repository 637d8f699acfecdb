"""A cluster's proxied session, once logged in at the node that owns the mailbox
(imapd/proxy.py, pop3d/proxy.py): every byte both ways, untouched, between the client's
connection (a wire.protocol.ServerProtocol) and the owner's stream, until either side
closes. Reading from the client pauses while the owner has not taken READ_AHEAD bytes yet;
the owner's stream is read as fast as the client takes what we write (ServerProtocol.drain).
"""

from __future__ import annotations

import asyncio

READ_AHEAD = 64 * 1024


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
