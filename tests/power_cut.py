"""A power cut, as far as a test can make one: what only a flush would have kept is lost.

A machine that loses power keeps what reached the disk; a file written without a flush may
be missing, empty, cut short or zeroed, whatever its directory says. The store writes new
messages' files without a flush and keeps their bytes in the index's journal until a
checkpoint has flushed them (storage/journal.py): after a SIGKILL (which loses nothing of the
page cache), damaging every file a journal entry names is the worst a power cut could do to
them. Used by tests/test_store_crash.py and tests/test_journal_hostile.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import lmdb


def journal_bases(data_dir: Path) -> dict[Path, list[str]]:
    out = {}
    for shard_dir in sorted((data_dir / "shards").iterdir()):
        env = lmdb.open(str(shard_dir / "index.lmdb"), max_dbs=64, readonly=True, lock=False)
        try:
            with env.begin(db=env.open_db(b"journal", create=False)) as txn:
                out[shard_dir] = [bytes(key).decode() for key, _ in txn.cursor()]
        except lmdb.NotFoundError:
            out[shard_dir] = []
        finally:
            env.close()
    return out


def power_cut(data_dir: Path) -> int:
    """Damage every file a journal entry names, four ways in turn; how many."""
    damaged = 0
    for shard_dir, bases in journal_bases(data_dir).items():
        for base in bases:
            for path in [*shard_dir.glob(f"*/*/cur/{base},*"), *shard_dir.glob(f"*/*/new/{base}*"),
                         *shard_dir.glob(f"tmp/*/{base}")]:
                how = damaged % 4
                if how == 0:
                    path.unlink()
                elif how == 1:
                    os.truncate(path, 0)
                elif how == 2:
                    os.truncate(path, path.stat().st_size // 2)
                else:
                    path.write_bytes(bytes(path.stat().st_size))
                damaged += 1
    return damaged
