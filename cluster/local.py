"""The node table: what this node's agent (cluster/agent.py) knows, published for every
process of the machine in a small LMDB environment (<data_dir>/cluster/<node>.lmdb).

The agent is its one writer; mtad, imapd, pop3d and the CLI read it. Reading it costs one
LMDB read transaction (microseconds, no system call), which is what lets every commit of
the store be fenced (`holds`, storage/shard.py "Fencing") and every delivery ask where a
shard lives (`owner`) without a round trip to etcd.

Keys:
    b"lease"            -> deadline (CLOCK_MONOTONIC seconds), lease id, boot id: until when
                           this node's claims are good, measured from the last keepalive
                           etcd answered, minus a margin (cluster/agent.py)
    b"c" shard (u32)    -> the etcd revision of this node's claim on the shard
    b"o" shard (u32)    -> JSON {"node", "revision"}: the shard's owner, as etcd says
    b"n" node name      -> JSON {"address", "ports", "draining"}: a live node

Not synced: it is runtime state, rebuilt by the agent at each start. A deadline is
CLOCK_MONOTONIC, which all processes of a machine share and which restarts with the
machine: the boot id recorded with it makes a table left from before a reboot hold nothing.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from conf import Config
from storage import DataDir

MAP_SIZE = 16 << 20  # 1024 shards and a few hundred nodes are well under 1 MiB
_LEASE = struct.Struct(">dQ36s")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
LEASE_KEY = b"lease"
SECRET_KEY = b"secret"  # the cluster's secret (etcd's "secret" key): what nodes prove to each other


def boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()[:36].ljust(36, b"-")
    except OSError:
        return b"-" * 36


_BOOT = boot_id()


@dataclass(frozen=True)
class Node:
    """A live node: its name, the host other nodes reach it on, and its ports there by
    service ("lmtp", "imap", "pop3")."""
    name: str
    address: str
    ports: dict[str, int] = field(default_factory=dict)
    draining: bool = False

    def endpoint(self, service: str) -> tuple[str, int]:
        """(host, port) of `service` on this node; KeyError for a service it does not offer."""
        return self.address, self.ports[service]


@dataclass(frozen=True)
class Owner:
    """Who owns a shard: the node (with its address and ports) and its claim's revision."""
    shard: int
    node: Node
    revision: int


