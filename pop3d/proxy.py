"""A cluster's POP3 proxy: a user who logs in on a node that does not own the user's shard is
served by the owner, through this node (imapd/proxy.py says why the password is checked
here first, and how the owner's certificate is checked).

At the owner: STLS (RFC 2595), XCLIENT ADDR= naming the client's address (the owner
believes it from a live node only, logs it and throttles by it, and serves the session
itself rather than proxy it on; an owner too old to know the command goes on without
it), then USER and PASS, whose reply (+OK and the maildrop's
size, or -ERR [IN-USE] while another session holds it) is the client's. From then on the
bytes go both ways untouched (wire/relay.py).
"""

from __future__ import annotations

import asyncio
import functools
import ssl

from wire.relay import ProxyError, reach_owner

# An owner on a version before XCLIENT (a rolling upgrade) answers this: the login goes on
# without it, and the owner logs and throttles by this node's address, as that version did.
UNKNOWN_COMMAND = b"-ERR unknown command"


async def log_in_at(host: str, port: int, *, user: str, password: str, client_ip: str, hostname: str,
                    tls: ssl.SSLContext, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A session at the owner after PASS: (reader, writer, the owner's reply line to PASS).
    A -ERR reply closes it (the line is still returned, for the client)."""
    reader, writer, reply = await reach_owner(host, port, timeout, functools.partial(
        _log_in, user=user, password=password, client_ip=client_ip, hostname=hostname, tls=tls))
    if not reply.startswith(b"+OK"):
        writer.close()
    return reader, writer, reply


async def _log_in(reader, writer, *, user: str, password: str, client_ip: str, hostname: str,
                  tls: ssl.SSLContext) -> bytes:
    await _ok(reader)
    writer.write(b"STLS\r\n")
    await _ok(reader)
    await writer.start_tls(tls, server_hostname=hostname)
    writer.write(f"XCLIENT ADDR={client_ip}\r\n".encode())
    noted = await reader.readline()
    if not noted.startswith(b"+OK") and not noted.startswith(UNKNOWN_COMMAND):
        raise ProxyError(f"the owner said {noted[:200]!r}")
    writer.write(f"USER {user}\r\n".encode())
    await _ok(reader)
    writer.write(b"PASS " + password.encode() + b"\r\n")
    return await reader.readline()


async def _ok(reader) -> bytes:
    line = await reader.readline()
    if not line.startswith(b"+OK"):
        raise ProxyError(f"the owner said {line[:200]!r}")
    return line
