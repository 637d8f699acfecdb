"""Crash safety and concurrency of the store, with real processes.

The crash test kills a delivering (and moving) child with SIGKILL at random moments, round
after round on the same data dir, and proves after each round: every delivery the child saw
return is in the store exactly once (in INBOX or, once moved, in Archive), with its exact
bytes; no UID was ever handed out twice; and once the store is opened again (which finishes
what the crash left, storage/settle.py) `store check` finds nothing at all: no file in tmp/,
no file in cur/ the index does not know, no writer directory of a dead process.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import scale
from power_cut import power_cut
from storage import open_data_dir
from storage.check import check
from storage.store import Store

WORKER = Path(__file__).with_name("store_worker.py")
ACCOUNT = "alice@example.test"
SHARDS = 2
ROUNDS = scale.count(10, 25)  # rounds of a delivering child killed at random: `make test-long` runs 25
MACHINE_ROUNDS = scale.count(4, 8)  # the same, each kill a crash of the machine too
STREAM_ROUNDS = scale.count(4, 8)  # the same, with streamed deliveries


def start_worker(data_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(data_dir), str(SHARDS), *args],
                            stdout=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def read() -> None:
        for line in process.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def stored_sequences(store: Store) -> dict[int, list[tuple[str, int]]]:
    """X-Seq -> where it is stored (mailbox, UID), checking each file's bytes and size."""
    from store_worker import message

    found: dict[int, list[tuple[str, int]]] = {}
    for mailbox in ("INBOX", "Archive"):
        for info in store.fetch(ACCOUNT, mailbox, [(1, 2**32 - 1)]):
            raw = store.read_message(info)
            seq = int(re.search(rb"X-Seq: (\d+)", raw).group(1))
            assert raw == message(seq), f"UID {info.uid} in {mailbox} is not message {seq} byte for byte"
            assert len(raw) == info.size
            found.setdefault(seq, []).append((mailbox, info.uid))
    return found


@pytest.mark.long
def test_sigkill_at_random_moments_loses_nothing_acknowledged(data_dir):
    sigkill_rounds(data_dir, "deliver", ROUNDS)


@pytest.mark.long
def test_sigkill_while_messages_stream_in_loses_nothing_and_leaves_nothing(data_dir):
    """The same with streamed deliveries (storage/delivery.py), some aborted: a kill between
    a message's first chunk and its commit leaves a file recovery discards, nothing else."""
    sigkill_rounds(data_dir, "stream", STREAM_ROUNDS)


@pytest.mark.long
def test_a_machine_crash_loses_nothing_acknowledged(data_dir):
    """The same, but each kill also loses what only a flush would have kept, as a crash of
    the machine would: every journaled message's file (storage/journal.py) is deleted,
    emptied, cut short or zeroed. The index's journal has their bytes: nothing is lost."""
    damaged = sigkill_rounds(data_dir, "deliver", MACHINE_ROUNDS, lose_unflushed=True)
    assert damaged > MACHINE_ROUNDS, f"only {damaged} journaled files to damage: the test proves little"


def wait_for_deliveries(lines: list[str], count: int) -> None:
    deadline = time.monotonic() + 30
    while sum(line.startswith("delivered ") for line in list(lines)) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def sigkill_rounds(data_dir: Path, mode: str, rounds: int, *, lose_unflushed: bool = False) -> int:
    rng = random.Random(20261123)
    damaged = 0
    acknowledged: set[int] = set()
    uids_handed_out: dict[int, set[int]] = {}
    next_seq = 1
    for round_number in range(rounds):
        lines: list[str] = []
        worker = start_worker(data_dir, mode, str(next_seq))
        reader = collect(worker, lines)
        if lose_unflushed:
            # Killed soon after its first deliveries, before its first checkpoint (a second
            # after them) has flushed them, however slowly a loaded machine starts it.
            wait_for_deliveries(lines, 12)
            time.sleep(rng.uniform(0.0, 0.4))
        elif round_number % 4 == 0:
            time.sleep(rng.uniform(0.0, 0.5))  # maybe in its start-up, or its recovery
        else:
            # Killed among its deliveries, however slowly a loaded machine starts it (the
            # first ~0.25 s is interpreter start-up, far longer beside other suites).
            wait_for_deliveries(lines, 1)
            time.sleep(rng.uniform(0.0, 0.7))
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        reader.join(10)
        delivered = [line.split() for line in lines if line.startswith("delivered ")]
        for _, seq, uidvalidity, uid in delivered:
            uids = uids_handed_out.setdefault(int(uidvalidity), set())
            assert int(uid) not in uids, f"round {round_number}: UID {uid} handed out twice"
            uids.add(int(uid))
            acknowledged.add(int(seq))
        next_seq += 100_000  # sequence numbers of different rounds never collide
        if lose_unflushed:
            damaged += power_cut(data_dir)

        with Store(open_data_dir(data_dir, SHARDS)) as store:
            problems = check(store, ACCOUNT)
            assert problems == [], f"round {round_number}: " + "; ".join(map(str, problems))
            shard = store.shard(ACCOUNT)
            leftovers = [p.name for p in shard.tmp_root.iterdir()] if shard.tmp_root.exists() else []
            assert leftovers == [], f"round {round_number}: dead writers' files left: {leftovers}"
            for mailbox in store.mailboxes(ACCOUNT):
                _, uids, _ = store.uids(ACCOUNT, mailbox.name)
                names = list((shard.mailbox_dir(ACCOUNT, mailbox.id) / "cur").iterdir())
                assert sorted(int(n.name.split(",U=")[1].split(",")[0]) for n in names) == uids
                assert all(uid < mailbox.uidnext for uid in uids)
            found = stored_sequences(store)
            for seq in acknowledged:
                assert len(found.get(seq, [])) == 1, f"round {round_number}: message {seq} stored {found.get(seq)}"
            for seq, places in found.items():
                assert len(places) == 1, f"message {seq} is stored {len(places)} times: {places}"
            usage = store.usage(ACCOUNT)
            assert usage.messages == len(found)
    assert len(acknowledged) > 8 * rounds, "the worker barely ran: the test proves little"
    return damaged


