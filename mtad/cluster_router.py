"""Which node takes an account's mail, for the SMTP agents (mtad/routing.py's Router), and
serves its IMAP and POP3 sessions (the proxies), from this node's view of the cluster
(cluster/view.py: the table its agent publishes, read without asking etcd).
"""

from __future__ import annotations

from cluster.view import ClusterView
from storage import NoOwnerError
from storage import Store


class ViewRouter:
    def __init__(self, view: ClusterView, store: Store):
        self._view = view
        self._store = store

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

    def here(self, service: str = "lmtp") -> tuple[str, int]:
        """This node's own address for `service`, as the other nodes are told it."""
        return self._view.here().endpoint(service)
