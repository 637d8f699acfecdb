"""A cluster's IMAP proxy: a user who logs in on a node that does not own the user's shard is
served by the owner, through this node (DESIGN.md, "Scale beyond one machine").

The password is checked here first (the accounts are on every node), so a guesser costs the
owner nothing and meets this node's throttle. Then this node logs in at the owner as the
user: STARTTLS on the owner's IMAP port ([cluster] imap_port, else its first [imap] listen),
the certificate checked against [server] hostname (a cluster's nodes serve one name), an ID
(RFC 2971) naming the client's address and this proxy (the owner believes them from a live
node only: it logs and throttles by that address, and serves the session itself rather than
proxy it on, should its table name yet another owner), and AUTHENTICATE PLAIN with
SASL-IR (RFC 4959): as this node for the user, with its proof of the cluster's secret for
the nonce in the owner's greeting (wire/node_proof.py), so that the password (checked here)
is not checked again there, an argon2id hash's worth of CPU a login; or, before this
node's agent has the secret, as the user with the password. The client's LOGIN is
answered with the owner's capabilities; from then on the bytes go both ways untouched
(imapd/protocol.py's relay), until either side closes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
from collections.abc import Callable

from wire import node_proof as proof
from wire.relay import ProxyError, reach_owner

PROXY_ID = "x-postroom-proxy"  # the ID field that says a session is a cluster proxy's
Prove = Callable[[str], "tuple[str, str] | None"]  # nonce -> (this node, its proof), wire/node_proof.py


async def log_in_at(host: str, port: int, *, user: str, password: str, client_ip: str, hostname: str,
                    tls: ssl.SSLContext, timeout: float, prove: Prove | None = None,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A session at the owner, logged in as `user`: (reader, writer, its CAPABILITY text).
    `prove(nonce)`: this node's name and its proof for the owner's greeting nonce; the
    owner then takes the login without the password (checked here already)."""
    return await reach_owner(host, port, timeout, functools.partial(
        _log_in, user=user, password=password, client_ip=client_ip, hostname=hostname, tls=tls, prove=prove))


async def _log_in(reader, writer, *, user: str, password: str, client_ip: str, hostname: str,
                  tls: ssl.SSLContext, prove: Prove | None) -> str:
    greeting = await reader.readline()
    if not greeting.startswith(b"* OK"):
        raise ProxyError(f"owner's greeting: {greeting[:100]!r}")
    nonce = proof.nonce_in(greeting.decode("ascii", "replace"))
    await _command(reader, writer, b"p1 STARTTLS\r\n", b"p1")
    await writer.start_tls(tls, server_hostname=hostname)
    await _command(reader, writer, f'p2 ID ("x-originating-ip" "{_quotable(client_ip)}" "{PROXY_ID}" "1")\r\n'
                   .encode(), b"p2")
    proven = prove(nonce) if prove is not None and nonce is not None else None
    if proven is not None:  # as this node, for the user: one password check per login, here
        node, answer = proven
        plain = base64.b64encode(user.encode() + b"\0" + node.encode() + b"\0" + answer.encode())
    else:
        plain = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    _, tagged = await _command(reader, writer, b"p3 AUTHENTICATE PLAIN " + plain + b"\r\n", b"p3")
    if tagged.startswith(b"p3 OK [CAPABILITY "):
        return tagged[len(b"p3 OK ["):].split(b"]", 1)[0].decode("ascii", "replace")
    return ""


async def _command(reader, writer, line: bytes, tag: bytes) -> tuple[list[bytes], bytes]:
    """Send `line`, read to its tagged reply: (untagged lines, the tagged one) if OK."""
    writer.write(line)
    untagged = []
    for _ in range(100):
        reply = await reader.readline()
        if not reply:
            raise ProxyError("the owner closed the connection")
        if reply.startswith(tag + b" "):
            if not reply.startswith(tag + b" OK"):
                raise ProxyError(f"the owner said {reply[:200]!r}")
            return untagged, reply.rstrip(b"\r\n")
        untagged.append(reply)
    raise ProxyError("no tagged reply from the owner")


def _quotable(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c in ".:-[]")
