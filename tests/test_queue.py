"""The outbound queue (storage/queue.py) on a real data dir, with real processes for what
crosses them: crashes (SIGKILL mid-enqueue and mid-record), a live enqueue beside another
process's recovery, the one runner lock, and changes seen through changed()."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import scale
from diskfill import fill
from storage import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    QUEUED,
    DiskFullError,
    NotQueuedError,
    Queue,
    QueuedRecipient,
    QueueEnvelope,
    Result,
    StoreError,
    open_data_dir,
)
from storage.queue_ids import created_of, is_id

WORKER = Path(__file__).with_name("queue_worker.py")
SHARDS = 2
ENQUEUE_ROUNDS = 10
RECORD_ROUNDS = scale.count(4, 8)  # `make test-long` kills the recording worker eight times


def open_queue(data_dir: Path) -> Queue:
    return Queue(open_data_dir(data_dir, SHARDS))


def envelope(*recipients: str, **fields) -> QueueEnvelope:
    return QueueEnvelope(sender="alice@example.test", recipients=tuple(QueuedRecipient(r) for r in recipients),
                         **fields)


def put(queue: Queue, raw: bytes, *recipients: str, prepend: bytes = b"", **fields) -> str:
    with queue.begin(envelope(*recipients, **fields)) as entry:
        entry.write(raw)
        return entry.commit(prepend)


def spool_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "queue" / "msg").iterdir()}


def start_worker(data_dir: Path, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(data_dir), *args], stdout=subprocess.PIPE,
                            stdin=stdin, text=True)


def collect(process: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def read() -> None:
        for line in process.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def read_line(process: subprocess.Popen, timeout: float = 30) -> str:
    """The child's next line, or fail after `timeout` (a child that hangs must not hang us)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline().strip()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[0], f"no line from the worker within {timeout}s"
    return lines[0]


# -- streamed enqueue, reading back, reopening -------------------------------------------------


def test_streamed_enqueue_reads_back_byte_for_byte_with_its_prepend(data_dir):
    from queue_worker import message

    with open_queue(data_dir) as queue:
        for seq in (1, 2, 5000):  # 4 KB in memory; 70 KB and ~150 KB through the file
            raw = message(seq)
            rng = random.Random(seq)
            with queue.begin(envelope("bob@remote.test", envid="ENV1", ret="FULL", smtputf8=True)) as entry:
                at = 0
                while at < len(raw):
                    step = rng.randint(1, 9000)
                    entry.write(raw[at:at + step])
                    at += step
                assert entry.size == len(raw)
                assert entry.read() == raw  # what a DKIM signer reads before the commit
                qid = entry.commit(b"DKIM-Signature: v=1\r\n")
            assert qid == entry.id and is_id(qid)
            whole = b"DKIM-Signature: v=1\r\n" + raw
            assert queue.read(qid) == whole
            with queue.open(qid) as f:
                assert f.read(10) == whole[:10]
                f.seek(len(whole) - 100)
                assert f.read() == whole[-100:]
                f.seek(0)
                assert f.read() == whole
            queued = queue.get(qid)
            assert queued.size == len(whole)
            assert (queued.envelope.envid, queued.envelope.ret, queued.envelope.smtputf8) == ("ENV1", "FULL", True)
            assert (data_dir / "queue" / "msg" / qid).stat().st_size == len(raw)  # the prepend is in the index


def test_a_change_seen_is_never_newer_than_the_look_after_it(data_dir):
    """The runner's loop (mtad/outbound/runner.py) in a thread while another commits:
    changed(), and only when it moved a look at the due mail. Once an enqueue is done and
    nothing else changes, the last look must have seen it: else the runner sleeps through
    it (a CI run's message waited 30 s after an enqueue by another process)."""
    queue = open_queue(data_dir)
    stop = threading.Event()
    for i in range(60):
        look: dict = {}

        def runner() -> None:
            last = None
            while not stop.is_set():
                change = queue.changed()
                if change != last:
                    last = change
                    look.update(change=change, due={m.id for m in queue.due(time.time() + 60, 1000)})

        stop.clear()
        thread = threading.Thread(target=runner)
        thread.start()
        time.sleep(0.002)
        qid = put(queue, b"Subject: x\r\n\r\nx\r\n", f"user{i}@example.net")
        time.sleep(0.002)
        stop.set()
        thread.join(5)
        assert look["change"] != queue.changed() or qid in look["due"], f"round {i}: a change slept through"
    queue.close()


