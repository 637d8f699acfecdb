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
import subprocess
import sys
from pathlib import Path

from test_journal_hostile import ACCOUNT, SHARDS, child, kill, message, run_until, verify

from storage import open_data_dir, wal
from storage.store import Store
from storage.wal import HEADER, MAGIC, WriteAheadLog, encode

def _writer(first: int, copy_at: int, last: int, before: str = "") -> str:
    """A child's script: `before`, then deliveries first..last, LMDB copied to argv[1] just
    before copy_at (what the disk could hold); then it says where the shard is and waits."""
    return f"""
store.ensure_account(ACCOUNT)
shard = store.shard(ACCOUNT)
{before}
for seq in range({first}, {copy_at}):
    store.deliver([ACCOUNT], message(seq))
shard.env.copy(sys.argv[1])
for seq in range({copy_at}, {last + 1}):
    store.deliver([ACCOUNT], message(seq))
say(str(shard.path))
say("ready")
time.sleep(600)
"""


def _crash_with_lmdb_behind(data_dir: Path, tmp_path: Path, script: str | None = None, **env: str) -> Path:
    """Run `script` (by default: deliver 30, LMDB copied after 20), kill the writer, leave
    LMDB as the copy has it and the log as it was; the shard's directory."""
    copy = tmp_path / "lmdb-before"
    copy.mkdir()
    writer = child(data_dir, script or _writer(1, 21, 30), str(copy), **env)
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


def _chain(log: Path) -> list[tuple[int, int]]:
    """(number, end offset) of the records from the log's start while their numbers follow
    on: the records since the last restart."""
    reader = WriteAheadLog(log, [])
    try:
        chain: list[tuple[int, int]] = []
        for number, _, end in reader.records():
            if chain and number != chain[-1][0] + 1:
                break
            chain.append((number, end))
        return chain
    finally:
        reader.close()


def test_a_torn_record_after_the_last_is_voided(data_dir, tmp_path):
    shard_dir = _crash_with_lmdb_behind(data_dir, tmp_path)
    log = shard_dir / "index.lmdb" / "wal.log"
    last, end = _chain(log)[-1]
    with open(log, "r+b") as f:  # the next record's append, cut short: its header, part of it
        f.seek(end)
        f.write(HEADER.pack(MAGIC, 4000, 0, last + 1) + b"\x93" * 1000)
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 31)}})
    reader = WriteAheadLog(log, [])
    try:  # voided, or a whole record since written in its place by the recovery's commits
        assert reader.has_next(last, end) == any(True for _ in reader.records(end)), "a torn record stays"
    finally:
        reader.close()
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.deliver([ACCOUNT], message(31))
    assert _uids(data_dir) == {seq: seq for seq in range(1, 32)}


RESTART = """
from storage import wal
for seq in range(1, 21):
    store.deliver([ACCOUNT], message(seq))
deadline = time.monotonic() + 30
while True:  # the checkpointer restarts the log at offset 0 within a second or so
    with shard.env.begin() as txn:
        if wal.read_position(txn, shard.db["counters"])[1] == 0:
            break
    assert time.monotonic() < deadline, "no checkpoint restarted the log"
    time.sleep(0.05)
"""


def test_records_from_before_a_restart_are_never_replayed(data_dir, tmp_path):
    """After a checkpoint the log starts again at offset 0 over its old records; past the
    new ones lie old ones, whole and valid, numbered below LMDB's (here one is put where the
    next record goes, as it would lie if the offsets lined up). Replaying one would put back
    an old UID counter, and the next delivery would reuse a UID."""
    shard_dir = _crash_with_lmdb_behind(data_dir, tmp_path, _writer(21, 24, 26, before=RESTART),
                                        CHECKPOINT_INTERVAL="0.2")
    log = shard_dir / "index.lmdb" / "wal.log"
    chain = _chain(log)
    end = chain[-1][1]
    data = log.read_bytes()
    at = data.index(MAGIC, end)  # an old record, past the new ones
    reader = WriteAheadLog(log, [])
    try:
        number, _, stop = next(reader.records(at))
    finally:
        reader.close()
    assert len(chain) >= 6 and number < chain[0][0]
    with open(log, "r+b") as f:  # where the next record goes: as if the old ones lined up there
        f.seek(end)
        f.write(data[at:stop])
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 27)}})
    assert _uids(data_dir) == {seq: seq for seq in range(1, 27)}
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.deliver([ACCOUNT], message(27))
    assert _uids(data_dir)[27] == 27, "no UID handed out twice"


