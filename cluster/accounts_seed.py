"""Bringing a node's existing accounts into the cluster: push the local LMDB's rows to etcd.

A single node that becomes the first node of a cluster has its domains, users and aliases
in its local accounts LMDB only; its mirror (cluster/accounts_mirror.py) refuses to replace
them with etcd's set until etcd has them. `push_local` copies every row that etcd does not
have yet (create-if-absent, so a second node pushing the same rows changes nothing, and a
row etcd already has is left as etcd has it), then records the revision on the node so
its mirror loads etcd's set from then on.
"""

from __future__ import annotations

from cluster.accounts_etcd import EtcdAccounts, b64, etcd_key
from storage import Accounts

BATCH = 64  # puts per transaction (etcd allows 128 operations; each put has a compare too)


def push_local(accounts: Accounts, endpoints: list[str], prefix: str = "/postroom/") -> tuple[int, int]:
    """(rows pushed, rows etcd already had) for this node's accounts."""
    etcd = EtcdAccounts(endpoints, prefix)
    rows = list(accounts.rows())
    pushed = kept = revision = 0
    for start in range(0, len(rows), BATCH):
        batch = rows[start:start + BATCH]
        ok, revision = etcd.txn(*_create_all(etcd, batch))
        if ok:
            pushed += len(batch)
            continue
        for row in batch:  # some are in etcd already: one at a time, to push the others
            ok, revision = etcd.txn(*_create_all(etcd, [row]))
            pushed, kept = (pushed + 1, kept) if ok else (pushed, kept + 1)
    if not rows:
        revision, _, _ = etcd.range(b"\0", b"\0\0", keys_only=True)
    accounts.apply_mirrored([], revision)
    return pushed, kept


def _create_all(etcd: EtcdAccounts, rows: list) -> tuple[list[dict], list[dict]]:
    compare, success = [], []
    for table, key, value in rows:
        k = b64(etcd_key(etcd.prefix, table, key))
        compare.append({"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0})
        success.append({"request_put": {"key": k, "value": b64(value)}})
    return compare, success