def test_a_message_survives_reopening_with_its_envelope_and_states(data_dir):
    env = QueueEnvelope(sender="", recipients=(QueuedRecipient("b@remote.test", orcpt="rfc822;b@alias.test",
                                                                notify=("SUCCESS", "DELAY")),
                                                QueuedRecipient("c@remote.test", notify=("NEVER",))),
                        envid="xyz", ret="HDRS", eight_bit=True, origin="dsn", user="alice@example.test")
    with open_queue(data_dir) as queue:
        with queue.begin(env) as entry:
            entry.write(b"Subject: x\r\n\r\nbody\r\n")
            qid = entry.commit()
        queue.record(qid, [Result("b@remote.test", DEFERRED, "451 4.4.1 no answer", "mx.remote.test", 2e9)])
        queue.mark_delay_warned(qid)
    with open_queue(data_dir) as queue:
        message = queue.get(qid)
        assert message.envelope == env
        assert message.delay_warned and not message.held
        b, c = message.recipients
        assert (b.state, b.attempts, b.next_attempt, b.last_reply, b.remote_mta) == \
            (DEFERRED, 1, 2e9, "451 4.4.1 no answer", "mx.remote.test")
        assert (b.orcpt, b.notify) == ("rfc822;b@alias.test", ("SUCCESS", "DELAY"))
        assert (c.state, c.attempts, c.notify) == (QUEUED, 0, ("NEVER",))
        assert queue.read(qid) == b"Subject: x\r\n\r\nbody\r\n"
        assert queue.recovered == ([], [])


def test_an_aborted_or_unfinished_enqueue_leaves_nothing(data_dir):
    with open_queue(data_dir) as queue:
        with queue.begin(envelope("b@remote.test")) as entry:
            entry.write(b"x" * 200_000)  # past the in-memory part: a file exists now
            assert spool_files(data_dir) == {entry.id}
            entry.abort()
        with queue.begin(envelope("b@remote.test")) as entry:
            entry.write(b"y" * 200_000)
        # left without commit: close() discards it
        assert spool_files(data_dir) == set()
        assert queue.list() == []
        with pytest.raises(StoreError):
            entry.write(b"more")


def test_ids_are_unique_and_sort_by_creation(data_dir):
    with open_queue(data_dir) as queue:
        ids = [put(queue, b"m\r\n", "b@remote.test") for _ in range(50)]
        assert ids == sorted(ids) and len(set(ids)) == 50
        assert [m.id for m in queue.list()] == ids
        assert all(abs(created_of(qid) - queue.get(qid).created) < 1 for qid in ids)


def test_bad_envelopes_and_results_are_refused(data_dir):
    with open_queue(data_dir) as queue:
        with pytest.raises(ValueError):
            queue.begin(envelope())
        with pytest.raises(ValueError):
            queue.begin(QueueEnvelope("a@x.test", (QueuedRecipient("b@y.test", notify=("NEVER", "SUCCESS")),)))
        with pytest.raises(ValueError):
            queue.begin(envelope("b@y.test", ret="ALL"))
        qid = put(queue, b"m\r\n", "b@remote.test")
        with pytest.raises(ValueError):
            queue.record(qid, [Result("b@remote.test", DEFERRED, "451 later")])  # when next?
        with pytest.raises(ValueError):
            queue.record(qid, [Result("b@remote.test", QUEUED, "?")])
        assert queue.get(qid).recipients[0].attempts == 0


# -- recording outcomes, finishing, due order, hold --------------------------------------------


