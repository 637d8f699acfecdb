"""What a daemon process asks of the cluster: who owns a shard and how to reach it,
whether this node owns it, which nodes are live. It reads the node table this node's
agent publishes (cluster/local.py): no etcd request, microseconds a question.

    view = cluster.open_view(config, data_dir)    # None without [cluster] etcd
    owner = view.owner_of(store.shard_number(account))
    if owner is None: ...                          # nobody owns it now: answer 4xx, retry
    elif view.owns(owner.shard): ...               # here: use the store
    else: host, port = owner.node.endpoint("lmtp")  # hand over / proxy ("imap", "pop3")
"""

from __future__ import annotations

from cluster.local import Node, NodeTable, Owner, node_name, open_node_table
from conf import Config
from storage import DataDir, NoOwnerError


class ClusterView:
    def __init__(self, table: NodeTable, node: str):
        self.table = table
        self.node = node  # this node's name

    def owner_of(self, shard: int) -> Owner | None:
        """The shard's owner as etcd said at the agent's last look, or None (free: its
        owner's lease lapsed, or it is being handed over)."""
        return self.table.owner(shard)

    def owns(self, shard: int) -> bool:
        """Whether this node may write the shard now (what each commit checks)."""
        revision = self.table.claim(shard)
        return revision is not None and self.table.holds(shard, revision)

    def live_nodes(self) -> list[Node]:
        """The registered nodes (draining ones included, with Node.draining set)."""
        return self.table.nodes()

    def here(self) -> Node:
        """This node's own record, as its agent registered it (address and ports)."""
        for node in self.table.nodes():
            if node.name == self.node:
                return node
        raise NoOwnerError(f"node {self.node} is not registered just now")

    def secret(self) -> bytes | None:
        """The cluster's secret (wire/node_proof.py), once this node's agent has read it."""
        return self.table.secret()

    def lease_left(self) -> float:
        """Seconds this node's claims stay good without another keepalive (<= 0: lapsed)."""
        return self.table.lease_left()

    def close(self) -> None:
        self.table.close()


def open_view(config: Config, data_dir: DataDir) -> ClusterView | None:
    """This node's view, or None without [cluster] etcd (a single node: it owns every shard)."""
    if not config.cluster.enabled:
        return None
    return ClusterView(open_node_table(config, data_dir), node_name(config))
