"""How a cluster node proves itself to another: to its LMTP listener (mtad/lmtp.py), and to
its IMAP and POP3 listeners when it proxies a login (imapd/proxy.py, pop3d/proxy.py). Not by
its address alone, which any process on a node's machine, or anything that can take a
node's address on its network, shares, but by the cluster's secret (etcd's "secret" key,
which each node's agent copies into its node table, cluster/local.py).

The listener's greeting carries a fresh nonce, <nonce@host> (as POP3's APOP timestamp);
the node answers AUTH PLAIN with its name as the authentication identity and
HMAC-SHA256(secret, nonce and name) as the password (a proxy: its client's user as the
authorization identity). The secret never crosses the wire, and a proof is good for its own
session only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable

_NONCE = re.compile(r"<([0-9a-f]{32})@[^>\s]*>")


def nonce() -> str:
    return secrets.token_hex(16)


def greeting_note(nonce_: str, hostname: str) -> str:
    return f"<{nonce_}@{hostname}>"


def nonce_in(greeting: str) -> str | None:
    """The nonce of a listener's greeting, if it has one."""
    found = _NONCE.search(greeting)
    return found.group(1) if found else None


def proof(secret: bytes, nonce_: str, node: str) -> str:
    return hmac.new(secret, f"{nonce_} {node}".encode(), hashlib.sha256).hexdigest()


def valid(secret: bytes | None, nonce_: str, node: str, given: str) -> bool:
    return bool(secret) and hmac.compare_digest(proof(secret, nonce_, node), given)


def prover(secret: Callable[[], bytes | None] | None,
           node: Callable[[], str] | None) -> Callable[[str], tuple[str, str] | None] | None:
    """nonce -> (this node's name, its proof), for a proxy's login at the owner (imapd/proxy.py,
    pop3d/proxy.py); it answers None before this node's agent has read the secret."""
    if secret is None or node is None:
        return None

    def prove(nonce_: str) -> tuple[str, str] | None:
        key = secret()
        return (node(), proof(key, nonce_, node())) if key else None
    return prove
