"""A shard's committer and another process's writer lock (storage/shard.py, _join_late):
what comes in while the committer waits for LMDB's lock, which another process holds (the
other mtad worker, imapd), joins the batch it is about to commit, so that it shares one
record of the write-ahead log and its one flush."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from storage import wal
from storage.shard import Shard

# Another process holding the shard's LMDB writer lock until it reads a line.
HOLDER = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=64, readahead=False)
txn = env.begin(write=True)
print("held", flush=True)
sys.stdin.readline()
txn.abort()
env.close()
"""


def log_seq(shard: Shard) -> int:
    with shard.read() as txn:
        return wal.read_position(txn, shard.db["counters"])[0]


def put(shard: Shard, number: int):
    def change(txn, batch):
        txn.put(b"joined-%d" % number, b"x", db=shard.db["counters"])
        return number
    return change


def test_requests_queued_while_another_process_holds_the_lock_share_one_commit(tmp_path):
    shard = Shard(tmp_path / "0", 0)
    try:
        shard.write(put(shard, 0))  # the committer started, the log begun
        before = log_seq(shard)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "0" / "index.lmdb")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            done = threading.Event()
            settled: list[int] = []

            def on_done(request) -> None:
                settled.append(request.result)
                if len(settled) == 6:
                    done.set()

            shard.submit(put(shard, 1), on_done=on_done)
            time.sleep(0.3)  # the committer has taken request 1 and waits for the lock
            for number in range(2, 7):
                shard.submit(put(shard, number), on_done=on_done)
            time.sleep(0.1)
            assert not done.is_set()
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(30) == 0
        assert done.wait(30)
        assert sorted(settled) == [1, 2, 3, 4, 5, 6]
        # One record for all six: before, request 1 went alone and 2..6 waited for a second.
        assert log_seq(shard) == before + 1
        with shard.read() as txn:
            assert all(txn.get(b"joined-%d" % n, db=shard.db["counters"]) == b"x" for n in range(7))
    finally:
        shard.close()
