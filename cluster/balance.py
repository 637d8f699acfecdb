"""Which shards a node should claim or release: a pure function of what etcd says.

Each live node that is not draining aims at its share: shards // such nodes, one more for
the first shards % such nodes of them by name (4 shards on 3 nodes: 2, 1, 1; with
ceil(shards / nodes) for all, 2, 2, 0 was "balanced" and left a node idle). A node under
its share claims free shards (owned by nobody: the owner's lease lapsed, or it released
them), up to its share; a node over it (a node joined, or came back from a drain)
releases the excess, highest numbers first, for the newcomer to claim. The shares add up
to the shard count, so once the nodes agree on who is live, no shard stays free. A
draining node, or one not (yet) registered, aims at none.

Nodes try free shards in an order of their own (rotated by a hash of their name), so that
several nodes claiming at once mostly try different shards: the losers of a race only
lose a compare-and-swap transaction.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    claim: list[int]
    release: list[int]


def share(shards: int, live: int) -> int:
    """The most shards one of `live` nodes should own."""
    return math.ceil(shards / live) if live else 0


def target(shards: int, me: str, live: set[str]) -> int:
    """How many shards `me`, one of the `live` nodes, should own."""
    ranked = sorted(live)
    base, extra = divmod(shards, len(ranked))
    return base + (1 if ranked.index(me) < extra else 0)


def plan(shards: int, me: str, live: set[str], owners: dict[int, str]) -> Plan:
    """`live`: the registered nodes that are not draining; `owners`: shard -> node."""
    mine = sorted(n for n, node in owners.items() if node == me)
    aim = target(shards, me, live) if me in live else 0
    if len(mine) > aim:
        return Plan([], mine[aim:])
    free = [n for n in range(shards) if n not in owners]
    start = int.from_bytes(hashlib.blake2b(me.encode(), digest_size=4).digest(), "big") % shards if shards else 0
    free.sort(key=lambda n: (n - start) % shards)
    return Plan(free[:aim - len(mine)], [])