def test_record_keeps_each_recipient_and_removes_a_finished_message(data_dir):
    with open_queue(data_dir) as queue:
        qid = put(queue, b"Subject: t\r\n\r\nhi\r\n", "b@r.test", "c@r.test", "d@r.test", "b@r.test")
        assert [r.address for r in queue.get(qid).recipients] == ["b@r.test", "c@r.test", "d@r.test"]
        later = time.time() + 600
        after = queue.record(qid, [Result("b@r.test", DELIVERED, "250 2.0.0 ok", "mx1.r.test"),
                                   Result("c@r.test", DEFERRED, "421 4.7.0 busy", "mx1.r.test", later),
                                   Result("nobody@r.test", BOUNCED, "550 not ours")])
        states = {r.address: (r.state, r.attempts) for r in after.recipients}
        assert states == {"b@r.test": (DELIVERED, 1), "c@r.test": (DEFERRED, 1), "d@r.test": (QUEUED, 0)}
        # A final recipient stays final: a late result for it changes nothing.
        after = queue.record(qid, [Result("b@r.test", BOUNCED, "550 late")])
        assert after.recipients[0].state == DELIVERED and after.recipients[0].attempts == 1
        after = queue.record(qid, [Result("d@r.test", BOUNCED, "550 5.1.1 no such user", "mx1.r.test")])
        assert [r.address for r in after.pending] == ["c@r.test"]
        assert spool_files(data_dir) == {qid}
        assert queue.record(qid, [Result("c@r.test", DELIVERED, "250 ok", "mx2.r.test")]) is None
        assert queue.get(qid) is None and queue.list() == [] and spool_files(data_dir) == set()
        assert queue.record(qid, [Result("c@r.test", DELIVERED, "250 ok")]) is None  # gone: nothing to do
        with pytest.raises(NotQueuedError):
            queue.read(qid)


def test_due_is_in_order_of_next_attempt_and_leaves_held_messages_out(data_dir):
    with open_queue(data_dir) as queue:
        now = time.time()
        first, second, third, held = (put(queue, f"m{i}\r\n".encode(), f"r{i}@remote.test") for i in range(4))
        # second is due first (its next attempt is the earliest), then first; third later.
        queue.record(first, [Result("r0@remote.test", DEFERRED, "451", None, now - 10)])
        queue.record(second, [Result("r1@remote.test", DEFERRED, "451", None, now - 20)])
        queue.record(third, [Result("r2@remote.test", DEFERRED, "451", None, now + 3600)])
        assert queue.hold(held)
        assert [m.id for m in queue.due(now, 10)] == [second, first]
        assert [m.id for m in queue.due(now, 1)] == [second]
        assert [m.id for m in queue.due(now, 1, exclude={second})] == [first]  # the runner's in flight
        assert [m.id for m in queue.due(now + 3600, 10)] == [second, first, third]
        assert abs(queue.next_due() - (now - 20)) < 0.01
        assert queue.get(held).held
        # Release: due at once. Flush: the rest too.
        assert queue.release(held)
        assert held in [m.id for m in queue.due(time.time(), 10)]
        assert queue.flush() == 4
        # Each keeps an earlier next attempt; `held` became due at its release, third now.
        assert [m.id for m in queue.due(time.time(), 10)] == [second, first, held, third]
        assert queue.hold(third)
        assert queue.flush() == 3  # a held message stays held
        assert third not in [m.id for m in queue.due(time.time() + 7200, 10)]
        assert queue.flush(third) == 1 and queue.get(third).held
        assert not queue.hold("0" * 16) and not queue.release("0" * 16) and not queue.remove("0" * 16)
        assert queue.flush("NOT-AN-ID") == 0
        assert queue.remove(first)
        assert first not in spool_files(data_dir) and queue.get(first) is None
        assert first not in [m.id for m in queue.due(time.time() + 7200, 10)]


def test_a_change_by_another_process_moves_changed(data_dir):
    with open_queue(data_dir) as queue:
        put(queue, b"m\r\n", "b@remote.test")
        before = queue.changed()
        worker = start_worker(data_dir, "changes", "3")
        lines: list[str] = []
        reader = collect(worker, lines)
        assert worker.wait(60) == 0
        reader.join(10)
        assert lines == ["changed"] * 3
        assert queue.changed() >= before + 6  # a hold and a release each, every time


# -- the runner lock ------------------------------------------------------------------------


