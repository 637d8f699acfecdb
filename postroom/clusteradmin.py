"""`postroom cluster status | drain NODE | undrain NODE | agent`: the cluster as etcd
says it is, and a node taken out for maintenance and put back.

A drain is a key (drain/NODE) with no lease: the node stays registered, hands its shards
to the others and claims none, across its restarts, until `undrain` deletes the key.
`drain` refuses to leave no node to take the shards, and waits (up to --timeout) until the
node owns none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from conf import Config

if TYPE_CHECKING:
    from cluster.etcd import Etcd, Snapshot

# etcd's client (etcd3gw, requests) is imported by the commands that talk to etcd, not here:
# every `postroom` process builds the parser that add_commands fills, and that import costs
# a single node's CLI and serve a fifth of a second of CPU each for nothing.

DRAIN_TIMEOUT = 120.0
POLL = 0.2


def status(config: Config, args: argparse.Namespace) -> int:
    from cluster.etcd import EtcdError

    etcd = _etcd(config)
    if etcd is None:
        return 1
    try:
        snapshot = etcd.snapshot()
        ttls = {name: etcd.time_to_live(kv.lease) for name, kv in snapshot.under("nodes/").items()}
    except EtcdError as e:
        print(f"postroom: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(format_status(snapshot, ttls, config.storage.shards, etcd.prefix))
    return 0


def format_status(snapshot: Snapshot, ttls: dict[str, int], shards: int, prefix: str) -> str:
    nodes, owners, drains = snapshot.under("nodes/"), snapshot.under("owners/"), snapshot.under("drain/")
    owner = {int(name): (json.loads(kv.value)["node"], kv.mod_revision) for name, kv in owners.items()}
    rows = [("NODE", "ADDRESS", "PORTS", "LEASE TTL", "SHARDS", "STATE")]
    for name in sorted(set(nodes) | set(drains)):
        count = str(sum(1 for node, _ in owner.values() if node == name))
        if name in nodes:
            record = json.loads(nodes[name].value)
            ports = " ".join(f"{k}={v}" for k, v in sorted(record["ports"].items()))
            state = "draining" if name in drains else "live"
            rows.append((name, record["address"], ports, f"{ttls.get(name, -1)} s", count, state))
        else:
            rows.append((name, "-", "-", "-", count, "down, drained"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"cluster {prefix} at revision {snapshot.revision}: {len(nodes)} node(s), "
             f"{len(owner)}/{shards} shard(s) owned", ""]
    for row in rows:
        lines.append("  ".join(cell.rjust(w) if i in (3, 4) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    width = max(len("OWNER"), *(len(node) for node, _ in owner.values()))
    lines += ["", f"{'SHARD':>5}  {'OWNER':<{width}}  REVISION"]
    for shard in range(shards):
        node, revision = owner.get(shard, ("-", None))
        lines.append(f"{shard:>5}  {node:<{width}}  {revision if revision is not None else 'free'}")
    return "\n".join(lines) + "\n"


def drain(config: Config, args: argparse.Namespace) -> int:
    from cluster.etcd import EtcdError

    etcd = _etcd(config)
    if etcd is None:
        return 1
    node = args.node
    try:
        snapshot = etcd.snapshot()
        drains = snapshot.under("drain/")
        others = [n for n in snapshot.under("nodes/") if n != node and n not in drains]
        if not others:
            print(f"postroom: no other live node to take {node}'s shards: not drained", file=sys.stderr)
            return 1
        etcd.put(f"drain/{node}", b"")
        if args.no_wait:
            print(f"draining {node}")
            return 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            owned = _owned_by(etcd.snapshot(), node)
            if not owned:
                print(f"drained {node}: it owns no shard")
                return 0
            time.sleep(POLL)
    except EtcdError as e:
        print(f"postroom: {e}", file=sys.stderr)
        return 1
    print(f"postroom: {node} still owns shards {', '.join(map(str, owned))} after {args.timeout:g} s "
          "(it stays draining)", file=sys.stderr)
    return 1


def undrain(config: Config, args: argparse.Namespace) -> int:
    from cluster.etcd import EtcdError

    etcd = _etcd(config)
    if etcd is None:
        return 1
    try:
        etcd.delete(f"drain/{args.node}")
    except EtcdError as e:
        print(f"postroom: {e}", file=sys.stderr)
        return 1
    print(f"{args.node} takes shards again")
    return 0


def push_accounts(config: Config, args: argparse.Namespace) -> int:
    """This node's accounts (made before it joined the cluster) into etcd, where they are
    the cluster's: what etcd has already is kept (cluster/accounts_seed.py)."""
    if _etcd(config) is None:
        return 1
    from cluster.accounts_seed import push_local
    from postroom.datadir import open_accounts

    _, accounts = open_accounts(config)
    try:
        pushed, kept = push_local(accounts, list(config.cluster.etcd), config.cluster.prefix)
    except Exception as e:  # noqa: BLE001 - etcd's errors, said in one line
        print(f"postroom: {e}", file=sys.stderr)
        return 1
    finally:
        accounts.close()
    print(f"{pushed} account row(s) pushed to etcd, {kept} there already")
    return 0


def agent(config: Config, args: argparse.Namespace) -> int:
    if _etcd(config) is None:
        return 1
    from postroom import cluster_agent as process

    return process.run(config)


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("cluster", help="the nodes of a cluster and the shards they own")
    cluster = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    cluster.add_parser("status", help="nodes, their leases, and each shard's owner").set_defaults(run=status)
    p = cluster.add_parser("drain", help="hand a node's shards to the others; it claims none until undrain")
    p.add_argument("node")
    p.add_argument("--no-wait", action="store_true", help="return at once rather than when it owns no shard")
    p.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, help="seconds to wait (default %(default)g)")
    p.set_defaults(run=drain)
    p = cluster.add_parser("undrain", help="let a drained node claim shards again")
    p.add_argument("node")
    p.set_defaults(run=undrain)
    cluster.add_parser("agent", help="run this node's agent in the foreground (serve runs it itself)"
                       ).set_defaults(run=agent)
    cluster.add_parser("push-accounts", help="put this node's accounts into etcd, before its agent first runs"
                       ).set_defaults(run=push_accounts)
    for sub in cluster.choices.values():
        sub.set_defaults(own_config=True)


def _owned_by(snapshot: Snapshot, node: str) -> list[int]:
    return sorted(int(name) for name, kv in snapshot.under("owners/").items() if json.loads(kv.value)["node"] == node)


def _etcd(config: Config) -> Etcd | None:
    if not config.cluster.enabled:
        print(f"postroom: {config.source}: no [cluster] etcd: this node is not in a cluster", file=sys.stderr)
        return None
    from cluster.etcd import Etcd

    return Etcd(config.cluster)
