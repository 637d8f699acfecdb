"""Where the SMTP agents send an account's mail in a cluster (mtad/cluster_router.py): node
agents as real processes against a real etcd (tests/test_cluster_ownership.py's Cluster),
and the router of one node reading the table its agent publishes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from test_cluster_ownership import SHARDS, TTL, Cluster, account_in

import conf
from cluster.view import open_view
from mtad.cluster_router import ViewRouter
from storage import NoOwnerError, Store, open_data_dir
from waiting import wait_until




class NodeA:
    """node-a's side of a Cluster: its store, and its router once asked for (after its agent
    has published a table)."""

    def __init__(self, root: Path, endpoint: str):
        self.cluster = Cluster(root, endpoint)
        self.config = conf.load(self.cluster.configs["node-a"])
        self.store = Store(open_data_dir(self.config.server.data_dir, SHARDS))
        self.view = None

    def router(self) -> ViewRouter:
        self.view = open_view(self.config, open_data_dir(self.config.server.data_dir, SHARDS))
        return ViewRouter(self.view, self.store)

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
        self.store.close()
        self.cluster.close()


@pytest.fixture
def node_a(tmp_path: Path, etcd_server):  # noqa: F811
    node = NodeA(tmp_path, etcd_server.endpoint)
    yield node
    node.close()


def test_the_router_follows_the_owners(node_a: NodeA):
    cluster, store = node_a.cluster, node_a.store
    cluster.start("node-a")
    cluster.start("node-b")
    owners = cluster.balanced(("node-a", "node-b"))
    assert set(owners.values()) == {"node-a", "node-b"}
    router = node_a.router()
    accounts = {shard: account_in(store, shard) for shard in owners}

    def routed(expected: dict[int, str]) -> bool:
        try:
            return all(router.owner(accounts[shard]) == (None if node == "node-a" else ("127.0.0.1", 24))
                       for shard, node in expected.items())
        except NoOwnerError:
            return False

    wait_until(lambda: routed(owners), 10, f"node-a's router to agree with etcd's owners {owners}")

    # node-b dies: its shards have no owner until node-a claims them (TTL + 5 s at most).
    cluster.agents["node-b"].send_signal(signal.SIGKILL)
    cluster.agents["node-b"].wait(10)
    taken = {shard: "node-a" for shard in owners}
    wait_until(lambda: routed(taken), TTL + 5 + 5, "node-a's router to keep every account here")


def test_a_shard_between_owners_is_no_owner(node_a: NodeA):
    cluster = node_a.cluster
    cluster.start("node-a")
    cluster.balanced(("node-a",))
    router = node_a.router()
    account = account_in(node_a.store, 0)
    wait_until(lambda: _owned_here(router, account), 10, "shard 0 owned by node-a")
    # A stop hands every shard back at once: nobody owns them now.
    cluster.agents["node-a"].send_signal(signal.SIGTERM)
    cluster.agents["node-a"].wait(30)

    def released() -> bool:
        try:
            router.owner(account)
        except NoOwnerError:
            return True
        return False

    wait_until(released, 10, "shard 0 without an owner once node-a stopped")


def _owned_here(router: ViewRouter, account: str) -> bool:
    try:
        return router.owner(account) is None
    except NoOwnerError:
        return False
