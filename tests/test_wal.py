"""The write-ahead log (storage/wal.py) after what a crash of the machine leaves, with real
processes and the real store.

LMDB commits without flushing its meta page (MDB_NOMETASYNC), so after a power cut its file
may lack the last transactions, while the log, flushed before each commit, has them. That
state is made here exactly: a process delivers, LMDB's file is swapped for a consistent copy
taken before the last deliveries (`env.copy`, what the disk could hold), the process is
killed; the next to open the store must put every acknowledged message back in the index
under its own UID, hand out no UID twice, and leave `store check` clean.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from test_journal_hostile import ACCOUNT, SHARDS, child, kill, message, run_until, verify

from storage import open_data_dir
from storage.store import Store
from storage.wal import HEADER, MAGIC, WriteAheadLog

WRITER = """
store.ensure_account(ACCOUNT)
for seq in range(1, 21):
    store.deliver([ACCOUNT], message(seq))
shard = store.shard(ACCOUNT)
shard.env.copy(sys.argv[1])  # LMDB as it was before the last ten
for seq in range(21, 31):
    store.deliver([ACCOUNT], message(seq))
say(str(shard.path))
say("ready")
time.sleep(600)
"""


def _crash_with_lmdb_behind(data_dir: Path, tmp_path: Path) -> Path:
    """Deliver 30, kill the writer, leave LMDB as it was after 20 and the log as it was; the
    shard's directory."""
    copy = tmp_path / "lmdb-before"
    copy.mkdir()
    writer = child(data_dir, WRITER, str(copy))
    lines = run_until(writer, "ready")
    kill(writer)
    shard_dir = Path(lines[-2])
    shutil.copyfile(copy / "data.mdb", shard_dir / "index.lmdb" / "data.mdb")
    assert (shard_dir / "index.lmdb" / "wal.log").stat().st_size > 0
    return shard_dir


def _uids(data_dir: Path) -> dict[int, int]:
    """X-Seq -> UID in the INBOX."""
    import re

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        return {int(re.search(rb"X-Seq: (\d+)", store.read_message(info)).group(1)): info.uid
                for info in store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])}


def test_the_log_puts_back_what_lmdb_lost(data_dir, tmp_path):
    _crash_with_lmdb_behind(data_dir, tmp_path)
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 31)}})
    assert _uids(data_dir) == {seq: seq for seq in range(1, 31)}, "each message under the UID its 250 came with"
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.deliver([ACCOUNT], message(31))
    assert _uids(data_dir)[31] == 31, "no UID handed out twice"
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 32)}})


def test_a_torn_record_at_the_end_is_cut_off(data_dir, tmp_path):
    shard_dir = _crash_with_lmdb_behind(data_dir, tmp_path)
    log = shard_dir / "index.lmdb" / "wal.log"
    with open(log, "ab") as f:  # an append the crash cut short: a header, half its payload
        f.write(HEADER.pack(MAGIC, 4000, 0, 10**6) + b"\x93" * 1000)
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 31)}})
    reader = WriteAheadLog(log, [])
    ends = [end for _, _, end in reader.records()]
    reader.close()
    assert (ends[-1] if ends else 0) == log.stat().st_size, "the log is whole records only: the torn one is gone"
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.deliver([ACCOUNT], message(31))
    assert _uids(data_dir) == {seq: seq for seq in range(1, 32)}


def test_a_clean_close_leaves_the_log_empty(data_dir):
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.ensure_account(ACCOUNT)
        for seq in range(1, 6):
            store.deliver([ACCOUNT], message(seq))
        log = store.shard(ACCOUNT).path / "index.lmdb" / "wal.log"
        assert log.stat().st_size > 0
    assert log.stat().st_size == 0, "everything in LMDB for good: nothing to replay"
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 6)}})