def test_delivering_while_another_process_flags(data_dir):
    """mtad and imapd are separate processes on one shard: writes interleave, nothing is lost."""
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.ensure_account(ACCOUNT)
    flagger_lines: list[str] = []
    flagger = start_worker(data_dir, "flags")
    flag_reader = collect(flagger, flagger_lines)
    try:
        from store_worker import message

        with Store(open_data_dir(data_dir, SHARDS)) as store:
            for seq in range(1, 301):
                store.deliver([ACCOUNT], message(seq))
                if seq % 50 == 0:  # reading while the other process writes
                    states = store.flags(ACCOUNT, "INBOX")
                    assert [s.uid for s in states] == list(range(1, len(states) + 1))
            deadline = time.monotonic() + 10
            while len(flagger_lines) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        flagger.send_signal(signal.SIGTERM)
        flagger.wait(30)
        flag_reader.join(10)
    assert len(flagger_lines) >= 5, "the flagging process made no progress beside the deliveries"
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        mailbox, uids, _ = store.uids(ACCOUNT, "INBOX")
        assert uids == list(range(1, 301))
        assert mailbox.exists == 300
        assert sorted(stored_sequences(store)) == list(range(1, 301))
        check(store, ACCOUNT, repair=True)  # the SIGTERM may leave a stale flag suffix
        assert check(store, ACCOUNT) == []


def test_another_process_learns_of_changes_within_a_second(data_dir):
    """imapd (here: a Watcher) hears of mtad's deliveries (here: another process) and of
    flag changes and expunges, within one second, without touching message files."""
    import queue

    from storage.watch import Watcher

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.ensure_account(ACCOUNT)
        watcher = Watcher(store, interval=0.25)
        events: queue.Queue = queue.Queue()
        watcher.watch(ACCOUNT, "INBOX", lambda state: events.put((time.monotonic(), state)))
        try:
            changes = [
                "store.deliver([ACCOUNT], message(1))",
                "store.store_flags(ACCOUNT, 'INBOX', [(1, 1)], 'add', ['\\\\Seen'])",
                "store.store_flags(ACCOUNT, 'INBOX', [(1, 1)], 'add', ['\\\\Deleted'])\n"
                "store.expunge(ACCOUNT, 'INBOX')",
            ]
            seen = []
            for change, expected in zip(changes, [(1, 1), (1, 0), (0, 0)], strict=True):
                script = (f"import sys; sys.path[:0] = [{str(WORKER.parent)!r}, {str(WORKER.parent.parent)!r}]\n"
                          "from store_worker import message, ACCOUNT\nfrom storage import open_data_dir\n"
                          "from storage.store import Store\n"
                          f"store = Store(open_data_dir({str(data_dir)!r}, {SHARDS}))\n{change}\nstore.close()\n")
                subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
                done = time.monotonic()
                # The last change is two commits: the watcher may report the first alone,
                # then the second at its next poll.
                heard_at, state = events.get(timeout=5)
                while (state.exists, state.unseen) != expected:
                    heard_at, state = events.get(timeout=5)
                assert heard_at - done < 1.0, f"{change}: heard after {heard_at - done:.2f}s"
                seen.append((state.exists, state.unseen))
            assert seen == [(1, 1), (1, 0), (0, 0)]
        finally:
            watcher.close()
