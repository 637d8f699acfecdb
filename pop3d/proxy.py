"""A cluster's POP3 proxy: a user who logs in on a node that does not own the user's shard is
served by the owner, through this node (imapd/proxy.py says why the password is checked
here first, and how the owner's certificate is checked).

At the owner: STLS (RFC 2595), XCLIENT ADDR= naming the client's address (the owner
believes it from a live node only, logs it and throttles by it, and serves the session
itself rather than proxy it on; an owner too old to know the command goes on without
it), then AUTH PLAIN as this node for the user, with its proof of the cluster's secret for
the nonce in the owner's greeting (wire/node_proof.py: the password, checked here, is not
checked again there), or USER and PASS before this node's agent has the secret (or at an
owner too old to know XCLIENT). Their reply (+OK and the maildrop's size, or -ERR [IN-USE]
while another session holds it) is the client's. From then on the
bytes go both ways untouched (wire/relay.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
from collections.abc import Callable

from wire import node_proof as proof
from wire.relay import ProxyError, reach_owner

# An owner on a version before XCLIENT (a rolling upgrade) answers this: the login goes on
# without it, and the owner logs and throttles by this node's address, as that version did.
UNKNOWN_COMMAND = b"-ERR unknown command"


async def log_in_at(host: str, port: int, *, user: str, password: str, client_ip: str, hostname: str,
                    tls: ssl.SSLContext, timeout: float, prove: Callable[[str], tuple[str, str] | None] | None = None,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A session at the owner after PASS: (reader, writer, the owner's reply line to PASS).
    A -ERR reply closes it (the line is still returned, for the client)."""
    reader, writer, reply = await reach_owner(host, port, timeout, functools.partial(
        _log_in, user=user, password=password, client_ip=client_ip, hostname=hostname, tls=tls, prove=prove))
    if not reply.startswith(b"+OK"):
        writer.close()
    return reader, writer, reply


async def _log_in(reader, writer, *, user: str, password: str, client_ip: str, hostname: str,
                  tls: ssl.SSLContext, prove: Callable[[str], tuple[str, str] | None] | None = None) -> bytes:
    nonce = proof.nonce_in((await _ok(reader)).decode("ascii", "replace"))
    writer.write(b"STLS\r\n")
    await _ok(reader)
    await writer.start_tls(tls, server_hostname=hostname)
    writer.write(f"XCLIENT ADDR={client_ip}\r\n".encode())
    noted = await reader.readline()
    if not noted.startswith(b"+OK") and not noted.startswith(UNKNOWN_COMMAND):
        raise ProxyError(f"the owner said {noted[:200]!r}")
    proven = prove(nonce) if prove is not None and nonce is not None and noted.startswith(b"+OK") else None
    if proven is not None:  # as this node, for the user: one password check per login, here
        node, answer = proven
        writer.write(b"AUTH PLAIN " + base64.b64encode(f"{user}\0{node}\0{answer}".encode()) + b"\r\n")
        return await reader.readline()
    writer.write(f"USER {user}\r\n".encode())
    await _ok(reader)
    writer.write(b"PASS " + password.encode() + b"\r\n")
    return await reader.readline()


async def _ok(reader) -> bytes:
    line = await reader.readline()
    if not line.startswith(b"+OK"):
        raise ProxyError(f"the owner said {line[:200]!r}")
    return line
