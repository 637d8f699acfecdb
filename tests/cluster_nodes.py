"""Whole cluster nodes for the tests: `postroom serve` with [cluster] on a real etcd, all on
one data dir (as nodes share the shards' volumes), each with its own ports and LMTP port;
users made as on a node before it joined, then pushed into etcd (`cluster push-accounts`).

    running, configs = start_nodes(tmp_path, etcd.endpoint, ("node-a", "node-b"), shards=4,
                                   users=[...], password="...")
    owners = wait_owners(Etcd(conf.load(configs["node-a"]).cluster), ("node-a", "node-b"), 4, 20)
    stop_nodes(running)
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from conftest import POSTROOM, Daemon, add_accounts, free_port, start_daemon, write_config_file

from cluster.etcd import Etcd
from storage import Store, open_data_dir

TTL = 2  # seconds of lease: a failover within the test's patience


def start_nodes(root: Path, endpoint: str, nodes: tuple[str, ...], *, shards: int, users: list[str],
                password: str, aliases: dict[str, list[str]] | None = None, lease_ttl: float = TTL,
                cluster: dict[str, object] | None = None,
                **sections: dict[str, object]) -> tuple[dict[str, Daemon], dict[str, Path]]:
    """Every node started (READY=1); tried again on new ports should another checkout's
    suite take one first (conftest.py). The caller stops them (stop_nodes). `lease_ttl`:
    TTL by default, a short failover (bench/cluster.py keeps the production default);
    `cluster`: more of each node's [cluster] ({"detach": ...}); `sections`: more of each
    node's config ({"queue": {...}}, {"outbound.routes": {...}})."""
    data_dir = root / "var"
    prefix = f"/n-{uuid.uuid4().hex[:8]}/"
    running: dict[str, Daemon] = {}
    for attempt in range(3):
        configs = {node: write_config_file(root / f"{node}.toml", data_dir, storage={"shards": shards},
                                           cluster={"etcd": [endpoint], "node": node, "address": "127.0.0.1",
                                                    "lmtp_port": free_port(), "lease_ttl": lease_ttl, "prefix": prefix,
                                                    **(cluster or {})},
                                           **sections)
                   for node in nodes}
        if attempt == 0:
            add_accounts(configs[nodes[0]], password, users=users, aliases=aliases)
            pushed = subprocess.run([POSTROOM, "--config", str(configs[nodes[0]]), "cluster", "push-accounts"],
                                    capture_output=True, text=True, timeout=60)
            assert pushed.returncode == 0, pushed.stderr
        try:
            for node in nodes:
                (root / node).mkdir(exist_ok=True)
                running[node] = start_daemon(configs[node], root / node)
            return running, configs
        except AssertionError as e:
            stop_nodes(running)
            running.clear()
            if "Address already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def stop_nodes(running: dict[str, Daemon]) -> None:
    for daemon in running.values():
        if daemon.process.poll() is None:
            daemon.stop()


def owners(etcd: Etcd) -> dict[int, str]:
    """Shard -> the node etcd says owns it."""
    return {int(name): json.loads(kv.value)["node"] for name, kv in etcd.snapshot().under("owners/").items()}


def wait_owners(etcd: Etcd, nodes: tuple[str, ...], shards: int, seconds: float, *,
                every_node: bool = False) -> dict[int, str]:
    """Once every shard is owned by `nodes` alone (and, `every_node`, each of them owns one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = owners(etcd)
        if len(found) == shards and set(found.values()) <= set(nodes) and \
                (not every_node or set(found.values()) == set(nodes)):
            return found
        time.sleep(0.05)
    raise AssertionError(f"shards not all owned by {nodes} within {seconds} s: {owners(etcd)}")


def wait_balanced(etcd: Etcd, nodes: tuple[str, ...], shards: int, seconds: float) -> dict[int, str]:
    """Once every shard is owned and each node owns its share (shards // nodes, one more for
    the first shards % nodes by name: cluster/balance.py). The first node up claims them all,
    then hands each newcomer its share: wait_owners(every_node=True) can see 3/1 first."""
    share = {node: shards // len(nodes) + (i < shards % len(nodes)) for i, node in enumerate(sorted(nodes))}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = owners(etcd)
        if len(found) == shards and {n: list(found.values()).count(n) for n in nodes} == share:
            return found
        time.sleep(0.1)
    raise AssertionError(f"shards not balanced over {nodes} within {seconds} s: {owners(etcd)}")


def owner_of(data_dir: Path, shards: int, owners: dict[int, str], users: list[str]) -> dict[str, str]:
    """User -> the node that owns the user's shard (by `owners`, as wait_owners found them)."""
    with Store(open_data_dir(data_dir, shards)) as store:
        return {user: owners[store.shard_number(user)] for user in users}


def stored(data_dir: Path, shards: int, user: str, mailbox: str = "INBOX") -> list[bytes]:
    """The messages in a user's mailbox, as the shared volumes hold them now."""
    with Store(open_data_dir(data_dir, shards)) as store:
        return [store.read_message(m) for m in store.fetch(user, mailbox, [(1, 2**32 - 1)])]
