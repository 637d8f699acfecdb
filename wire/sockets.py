"""Listening sockets for the configured addresses, the same for every daemon: IPv6 sockets
IPv6-only (so `[::]:25` and `0.0.0.0:25` coexist), addresses reusable at once after a
restart, no Nagle delay, `[server] listen_backlog`, and optionally a port several worker
processes share (SO_REUSEPORT).

asyncio's `create_server(sock=...)` calls listen() again with its own backlog (100 unless
told): its caller passes the configured one there too. Twisted's `adoptStreamPort` keeps
the socket's."""

from __future__ import annotations

import socket

from conf.schema import ServerConfig
from conf.values import ListenAddress


def listening_socket(address: ListenAddress, *, backlog: int = ServerConfig.listen_backlog,
                     reuse_port: bool = False) -> socket.socket:
    """A bound, listening, non-blocking socket; OSError names the address."""
    family = socket.AF_INET6 if address.family_is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit it (Linux). Asyncio sets it on its own connections;
        # Twisted does not, and Nagle's algorithm against the client's delayed ACK then
        # holds back the last line of a reply for ~40 ms (an IMAP SELECT, a POP3 +OK).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {address}: {e.strerror}") from None
    return sock
