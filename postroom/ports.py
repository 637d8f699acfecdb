"""Binding the daemons' ports: asyncio servers for mtad, Twisted ports for imapd and pop3d,
and Twisted's reactor on the process's asyncio loop.

Every daemon runs on one event loop: the asyncio one. Twisted's asyncio reactor is
installed on it (once per process, before anything imports `twisted.internet.reactor`), so
Twisted protocols and asyncio code call each other directly, with no second thread. The
reactor is never `run()`: asyncio drives it, and stopping is closing our ports.

Listening sockets come from wire.sockets, not `listenTCP` or `create_server(host, port)`,
for what neither sets: IPv6 sockets are IPv6-only (so `[::]:143` and `0.0.0.0:143`
coexist), ports are reusable at once after a restart, and mtad's workers may share a port.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable

from conf.tls import ServerTLS
from conf.values import ListenAddress
from wire.sockets import listening_socket


def install_reactor():
    """The Twisted reactor, driven by the running asyncio loop; installed on first use."""
    import sys

    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.get_running_loop())
    from twisted.internet import reactor

    return reactor


async def listen_asyncio(make_protocol: Callable[[], asyncio.BaseProtocol], addresses: Iterable[ListenAddress], *,
                         tls: ssl.SSLContext | None, backlog: int) -> list[asyncio.Server]:
    """An asyncio server on each address, TLS from the first byte when `tls` is given.
    Several worker processes may share the ports (SO_REUSEPORT: the kernel spreads
    connections)."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    try:
        for address in addresses:
            sock = listening_socket(address, backlog=backlog, reuse_port=True)
            # create_server listens again, with its own backlog unless told (wire.sockets).
            servers.append(await loop.create_server(make_protocol, sock=sock, ssl=tls, backlog=backlog))
    except OSError:
        for server in servers:
            server.close()
        raise
    return servers


class TwistedListening:
    """What `postroom serve` stops: the Twisted ports of one service, and whatever else
    the service wants closed after them (`on_stop`)."""

    def __init__(self, ports: list, on_stop: Callable[[], object] | None = None):
        self.ports = ports
        self.on_stop = on_stop

    async def stop(self) -> None:
        for port in self.ports:
            result = port.stopListening()
            if result is not None:
                await result.asFuture(asyncio.get_running_loop())
        if self.on_stop is not None:
            result = self.on_stop()
            if asyncio.iscoroutine(result):
                await result


def listen_twisted(factory, addresses: Iterable[ListenAddress], tls: ServerTLS | None = None, *, backlog: int
                   ) -> list:
    """Twisted ports for `factory` on each address, TLS from the first byte when `tls` is given."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    reactor = install_reactor()
    ports = []
    try:
        for address in addresses:
            sock = listening_socket(address, backlog=backlog)  # adoptStreamPort keeps it
            wrapped = TLSMemoryBIOFactory(tls, False, factory) if tls is not None else factory
            try:
                ports.append(reactor.adoptStreamPort(sock.fileno(), sock.family, wrapped))
            finally:
                sock.close()  # Twisted holds its own duplicate of the descriptor
    except OSError:
        for port in ports:
            port.stopListening()
        raise
    return ports