class NodeTable:
    def __init__(self, path: Path, *, writer: bool = False):
        self.path = path
        self.env = _environments.acquire(path)
        self.writer = writer
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _environments.release(self.path)

    # -- the readers' side ------------------------------------------------------------

    def holds(self, shard: int, revision: int) -> bool:
        """Whether this node holds `shard` under the claim `revision` now: the commit check."""
        with self.env.begin(buffers=True) as txn:
            lease = txn.get(LEASE_KEY)
            claim = txn.get(b"c" + _U32.pack(shard))
            if lease is None or claim is None:
                return False
            deadline, _, boot = _LEASE.unpack(lease)
            return revision != 0 and _U64.unpack(claim)[0] == revision and boot == _BOOT \
                and time.monotonic() < deadline

    def lease_left(self) -> float:
        """Seconds this node's claims stay good without another keepalive (<= 0: lapsed)."""
        with self.env.begin() as txn:
            lease = txn.get(LEASE_KEY)
        if lease is None:
            return 0.0
        deadline, _, boot = _LEASE.unpack(lease)
        return deadline - time.monotonic() if boot == _BOOT else 0.0

    def lease_id(self) -> int:
        """The etcd lease the table was last published under (0: none)."""
        with self.env.begin() as txn:
            lease = txn.get(LEASE_KEY)
        return _LEASE.unpack(lease)[1] if lease is not None else 0

    def claim(self, shard: int) -> int | None:
        """The revision of this node's claim on `shard` (whatever the lease), or None."""
        with self.env.begin() as txn:
            raw = txn.get(b"c" + _U32.pack(shard))
        return _U64.unpack(raw)[0] if raw is not None else None

    def secret(self) -> bytes | None:
        """The cluster's secret, as the agent read it from etcd; None before it did."""
        with self.env.begin() as txn:
            return txn.get(SECRET_KEY)

    def claims(self) -> dict[int, int]:
        """shard -> revision of this node's claims (whatever the lease)."""
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(b"c"):
                return {}
            out = {}
            for key, value in cursor:
                if not key.startswith(b"c"):
                    break
                out[_U32.unpack(key[1:])[0]] = _U64.unpack(value)[0]
            return out

    def owner(self, shard: int) -> Owner | None:
        with self.env.begin() as txn:
            raw = txn.get(b"o" + _U32.pack(shard))
            if raw is None:
                return None
            record = json.loads(raw)
            node = txn.get(b"n" + record["node"].encode())
        return Owner(shard, _node(record["node"], node), record["revision"])

    def nodes(self) -> list[Node]:
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(b"n"):
                return []
            out = []
            for key, value in cursor:
                if not key.startswith(b"n"):
                    break
                out.append(_node(key[1:].decode(), value))
            return out

    # -- the agent's side -------------------------------------------------------------

    def publish(self, *, deadline: float, lease: int, claims: dict[int, int], owners: dict[int, tuple[str, int]],
                nodes: Iterable[Node], secret: bytes | None = None) -> None:
        """Replace the whole table in one transaction: what the agent knows now."""
        assert self.writer, "only the agent writes the node table"
        with self.env.begin(write=True) as txn:
            _clear(txn, b"")
            txn.put(LEASE_KEY, _LEASE.pack(deadline, lease, _BOOT))
            if secret:
                txn.put(SECRET_KEY, secret)
            for shard, revision in claims.items():
                txn.put(b"c" + _U32.pack(shard), _U64.pack(revision))
            for shard, (node, revision) in owners.items():
                txn.put(b"o" + _U32.pack(shard), json.dumps({"node": node, "revision": revision}).encode())
            for node in nodes:
                txn.put(b"n" + node.name.encode(), json.dumps(
                    {"address": node.address, "ports": node.ports, "draining": node.draining}).encode())

    def set_lease(self, *, deadline: float, lease: int) -> None:
        """A keepalive answered: the claims are good until `deadline` (CLOCK_MONOTONIC)."""
        assert self.writer, "only the agent writes the node table"
        with self.env.begin(write=True) as txn:
            txn.put(LEASE_KEY, _LEASE.pack(deadline, lease, _BOOT))

    def drop_claims(self) -> None:
        """Every claim withdrawn at once (the lease lapsed, or the agent stops)."""
        assert self.writer, "only the agent writes the node table"
        with self.env.begin(write=True) as txn:
            _clear(txn, b"c")


class _Environments:
    """LMDB allows a file one environment a process, and a daemon process has two users of
    its node table (its store's fence, its ClusterView): they share it, and the last to
    close it closes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Path, tuple[lmdb.Environment, int]] = {}

    def acquire(self, path: Path) -> lmdb.Environment:
        with self._lock:
            env, users = self._open.get(path, (None, 0))
            if env is None:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                env = lmdb.open(str(path), map_size=MAP_SIZE, subdir=False, sync=False, metasync=False,
                                mode=0o600, max_readers=1024, readahead=False)
            self._open[path] = (env, users + 1)
            return env

    def release(self, path: Path) -> None:
        with self._lock:
            env, users = self._open[path]
            if users > 1:
                self._open[path] = (env, users - 1)
            else:
                del self._open[path]
                env.close()


_environments = _Environments()


def _clear(txn: lmdb.Transaction, prefix: bytes) -> None:
    """Delete every key that starts with `prefix`."""
    cursor = txn.cursor()
    if cursor.set_range(prefix):
        while cursor.key().startswith(prefix) and cursor.delete():
            pass


def _node(name: str, raw: bytes | None) -> Node:
    if raw is None:  # an owner whose node record is gone (its lease just lapsed)
        return Node(name, "", {})
    record = json.loads(raw)
    return Node(name, record["address"], {k: int(v) for k, v in record["ports"].items()}, bool(record["draining"]))


def node_name(config: Config) -> str:
    """This node's name: [cluster] node, else [server] hostname."""
    return config.cluster.node or config.server.hostname


def open_node_table(config: Config, data_dir: DataDir, *, writer: bool = False) -> NodeTable:
    return NodeTable(data_dir.cluster_table_path(node_name(config)), writer=writer)
