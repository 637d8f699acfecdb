"""The LMDB environment behind the tables that every process of a data dir shares (failed
logins, policy/logins.py; rate buckets, policy/rates.py; greylisting, policy/greylist.py).

Each is small and counts something a crash may forget at little cost (a guesser's failures,
a bucket's tokens, a first try), so it is not synced: its writes cost a transaction, not an
fsync. LMDB serializes write transactions across processes, which is what makes the counts
add up across mtad's SO_REUSEPORT workers and the other daemons.
"""

from __future__ import annotations

from pathlib import Path

import lmdb


def open_shared(path: Path, map_size: int) -> lmdb.Environment:
    Path(path).mkdir(mode=0o700, exist_ok=True)  # lmdb would make it without the search bit
    return lmdb.open(str(path), map_size=map_size, subdir=True, sync=False, metasync=False, max_dbs=0, mode=0o600)
