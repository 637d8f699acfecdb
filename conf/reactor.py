"""Twisted on `postroom serve`'s asyncio loop, for imapd and pop3d.

Every daemon shares one event loop: the asyncio one mtad runs on. Twisted's asyncio reactor
is installed on it (once per process, before anything imports `twisted.internet.reactor`),
so Twisted protocols and asyncio code call each other directly, with no second thread.
The reactor is never `run()`: asyncio drives it, and stopping is closing our ports.

Listening sockets come from conf.sockets, not `listenTCP`, for what Twisted does not set:
IPv6 sockets are IPv6-only (so `[::]:143` and `0.0.0.0:143` coexist) and ports are
reusable at once after a restart. TLS uses pyOpenSSL (what Twisted's TLS speaks) loaded from the same
files as the asyncio side's `ssl.SSLContext`, with the same policy: TLS 1.2 at least, and
conf.tls's TLS 1.2 suites.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from conf.schema import TLSConfig
from conf.sockets import listening_socket
from conf.tls import TLS12_CIPHERS
from conf.values import ListenAddress


def install_reactor():
    """The Twisted reactor, driven by the running asyncio loop; installed on first use."""
    import sys

    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.get_running_loop())
    from twisted.internet import reactor

    return reactor


class ServerTLS:
    """A pyOpenSSL server context for Twisted's `startTLS` and TLS listeners (the legacy
    context-factory interface: `getContext()`, one shared context)."""

    def __init__(self, tls: TLSConfig):
        from OpenSSL import SSL

        assert tls.cert is not None
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(TLS12_CIPHERS.encode())
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
        # Idle connections (IDLE, POP3 clients thinking) give their TLS buffers back: ~34 KiB each.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.use_certificate_chain_file(str(tls.cert))
        context.use_privatekey_file(str(tls.key or tls.cert))
        context.check_privatekey()
        self._context = context

    def getContext(self):  # noqa: N802 - Twisted's interface
        return self._context


def server_tls(tls: TLSConfig) -> ServerTLS | None:
    """None without a configured certificate (conf.tls.server_context has checked the files)."""
    if not tls.enabled:
        return None
    from twisted.internet.interfaces import IOpenSSLContextFactory
    from zope.interface import classImplements

    classImplements(ServerTLS, IOpenSSLContextFactory)  # what Twisted's TLS asks of a context factory
    return ServerTLS(tls)


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


def listen(factory, addresses: Iterable[ListenAddress], tls: ServerTLS | None = None, *, backlog: int) -> list:
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