def test_records_are_written_in_room_made_ahead(data_dir):
    """The file grows by whole chunks of zeros, flushed once; the records written into them
    change no size (a size change costs a journal commit at each flush)."""
    from storage.wal import CHUNK_BYTES

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.ensure_account(ACCOUNT)
        store.deliver([ACCOUNT], message(1))
        log = store.shard(ACCOUNT).path / "index.lmdb" / "wal.log"
        size = log.stat().st_size
        assert size % CHUNK_BYTES == 0 and size > 0
        for seq in range(2, 12):
            store.deliver([ACCOUNT], message(seq))
            assert log.stat().st_size == size
        assert _chain(log), "the records are there, from the start"


def test_a_clean_close_leaves_the_log_empty(data_dir):
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.ensure_account(ACCOUNT)
        for seq in range(1, 6):
            store.deliver([ACCOUNT], message(seq))
        log = store.shard(ACCOUNT).path / "index.lmdb" / "wal.log"
        assert log.stat().st_size > 0
    assert log.stat().st_size == 0, "everything in LMDB for good: nothing to replay"
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 6)}})


def test_a_header_claiming_more_than_the_file_holds_is_no_record(tmp_path):
    """A torn header's length can be anything: it must end the records there, not make the
    reader allocate gigabytes (here in a process limited to 1 GiB of address space beyond
    what it has); catch_up then voids it, as its header names the next record."""
    log = WriteAheadLog(tmp_path / "wal.log", [])
    try:
        end = log.append(encode(1, [0, b"key", b"value"]), 0)
    finally:
        log.close()
    with open(tmp_path / "wal.log", "r+b") as f:
        f.seek(end)
        f.write(HEADER.pack(MAGIC, 2**32 - 1, 0, 2))
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from storage.wal import WriteAheadLog
with open("/proc/self/statm") as f:
    now = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (now + (1 << 30), resource.RLIM_INFINITY))
log = WriteAheadLog({str(tmp_path / "wal.log")!r}, [])
print([(number, stop) for number, _, stop in log.records()], log.has_next(1, {end}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == f"[(1, {end})] True"


def test_where_the_next_record_goes_never_reads_as_an_old_one(tmp_path):
    """After a restart, records are written over old ones, whose bytes (a message's own
    text among them) could hold something that reads as a record. Each record is followed
    by a zeroed header and a restart voids offset 0, so walend never lands on such bytes:
    here a record ends exactly where a forged one, numbered next, lies in an old record."""
    forged = encode(3, [0, b"uidnext", b"\x00\x00\x00\x01"])
    log = WriteAheadLog(tmp_path / "wal.log", [])
    try:
        log.append(encode(1, [0, b"text", b"x" * 200 + forged + b"y" * 200]), 0)
        at = (tmp_path / "wal.log").read_bytes().index(forged)
        log.restart()
        assert not log.has_next(1, 0), "a restart leaves offset 0 as no record"
        (padding,) = [n for n in range(at) if len(encode(2, [0, b"k", b"z" * n])) == at]
        end = log.append(encode(2, [0, b"k", b"z" * padding]), 0)
        assert end == at
        assert not log.has_next(2, end), "the forged record is not taken for the next"
    finally:
        log.close()


def test_a_read_whose_snapshot_the_log_has_moved_past_waits(data_dir):
    """A read checks the log without the writer lock: between its snapshot and the check a
    commit and a checkpoint's restart can take the record it lacks out of sight. A snapshot
    that is no longer the last counts as behind (the read then begins again)."""
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.ensure_account(ACCOUNT)
        store.deliver([ACCOUNT], message(1))
        shard = store.shard(ACCOUNT)
        with shard.env.begin() as snapshot:
            store.deliver([ACCOUNT], message(2))
            shard.checkpoint()
            with shard.env.begin() as txn:
                assert wal.read_position(txn, shard.db["counters"])[1] == 0, "the log restarted"
            for seq in range(3, 6):  # written over the old records, message 2's among them
                store.deliver([ACCOUNT], message(seq))
            assert shard._behind(snapshot)
        with shard.env.begin() as current:
            assert not shard._behind(current)
