"""A shard's committer and another process's writer lock (storage/shard.py, _join_late):
what comes in while the committer waits for LMDB's lock, which another process holds (the
other mtad worker, imapd), joins the batch it is about to commit, so that it shares one
record of the write-ahead log and its one flush; a request with file work to do first (a
big message's fsync) is not joined, as that work would hold the lock, and opens the next
batch; a close that comes meanwhile still commits every request."""

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


class LockHeld:
    """Another process holding the shard's writer lock until release()."""

    def __init__(self, shard: Shard):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(shard.path / "index.lmdb")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        assert self.process.wait(30) == 0


class Settled:
    """on_done for `count` requests: their results, in the order they settled."""

    def __init__(self, count: int):
        self.count, self.results, self.all = count, [], threading.Event()

    def __call__(self, request) -> None:
        self.results.append(request.error or request.result)
        if len(self.results) == self.count:
            self.all.set()


def taken(shard: Shard) -> None:
    """Until the committer has taken what was submitted (it then waits for the lock)."""
    deadline = time.monotonic() + 10
    while not shard._queue.empty():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)


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
        holder = LockHeld(shard)
        settled = Settled(6)
        try:
            shard.submit(put(shard, 1), on_done=settled)
            taken(shard)  # request 1 taken: the committer waits for the lock
            for number in range(2, 7):
                shard.submit(put(shard, number), on_done=settled)
            time.sleep(0.1)
            assert not settled.all.is_set()
        finally:
            holder.release()
        assert settled.all.wait(30)
        assert sorted(settled.results) == [1, 2, 3, 4, 5, 6]
        # One record for all six: before, request 1 went alone and 2..6 waited for a second.
        assert log_seq(shard) == before + 1
        with shard.read() as txn:
            assert all(txn.get(b"joined-%d" % n, db=shard.db["counters"]) == b"x" for n in range(7))
    finally:
        shard.close()


def test_a_request_with_file_work_is_not_joined_and_keeps_its_place(tmp_path):
    shard = Shard(tmp_path / "0", 0)
    try:
        shard.write(put(shard, 0))
        before = log_seq(shard)
        holder = LockHeld(shard)
        settled = Settled(4)
        ran: list[int] = []
        try:
            shard.submit(put(shard, 1), on_done=settled)
            taken(shard)
            shard.submit(put(shard, 2), on_done=settled)
            shard.submit(put(shard, 3), before=lambda: ran.append(log_seq(shard)), on_done=settled)
            shard.submit(put(shard, 4), on_done=settled)
            time.sleep(0.1)
        finally:
            holder.release()
        assert settled.all.wait(30)
        # 1 and 2 in one record; 3's file work after it, then 3 and 4 (which came after it).
        assert settled.results == [1, 2, 3, 4]
        assert ran == [before + 1]
        assert log_seq(shard) == before + 2
    finally:
        shard.close()


def test_a_close_while_the_lock_is_awaited_commits_every_request(tmp_path):
    shard = Shard(tmp_path / "0", 0)
    closed = threading.Event()
    holder = None
    try:
        shard.write(put(shard, 0))
        holder = LockHeld(shard)
        settled = Settled(3)
        shard.submit(put(shard, 1), on_done=settled)
        taken(shard)
        shard.submit(put(shard, 2), before=lambda: None, on_done=settled)
        shard.submit(put(shard, 3), on_done=settled)
        closing = threading.Thread(target=lambda: (shard.close(), closed.set()))
        closing.start()
        time.sleep(0.2)
        assert not closed.is_set()  # it waits for the committer, which waits for the lock
        holder.release()
        closing.join(30)
        assert closed.is_set()
        assert settled.results == [1, 2, 3]
    finally:
        if holder is not None:
            holder.release()
        if not closed.is_set():
            shard.close()
