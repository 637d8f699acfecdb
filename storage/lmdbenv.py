"""LMDB environments as the store and the accounts database open them."""

from __future__ import annotations

from collections.abc import Iterable

import lmdb


def open_databases(env: lmdb.Environment, names: Iterable[str]) -> dict:
    """Handles of the named databases, created where missing.

    In a write transaction we begin ourselves: `open_db` without one begins its own while
    holding the GIL, so if another process has the environment's writer lock it blocks
    every thread of this process until that lock is free, and a committer of that other
    process waiting on our writer lock for another shard makes it a deadlock (seen with
    two MX workers delivering to fresh shards). `begin` waits with the GIL released."""
    with env.begin(write=True) as txn:
        return {name: env.open_db(name.encode(), txn=txn) for name in names}