def test_one_runner_per_data_dir_across_processes(data_dir):
    with open_queue(data_dir) as queue:
        lock = queue.runner_lock()
        assert lock.acquire() and lock.held
        assert not queue.runner_lock().acquire()  # another open file, in this process: refused too
        first = start_worker(data_dir, "runner", stdin=subprocess.PIPE)
        assert read_line(first) == "refused"
        first.stdin.close()
        first.wait(30)
        assert queue.runner_lock().holder() == os.getpid()
        lock.release()
        # Now a child takes it; while it lives nobody else can; killed, it lets go.
        holder = start_worker(data_dir, "runner", stdin=subprocess.PIPE)
        assert read_line(holder) == "acquired"
        try:
            other = start_worker(data_dir, "runner", stdin=subprocess.PIPE)
            assert read_line(other) == "refused"
            other.stdin.close()
            other.wait(30)
            assert not lock.acquire()
            assert queue.runner_lock().holder() == holder.pid
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(30)
        assert lock.acquire()
        lock.release()


# -- crashes ----------------------------------------------------------------------------------


def check_consistent(data_dir: Path, round_number: int) -> Queue:
    """Open the queue (which recovers) and prove nothing half is left: every record has its
    file and every file its record. The caller closes the queue."""
    queue = open_queue(data_dir)
    ids = {m.id for m in queue.list()}
    files = spool_files(data_dir)
    assert files == ids, \
        f"round {round_number}: files without records {files - ids}, records without files {ids - files}"
    assert queue.recovered[1] == [], f"round {round_number}: records lost their file: {queue.recovered[1]}"
    return queue


def test_sigkill_mid_enqueue_loses_nothing_acknowledged_and_leaves_nothing(data_dir):
    from queue_worker import message, prepend

    rng = random.Random(20261130)
    acknowledged: dict[str, int] = {}
    orphans_removed = 0
    next_seq = 1
    for round_number in range(ENQUEUE_ROUNDS):
        lines: list[str] = []
        worker = start_worker(data_dir, "enqueue", str(next_seq))
        reader = collect(worker, lines)
        time.sleep(rng.uniform(0.4, 1.0))  # the first ~0.3 s is interpreter start-up
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        reader.join(10)
        for line in lines:
            if line.startswith("queued "):
                _, seq, qid = line.split()
                acknowledged[qid] = int(seq)
        next_seq += 100_000
        queue = check_consistent(data_dir, round_number)
        try:
            orphans_removed += len(queue.recovered[0])
            for qid, seq in acknowledged.items():
                assert queue.read(qid) == prepend(seq) + message(seq), f"round {round_number}: {qid} (message {seq})"
                assert queue.get(qid).envelope.envid == f"E{seq}"
        finally:
            queue.close()
    assert len(acknowledged) > 5 * ENQUEUE_ROUNDS, "the worker barely ran: the test proves little"
    assert orphans_removed > 0, "no kill ever landed mid-enqueue: the test proves little"


@pytest.mark.long
def test_sigkill_mid_record_leaves_each_message_whole(data_dir):
    """Every recorded outcome is still there after the kill, and a message whose last
    recipient was recorded is gone with its file: nothing is attempted again that the
    runner had recorded as final."""
    from queue_worker import envelope

    with open_queue(data_dir) as queue:
        ids = {}
        for seq in range(1, 1501):
            with queue.begin(envelope(seq)) as entry:
                entry.write(f"X-Seq: {seq}\r\n\r\nbody\r\n".encode())
                ids[entry.commit()] = seq
    rng = random.Random(7)
    final: dict[tuple[str, str], str] = {}
    finished: set[str] = set()
    for round_number in range(RECORD_ROUNDS):
        lines: list[str] = []
        worker = start_worker(data_dir, "record")
        # the kill is timed from the queue's open, not the fork: on a loaded machine the
        # start alone can outlast the whole interval and the round records nothing
        assert read_line(worker) == "ready"
        reader = collect(worker, lines)
        time.sleep(rng.uniform(0.4, 0.9))
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        reader.join(10)
        for line in lines:
            words = line.split()
            if words[0] == "recorded" and words[3] in (DELIVERED, BOUNCED):
                final[(words[1], words[2])] = words[3]
            elif words[0] == "finished":
                finished.add(words[1])
        queue = check_consistent(data_dir, round_number)
        try:
            for qid in finished:
                assert queue.get(qid) is None, f"round {round_number}: {qid} finished but still queued"
            for (qid, address), state in final.items():
                message = queue.get(qid)
                if message is not None:
                    (recipient,) = [r for r in message.recipients if r.address == address]
                    assert recipient.state == state, f"round {round_number}: {qid} {address}"
            for message in queue.list():  # the untouched or half-done ones are intact
                assert message.envelope == envelope(ids[message.id])
        finally:
            queue.close()
    assert len(finished) > 20, "the worker barely ran: the test proves little"


