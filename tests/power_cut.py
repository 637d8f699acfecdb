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

from storage import wal
from storage.shard import DATABASES, WAL_NAME


def journal_bases(data_dir: Path) -> dict[Path, list[str]]:
    """The `journal` keys of each shard as its next opening will find them: LMDB's, with the
    write-ahead log's records beyond LMDB applied (storage/wal.py). A process killed between
    a record's flush and LMDB's commit leaves LMDB one transaction behind; that transaction
    may be a checkpoint's, whose entries' files its flush had made durable, so a power cut
    cannot touch them (the replay deletes their entries), or a delivery's, whose new entries
    name files no flush covered yet."""
    out = {}
    journal_db = DATABASES.index("journal")
    for shard_dir in sorted((data_dir / "shards").iterdir()):
        env = lmdb.open(str(shard_dir / "index.lmdb"), max_dbs=64, readonly=True, lock=False)
        try:
            with env.begin() as txn:
                seq, end = wal.read_position(txn, env.open_db(b"counters", txn=txn, create=False))
                keys = dict.fromkeys(bytes(key) for key, _ in txn.cursor(db=env.open_db(b"journal", txn=txn,
                                                                                         create=False)))
        except lmdb.NotFoundError:
            keys, seq, end = {}, 0, 0
        finally:
            env.close()
        log_path = shard_dir / "index.lmdb" / WAL_NAME
        if log_path.exists():
            log = wal.WriteAheadLog(log_path, [])
            try:
                for number, changes, _ in log.records(end):
                    if number != seq + 1:
                        break  # older records, from before the log's last restart
                    seq = number
                    for i in range(0, len(changes), 3):
                        db, key, value = changes[i:i + 3]
                        if db != journal_db:
                            continue
                        if key is None:
                            keys.clear()
                        elif value is None:
                            keys.pop(bytes(key), None)
                        else:
                            keys[bytes(key)] = None
            finally:
                log.close()
        out[shard_dir] = [key.decode() for key in keys]
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
