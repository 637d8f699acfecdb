"""Which node takes an account's mail, for the SMTP agents (mtad/routing.py's Router), and
serves its IMAP and POP3 sessions (the proxies), from this node's view of the cluster
(cluster/view.py: the table its agent publishes, read without asking etcd).
"""

from __future__ import annotations

import ipaddress
import socket
import time

from cluster.view import ClusterView
from storage import NoOwnerError
from storage import Store


PEER_CACHE = 60.0  # seconds a node's address, resolved to IP addresses, is kept


class ViewRouter:
    def __init__(self, view: ClusterView, store: Store):
        self._view = view
        self._store = store
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}  # node address -> (until, its IPs)
        self.stopping = False  # set by the daemon's stop (mtad/agent.py AgentContext.stop_sessions)

    def owner(self, account: str, service: str = "lmtp") -> tuple[str, int] | None:
        """None: this node owns the account's shard (a commit here checks it holds it still);
        else the owner's (host, port) for `service` ("lmtp", "imap", "pop3"). NoOwnerError
        while the shard has no owner."""
        shard = self._store.shard_number(account)
        owner = self._view.owner_of(shard)
        if owner is None:
            raise NoOwnerError(f"shard {shard} has no owner just now")
        if owner.node.name == self._view.node:
            return None
        return owner.node.endpoint(service)

    def holds(self, account: str) -> bool:
        """Whether this node may commit to the account's shard now."""
        return self._view.owns(self._store.shard_number(account))

    def node(self) -> str:
        """This node's name."""
        return self._view.node

    def secret(self) -> bytes | None:
        """The cluster's secret: what a hand-off proves (wire/node_proof.py)."""
        return self._view.secret()

    def is_peer(self, ip: str) -> bool:
        """Whether `ip` is the address of a live node of the cluster (this one included): who
        may hand mail over by LMTP. A node's address that is a name is resolved at most once
        a PEER_CACHE, in the caller's thread: give nodes IP addresses ([cluster] address)."""
        try:
            peer = _normal(ip)
        except ValueError:
            return False
        return any(peer in self._addresses(node.address) for node in self._view.live_nodes() if node.address)

    def _addresses(self, address: str) -> frozenset[str]:
        cached = self._resolved.get(address)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            found = frozenset({_normal(address)})
        except ValueError:  # a name
            try:
                found = frozenset(_normal(info[4][0]) for info in socket.getaddrinfo(address, None,
                                                                                       type=socket.SOCK_STREAM))
            except (OSError, UnicodeError):
                found = frozenset()
        self._resolved[address] = (time.monotonic() + PEER_CACHE, found)
        return found

    def here(self, service: str = "lmtp") -> tuple[str, int]:
        """This node's own address for `service`, as the other nodes are told it."""
        return self._view.here().endpoint(service)


def _normal(ip: str) -> str:
    """An IP address in one spelling (an IPv4-mapped IPv6 address as IPv4); ValueError if
    `ip` is not one."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)