def test_a_live_enqueue_in_another_process_survives_recovery(data_dir):
    """The CLI opens the queue (and recovers) while mtad is halfway through a message: the
    half-written file is locked, so it is left alone, and its commit then succeeds."""
    from queue_worker import message, prepend

    worker = start_worker(data_dir, "hold-open", "120", stdin=subprocess.PIPE)
    try:
        word, qid = read_line(worker).split()
        assert word == "writing" and qid in spool_files(data_dir)
        with open_queue(data_dir) as queue:
            assert queue.recovered == ([], [])
            assert qid in spool_files(data_dir)
            worker.stdin.write("go\n")
            worker.stdin.flush()
            assert read_line(worker) == f"queued 120 {qid}"
            assert queue.read(qid) == prepend(120) + message(120)
    finally:
        worker.kill()
        worker.wait(30)


def test_a_crash_between_file_and_commit_leaves_an_orphan_that_the_next_open_removes(data_dir):
    worker = start_worker(data_dir, "hold-open", "121", stdin=subprocess.PIPE)
    word, qid = read_line(worker).split()
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    assert spool_files(data_dir) == {qid}
    with open_queue(data_dir) as queue:
        assert queue.recovered == ([qid], [])
        assert spool_files(data_dir) == set() and queue.list() == []


def test_a_record_whose_file_is_gone_is_reported_and_dropped(data_dir, caplog):
    with open_queue(data_dir) as queue:
        kept = put(queue, b"kept\r\n", "b@remote.test")
        lost = put(queue, b"lost\r\n", "c@remote.test", "d@remote.test")
    (data_dir / "queue" / "msg" / lost).unlink()
    with caplog.at_level("ERROR", logger="storage.queue"), open_queue(data_dir) as queue:
        assert queue.recovered == ([], [lost])
        assert [m.id for m in queue.list()] == [kept]
        assert queue.due(time.time(), 10)[0].id == kept
    (record,) = [r for r in caplog.records if r.getMessage() == "queue_file_missing"]
    assert record.fields["qid"] == lost and record.fields["recipients"] == "c@remote.test,d@remote.test"


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(data_dir):
    assert os.geteuid() == 0, "mounting the test's tmpfs needs root (make test runs as root)"
    data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0750", "tmpfs", str(data_dir)], check=True)
    yield data_dir
    subprocess.run(["umount", "-l", str(data_dir)], check=True)


def test_a_full_disk_is_disk_full_error_and_leaves_nothing(small_disk):
    """SMTP answers DiskFullError with 452 4.3.1: nothing may stay of the refused message,
    whether the space ran out in write() (a big one) or in commit() (a small one, kept in
    memory until then); and once space is back, the queue works."""
    with open_queue(small_disk) as queue:
        kept = put(queue, b"Subject: before\r\n\r\nbody\r\n", "b@remote.test")
        filler = fill(small_disk)
        with queue.begin(envelope("b@remote.test")) as entry:
            with pytest.raises(DiskFullError):
                for _ in range(100):
                    entry.write(b"x" * 65536)
        with queue.begin(envelope("b@remote.test")) as entry:
            entry.write(b"y" * 60_000)
            with pytest.raises(DiskFullError):
                entry.commit()
        assert spool_files(small_disk) == {kept}
        assert [m.id for m in queue.list()] == [kept]
        filler.unlink()
        again = put(queue, b"Subject: after\r\n\r\nbody\r\n", "b@remote.test")
        assert queue.read(again) == b"Subject: after\r\n\r\nbody\r\n"
        assert spool_files(small_disk) == {kept, again}
