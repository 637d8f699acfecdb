"""The journal (storage/journal.py) under hostile conditions, with real processes.

A power cut is simulated as in tests/test_store_crash.py: the writing process is killed
with SIGKILL, then every file the `journal` database names is damaged (deleted, emptied,
cut short or zeroed), as a crash of the machine could leave files written without a flush.
Every acknowledged message must then be there once, byte for byte, with its internal date
as its file's mtime, and `store check` must be clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crashload
import scale
from diskfill import fill
from power_cut import journal_bases, power_cut
from storage import open_data_dir
from storage.check import check
from storage.store import Store

ACCOUNT = "alice@example.test"
SHARDS = 2
ROOT = Path(__file__).resolve().parent.parent

MESSAGE = """
def message(seq, size=0):
    head = (f"From: bob@example.org\\r\\nTo: alice@example.test\\r\\nSubject: seq {seq}\\r\\n"
            f"X-Seq: {seq}\\r\\nMessage-ID: <{seq}@example.org>\\r\\n\\r\\n").encode()
    if not size:
        return head + f"message number {seq} ".encode() * (1 + seq % 50) + b"\\r\\n"
    raw = head + (b"x" * 78 + b"\\r\\n") * ((size - len(head)) // 80)
    return raw + b"y" * (size - len(raw) - 2) + b"\\r\\n"
"""
_scope: dict = {}
exec(MESSAGE, _scope)  # noqa: S102 - the same messages here and in the children
message = _scope["message"]

PRELUDE = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import storage.shard
storage.shard.CHECKPOINT_INTERVAL = float(os.environ.get("CHECKPOINT_INTERVAL", "3600"))
from storage import open_data_dir
from storage.store import Store
ACCOUNT = {ACCOUNT!r}
{MESSAGE}
def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
"""


def child(data_dir: Path, code: str, *args: str, **env: str) -> subprocess.Popen:
    script = PRELUDE + f"store = Store(open_data_dir({str(data_dir)!r}, {SHARDS}))\n" + code
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def ready_child(data_dir: Path, code: str) -> subprocess.Popen:
    """A child running `code` on its own store, once it has said "ready"; it reads lines
    from its stdin (a "go", say)."""
    process = subprocess.Popen([sys.executable, "-c", PRELUDE + f"store = Store(open_data_dir({str(data_dir)!r}, "
                                f"{SHARDS}))\n" + code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    run_until(process, "ready")
    return process


def go_and_die(writer: subprocess.Popen) -> None:
    """Tell a ready_child to go on, and wait for it to kill itself where its code says."""
    writer.stdin.write("go\n")
    writer.stdin.flush()
    assert writer.wait(60) == 9


def run_until(process: subprocess.Popen, marker: str, timeout: float = 60) -> list[str]:
    """The child's lines up to `marker` (which it prints once its work is done)."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line.strip())
        if line.strip() == marker:
            return lines
        assert time.monotonic() < deadline, "the child took too long"
    raise AssertionError(f"the child ended before {marker!r}: {lines}, exit {process.wait(10)}")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def verify(data_dir: Path, expected: dict[str, dict[int, bytes]]) -> None:
    """Each mailbox holds exactly the messages expected ({mailbox: {X-Seq: bytes}}), byte for
    byte, each file's mtime its internal date; store check clean."""
    import re

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert check(store, ACCOUNT) == []
        shard = store.shard(ACCOUNT)
        for mailbox, wanted in expected.items():
            found: dict[int, bytes] = {}
            box = next(m for m in store.mailboxes(ACCOUNT) if m.name == mailbox)
            for info in store.fetch(ACCOUNT, mailbox, [(1, 2**32 - 1)]):
                raw = store.read_message(info)
                seq = int(re.search(rb"X-Seq: (\d+)", raw).group(1))
                assert seq not in found, f"{mailbox}: message {seq} stored twice"
                found[seq] = raw
                [path] = (shard.mailbox_dir(ACCOUNT, box.id) / "cur").glob(f"{info.base},*")
                assert int(path.stat().st_mtime) == int(info.internal_date), f"{mailbox} {seq}: mtime"
            assert sorted(found) == sorted(wanted), f"{mailbox}: {sorted(found)} != {sorted(wanted)}"
            for seq, raw in wanted.items():
                assert found[seq] == raw, f"{mailbox}: message {seq} differs"


def test_processes_starting_together_restore_the_journal_once(data_dir):
    """After a power cut, `postroom serve` starts mtad, imapd and pop3d at once, and each
    opens every shard: their restores must not trip over each other's files."""
    writer = child(data_dir, "for seq in range(1, 401):\n"
                             "    store.deliver([ACCOUNT], message(seq))\n"
                             "say('ready')\ntime.sleep(600)\n")
    run_until(writer, "ready")
    kill(writer)
    assert power_cut(data_dir) == 400
    go = data_dir / "go"
    opener = ("while not os.path.exists(sys.argv[1]):\n    time.sleep(0.001)\n"
              "store2 = Store(open_data_dir(os.path.dirname(sys.argv[1]), 2))\nstore2.recover()\n"
              "store2.close()\nsay('opened')\n")
    # The opener opens the store itself only after `go`: the Store of the prelude is lazy.
    openers = [subprocess.Popen([sys.executable, "-c", PRELUDE + opener, str(go)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(1.0)  # their interpreters started
    go.touch()
    results = [(p.wait(60), p.stdout.read(), p.stderr.read()) for p in openers]
    for status, _, stderr in results:
        assert status == 0, stderr[-2000:]
    go.unlink()
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 401)}})


MIXED = """
store.ensure_account(ACCOUNT)
for seq in range(1, 41):
    store.deliver([ACCOUNT], message(seq))
store.copy(ACCOUNT, "INBOX", [(1, 10)], "Archive")
store.move(ACCOUNT, "INBOX", [(11, 20)], "Archive")
store.copy(ACCOUNT, "Archive", [(1, 3)], "Archive")  # a copy of a copy, in its own mailbox
store.store_flags(ACCOUNT, "INBOX", [(21, 25)], "add", ["\\\\Seen"])
store.store_flags(ACCOUNT, "INBOX", [(26, 28)], "add", ["\\\\Deleted"])
store.expunge(ACCOUNT, "INBOX")
store.create_mailbox(ACCOUNT, "Tmp")
for seq in range(41, 46):
    store.deliver([(ACCOUNT, "Tmp")], message(seq))
store.delete_mailbox(ACCOUNT, "Tmp")
store.create_mailbox(ACCOUNT, "Old")
for seq in range(46, 51):
    store.deliver([(ACCOUNT, "Old")], message(seq))
store.rename_mailbox(ACCOUNT, "Old", "New")
for seq in range(51, 56):
    store.append(ACCOUNT, "INBOX", message(seq), flags=["\\\\Flagged"], internal_date=1_000_000_000 + seq)
for seq, size in ((56, 65535), (57, 65536), (58, 65537)):
    store.deliver([ACCOUNT], message(seq, size))
store.move(ACCOUNT, "INBOX", [(30, 30)], "New")
say("ready")
time.sleep(600)
"""


def mixed_expected() -> dict[str, dict[int, bytes]]:
    sizes = {56: 65535, 57: 65536, 58: 65537}
    inbox = [*range(21, 26), *range(29, 41), *range(51, 59)]
    inbox.remove(30)
    archive = [*range(1, 21)]
    return {"INBOX": {s: message(s, sizes.get(s, 0)) for s in [*range(1, 11), *inbox]},
            "Archive": {s: message(s) for s in archive},
            "New": {s: message(s) for s in [*range(46, 51), 30]}}


def test_a_power_cut_after_copy_move_expunge_flags_and_mailbox_changes(data_dir):
    """Everything a client does to messages still in the journal, then a power cut."""
    writer = child(data_dir, MIXED)
    run_until(writer, "ready")
    kill(writer)
    assert power_cut(data_dir) > 50
    expected = mixed_expected()
    expected["Archive"].update({})  # the copies of 1-3 within Archive: checked by count below
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert check(store, ACCOUNT) == []
        archive = [store.read_message(i) for i in store.fetch(ACCOUNT, "Archive", [(1, 2**32 - 1)])]
        assert sorted(archive) == sorted([message(s) for s in range(1, 21)] + [message(s) for s in (1, 2, 3)])
        assert {m.name for m in store.mailboxes(ACCOUNT)} >= {"INBOX", "Archive", "New"}
        assert "Tmp" not in {m.name for m in store.mailboxes(ACCOUNT)}
        dates = {i.uid: i.internal_date for i in store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])}
        assert sorted(dates.values())[:5] == [1_000_000_000 + s for s in range(51, 56)]
    del expected["Archive"]
    verify(data_dir, expected)


CLOSE_ROUNDS = scale.count(5, 15)  # stores opened, filled and closed: `make test-long` makes 15
CLOSE_RACE = """
import threading
storage.shard.CHECKPOINT_INTERVAL = 0.005  # a checkpoint under way whenever close() comes
for round in range(int(sys.argv[2])):
    store = Store(open_data_dir(sys.argv[1], 2))
    def work(n):
        for i in range(60):
            store.deliver([ACCOUNT], message(1000 * round + 100 * n + i))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    store.close()
say("done")
"""


@pytest.mark.long
def test_closing_while_the_checkpointer_works_logs_no_error(data_dir):
    """Store.close() checkpoints what is left itself: a checkpoint it cut short is no
    `checkpoint_failed` (which docs/troubleshooting.md sends an admin after)."""
    process = subprocess.run([sys.executable, "-c", PRELUDE + CLOSE_RACE, str(data_dir), str(CLOSE_ROUNDS)],
                             capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "checkpoint_failed" not in process.stderr, process.stderr[-2000:]
    assert journal_bases(data_dir) == {p: [] for p in journal_bases(data_dir)}
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert check(store, ACCOUNT) == []
        assert store.uids(ACCOUNT, "INBOX")[0].exists == CLOSE_ROUNDS * 180


DELIVERER = """
import threading
start = int(sys.argv[1])
store.ensure_account(ACCOUNT)
def work(n):
    for seq in range(start + n * 10000, start + n * 10000 + 10000):
        size = (0, 65535, 65536, 65537, 100)[seq % 5] if seq % 3 == 0 else 0
        store.deliver([ACCOUNT], message(seq, size))
        say(f"delivered {seq} {size}")
threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
"""

MOVER = """
store.ensure_account(ACCOUNT)
if "Copies" not in [m.name for m in store.mailboxes(ACCOUNT)]:
    store.create_mailbox(ACCOUNT, "Copies")
while True:
    _, uids, _ = store.uids(ACCOUNT, "INBOX")
    if len(uids) > 3:
        store.move(ACCOUNT, "INBOX", [(uids[1], uids[1])], "Archive")
        store.copy(ACCOUNT, "INBOX", [(uids[2], uids[2])], "Copies")
        store.store_flags(ACCOUNT, "INBOX", [(uids[0], uids[-1])], "add", ["\\\\Seen"])
        import re
        [doomed] = store.fetch(ACCOUNT, "INBOX", [(uids[3], uids[3])])
        say("expunging " + re.search(rb"X-Seq: (\\d+)", store.read_message(doomed)).group(1).decode())
        store.store_flags(ACCOUNT, "INBOX", [(uids[3], uids[3])], "add", ["\\\\Deleted"])
        store.expunge(ACCOUNT, "INBOX", [(uids[3], uids[3])])
        say("moved")
    else:
        time.sleep(0.01)
"""


def stored(store: Store, mailbox: str) -> list[tuple[int, bytes]]:
    import re

    out = []
    shard = store.shard(ACCOUNT)
    box = next((m for m in store.mailboxes(ACCOUNT) if m.name == mailbox), None)
    if box is None:
        return out
    for info in store.fetch(ACCOUNT, mailbox, [(1, 2**32 - 1)]):
        raw = store.read_message(info)
        [path] = (shard.mailbox_dir(ACCOUNT, box.id) / "cur").glob(f"{info.base},*")
        assert int(path.stat().st_mtime) == int(info.internal_date), f"{mailbox} UID {info.uid}: mtime"
        out.append((int(re.search(rb"X-Seq: (\d+)", raw).group(1)), raw))
    return out


@pytest.mark.long
def test_a_power_cut_while_three_processes_write_one_shard(data_dir):
    """Two delivering processes (mtad's workers) and one moving, copying, flagging and
    expunging (imapd), killed at once at random moments; the files the journal names
    damaged; then the restoring process itself killed once, and the files damaged again."""
    import random

    rng = random.Random(17)
    acknowledged: dict[int, int] = {}
    expunged_any = 0
    expunging: set[int] = set()
    for round_number in range(scale.count(2, 4)):  # `make test-long` cuts the power four times
        start = 1 + round_number * 100_000
        writers = [child(data_dir, DELIVERER, str(start), CHECKPOINT_INTERVAL="0.3"),
                   child(data_dir, DELIVERER, str(start + 50_000), CHECKPOINT_INTERVAL="0.3"),
                   child(data_dir, MOVER, CHECKPOINT_INTERVAL="0.3")]
        # Counted, not timed: a loaded machine makes the writers slower, never the test weaker.
        early = [writers[0].stdout.readline().strip() for _ in range(40)]
        early_mover = [writers[2].stdout.readline().strip() for _ in range(2)]
        time.sleep(rng.uniform(0.2, 1.0))
        for writer in writers:
            writer.send_signal(signal.SIGKILL)
        outputs = []
        for writer in writers:
            writer.wait(30)
            outputs.append(writer.stdout.read().splitlines())
        outputs[0] += early
        outputs[2] += early_mover
        for line in outputs[0] + outputs[1]:
            if line.startswith("delivered "):
                _, seq, size = line.split()
                acknowledged[int(seq)] = int(size)
        expunged_any += sum(1 for line in outputs[2] if line == "moved")
        expunging |= {int(line.split()[1]) for line in outputs[2] if line.startswith("expunging ")}
        assert power_cut(data_dir) > 0
        restorer = subprocess.Popen([sys.executable, "-c", PRELUDE + f"Store(open_data_dir({str(data_dir)!r}, 2))"
                                     ".recover()\n"])
        time.sleep(rng.uniform(0.2, 0.6))
        restorer.send_signal(signal.SIGKILL)
        restorer.wait(30)
        power_cut(data_dir)
        with Store(open_data_dir(data_dir, SHARDS)) as store:
            assert check(store, ACCOUNT) == [], f"round {round_number}"
            inbox_archive = stored(store, "INBOX") + stored(store, "Archive")
            seqs = [seq for seq, _ in inbox_archive]
            assert len(seqs) == len(set(seqs)), f"round {round_number}: stored twice"
            for seq, raw in inbox_archive + stored(store, "Copies"):
                assert raw == message(seq, acknowledged.get(seq, 0)) or seq not in acknowledged, seq
            lost = set(acknowledged) - set(seqs) - expunging
            assert not lost, f"round {round_number}: lost {sorted(lost)[:10]}"
    assert len(acknowledged) > 100 and expunged_any >= 2, "the writers barely ran"



def _serve_with_senders(write_config, data_dir: Path, tmp_path: Path, clients: int):
    """tests/crashload.py's server (two SMTP workers) and `clients` senders, neither started:
    (config, outcome, server, senders)."""
    from conftest import free_port

    port = free_port()
    config = write_config(smtp={"listen": [f"127.0.0.1:{port}"], "max_connections_per_ip": 200, "workers": 2},
                          server={"log_level": "warning"})
    crashload.prepare(data_dir, config)
    outcome = crashload.Outcome()
    return config, outcome, crashload.Server(tmp_path), crashload.Senders("127.0.0.1", port, clients, 10**9, outcome)


@pytest.mark.long
def test_a_power_cut_of_serve_with_two_smtp_workers(write_config, data_dir, tmp_path):
    """`postroom serve` with `[smtp] workers = 2`, its whole process group killed while
    twenty senders deliver, the journaled files damaged, and serve started again (its
    daemons all restore at once): nothing acknowledged is lost or stored twice, byte for
    byte as sent (behind the trace headers), and `store check` is clean."""
    import random
    import re

    config, outcome, server, senders = _serve_with_senders(write_config, data_dir, tmp_path, 20)
    cuts = scale.count(2, 4)  # `make test-long` cuts the power four times
    rng = random.Random(1717)
    damaged = 0
    server.start(config)
    senders.start()
    try:
        for _ in range(cuts):
            time.sleep(rng.uniform(1.0, 2.0))
            assert server.stop("group") == []
            damaged += power_cut(data_dir)
            server.start(config)
            assert "Traceback" not in server.log_tail(), server.log_tail()
        senders.finish(30)
    finally:
        server.stop("term")
    assert damaged > 5 * cuts, f"only {damaged} journaled files damaged: the test proves little"
    assert len(senders.acknowledged) > 25 * cuts, "the senders barely got through"
    with Store(open_data_dir(data_dir, 4)) as store:
        assert [str(p) for p in check(store)] == []
        copies: dict[tuple[str, int], int] = {}
        for user in crashload.USERS:
            for info in store.fetch(user, "INBOX", [(1, 2**32 - 1)]):
                raw = store.read_message(info)
                seq = int(re.search(rb"\r\nX-Seq: (\d+)\r\n", raw).group(1))
                assert raw.endswith(crashload.message(seq)[0]), f"{user} message {seq} differs from what was sent"
                copies[(user, seq)] = copies.get((user, seq), 0) + 1
    for seq in senders.acknowledged:
        for user in crashload.message(seq)[1]:
            assert copies.get((user, seq)) == 1, f"{user} message {seq}: {copies.get((user, seq), 0)} copies"


def test_a_full_disk_while_the_journal_is_restored(data_dir):
    """After a power cut the disk is full: opening the store fails (DiskFullError), leaves
    nothing half-written, and once there is room again every file is restored."""
    assert os.geteuid() == 0, "mounting the test's tmpfs needs root (make test runs as root)"
    data_dir.mkdir(parents=True)
    # 32 MiB: 12 MB of mail (half of it also in the journal) and up to a second of it in the
    # write-ahead log (storage/wal.py) besides.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0750", "tmpfs", str(data_dir)], check=True)
    try:
        writer = child(data_dir, "for seq in range(1, 201):\n"
                                 "    store.deliver([ACCOUNT], message(seq, 60000 if seq % 2 else 0))\n"
                                 "say('ready')\ntime.sleep(600)\n")
        run_until(writer, "ready")
        kill(writer)
        for shard_dir, bases in journal_bases(data_dir).items():
            for base in bases:
                for path in shard_dir.glob(f"*/*/cur/{base},*"):
                    path.unlink()
        # What the dead writer left but the journal is settled first, so that the restore
        # is what meets the full disk.
        subprocess.run([sys.executable, "-c", PRELUDE + "import storage.journal\n"
                        "storage.journal.restore = lambda shard: None\n"
                        f"Store(open_data_dir({str(data_dir)!r}, 2)).recover()\n"], check=True, timeout=120)
        assert sum(map(len, journal_bases(data_dir).values())) == 200
        filler = fill(data_dir)
        opener = subprocess.run([sys.executable, "-c", PRELUDE + "from storage.errors import DiskFullError\n"
                                 f"try:\n    Store(open_data_dir({str(data_dir)!r}, 2)).recover()\n"
                                 "except DiskFullError:\n    say('disk full')\n"],
                                capture_output=True, text=True, timeout=120)
        assert opener.stdout.strip() == "disk full", opener.stderr[-2000:]
        leftovers = [p for p in data_dir.glob("shards/*/*/*/tmp/*")]
        assert leftovers == [], f"half-written files left: {leftovers[:3]}"
        filler.unlink()
        verify(data_dir, {"INBOX": {seq: message(seq, 60000 if seq % 2 else 0) for seq in range(1, 201)}})
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=True)


FULL_DISK_WRITER = """
store.ensure_account(ACCOUNT)
say("ready")
for seq in range(1, 51):
    store.deliver([ACCOUNT], message(seq))
say("delivered")
sys.stdin.readline()
store.close()
say("closed")
"""


def test_a_full_disk_under_the_checkpointer_is_one_log_line(data_dir, tmp_path):
    """The checkpoint's commit needs pages; with the disk full (and a reader, a backup's
    snapshot, keeping the freed ones) it fails at every turn, for as long as the disk is
    full: the keys wait, nothing is lost, and the log says so once, not once a turn."""
    assert os.geteuid() == 0, "mounting the test's tmpfs needs root (make test runs as root)"
    data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0750", "tmpfs", str(data_dir)], check=True)
    try:
        with Store(open_data_dir(data_dir, SHARDS)) as store:
            store.ensure_account(ACCOUNT)
            shard = store.shard(ACCOUNT)
            snapshot = shard.env.begin()  # from before the deliveries: no page they free is reused
            script = PRELUDE + f"store = Store(open_data_dir({str(data_dir)!r}, {SHARDS}))\n" + FULL_DISK_WRITER
            writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(tmp_path / "writer.err", "w"), text=True,  # noqa: SIM115
                                      env={**os.environ, "CHECKPOINT_INTERVAL": "0.5"})
            run_until(writer, "delivered")
            filler = fill(data_dir)
            time.sleep(4)  # some eight checkpoints, each followed by the idle work
            snapshot.abort()
            filler.unlink()
            time.sleep(1)
            writer.stdin.write("\n")
            writer.stdin.flush()
            run_until(writer, "closed")
            assert writer.wait(30) == 0
        log = (tmp_path / "writer.err").read_text()
        assert log.count("checkpoint_failed") == 1, log[-3000:]
        assert log.count("idle_work_failed") <= 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]  # a full disk is no bug
        assert sum(map(len, journal_bases(data_dir).values())) == 0
        verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 51)}})
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=True)


EXPUNGER = """
go = sys.argv[1]
store.ensure_account(ACCOUNT)
store.uids(ACCOUNT, "INBOX")  # the shard open: nothing of the dead writer's is this one's to restore
say("ready")
while not os.path.exists(go):
    time.sleep(0.001)
for uid in reversed(store.uids(ACCOUNT, "INBOX")[1]):  # against the order restore goes in
    store.store_flags(ACCOUNT, "INBOX", [(uid, uid)], "add", ["\\\\Deleted"])
    store.expunge(ACCOUNT, "INBOX", [(uid, uid)])
say("expunged")
"""


def test_a_restore_while_a_live_process_expunges(data_dir):
    """A process dies with journal entries (mtad's worker, say); imapd, alive, expunges
    those messages one by one while mtad's next worker opens the shard and restores the
    dead one's entries: a message expunged meanwhile must not come back as a file."""
    writer = child(data_dir, "for seq in range(1, 401):\n"
                             "    store.deliver([ACCOUNT], message(seq))\n"
                             "say('ready')\ntime.sleep(600)\n")
    run_until(writer, "ready")
    # Its checkpoints as they are (the keys of its expunges gone once flushed), but often.
    expunger = child(data_dir, EXPUNGER, str(data_dir / "go"), CHECKPOINT_INTERVAL="0.05")
    run_until(expunger, "ready")
    kill(writer)
    (data_dir / "go").touch()
    time.sleep(0.3)  # a fifth of the way
    opener = subprocess.run([sys.executable, "-c", PRELUDE + f"Store(open_data_dir({str(data_dir)!r}, 2)).recover()"],
                            capture_output=True, text=True, timeout=120)
    assert opener.returncode == 0, opener.stderr[-2000:]
    run_until(expunger, "expunged", timeout=120)
    time.sleep(0.5)  # its last checkpoint
    kill(expunger)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert [str(p) for p in check(store, ACCOUNT)] == []
        assert store.uids(ACCOUNT, "INBOX")[1] == []


def test_a_power_cut_that_kept_the_bytes_but_not_the_date(data_dir):
    """A file's data can reach the disk (a file system commit between the write and the
    utime) without the utime that follows it: the bytes are right, the mtime is the time
    of writing, not the internal date APPEND gave (which `store rebuild` reads back)."""
    writer = child(data_dir, "store.ensure_account(ACCOUNT)\n"
                             "for seq in range(1, 21):\n"
                             "    store.append(ACCOUNT, 'INBOX', message(seq), internal_date=1_000_000_000 + seq)\n"
                             "say('ready')\ntime.sleep(600)\n")
    run_until(writer, "ready")
    kill(writer)
    touched = 0
    for shard_dir, bases in journal_bases(data_dir).items():
        for base in bases:
            for path in shard_dir.glob(f"*/*/cur/{base},*"):
                os.utime(path)
                touched += 1
    assert touched == 20
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 21)}})


def test_store_check_and_backup_while_serve_delivers(write_config, data_dir, tmp_path):
    """`postroom store check` and `postroom backup` open the shards (and restore nothing of
    the live daemons') while twenty senders deliver: the check finds nothing, the backup's
    own check finds nothing, and the backup opened as a store holds what it says, byte for
    byte, with no journal entry left in it."""
    import re

    from conftest import POSTROOM

    config, outcome, server, senders = _serve_with_senders(write_config, data_dir, tmp_path, 10)
    server.start(config)
    senders.start()
    try:
        time.sleep(1.0)
        for _ in range(3):
            result = subprocess.run([POSTROOM, "--config", str(config), "store", "check"], capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 0 and result.stdout == "0 problem(s)\n", result.stdout + result.stderr
        backup = tmp_path / "backup"
        result = subprocess.run([POSTROOM, "--config", str(config), "backup", str(backup)], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        senders.finish(30)
    finally:
        server.stop("term")
    assert "Traceback" not in server.log_tail(), server.log_tail()
    assert len(senders.acknowledged) > 20, "the senders barely got through"
    assert sum(map(len, journal_bases(backup / "data").values())) == 0
    with Store(open_data_dir(backup / "data", 4)) as store:
        assert [str(p) for p in check(store)] == []
        for user in crashload.USERS:
            for info in store.fetch(user, "INBOX", [(1, 2**32 - 1)]):
                raw = store.read_message(info)
                seq = int(re.search(rb"\r\nX-Seq: (\d+)\r\n", raw).group(1))
                assert raw.endswith(crashload.message(seq)[0]), f"{user} message {seq} differs in the backup"


SIXTEEN = """
import threading
store = Store(open_data_dir(sys.argv[1], 16))
def work(n):
    for i in range(100000):
        seq = int(sys.argv[4]) + n * 100000 + i
        account = f"u{seq % 32}@example.test"
        store.deliver([account, f"u{(seq + 1) % 32}@example.test"], message(seq))
        say(f"delivered {seq}")
threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(4)]
[t.start() for t in threads]
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "close":
    store.close()
    say("closed")
else:
    time.sleep(600)
"""


def test_sixteen_shards_closed_and_cut_under_load(data_dir):
    """Sixteen shards, each with its checkpointer, under four delivering threads: closed
    while they deliver (no error, no journal entry left), then killed and the power cut."""
    import re

    acknowledged: set[int] = set()
    for how, first in (("close", 0), ("kill", 1_000_000)):
        process = subprocess.Popen([sys.executable, "-c", PRELUDE + SIXTEEN, str(data_dir), "2.5", how, str(first)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "CHECKPOINT_INTERVAL": "1.0"})
        if how == "kill":
            time.sleep(3.5)
            kill(process)
        out, err = process.communicate(timeout=120)
        acknowledged |= {int(line.split()[1]) for line in out.splitlines() if line.startswith("delivered ")}
        if how == "close":
            assert "closed" in out, err[-2000:]
            # (The delivering threads themselves end with "store is closed".)
            assert not re.findall(r"^\w+_failed", err, re.MULTILINE), err[-2000:]
            assert sum(map(len, journal_bases(data_dir).values())) == 0
        else:
            assert power_cut(data_dir) > 0
    assert len(acknowledged) > 100
    with Store(open_data_dir(data_dir, 16)) as store:
        assert [str(p) for p in check(store)] == []
        copies: dict[tuple[str, int], int] = {}
        for n in range(32):
            account = f"u{n}@example.test"
            for info in store.fetch(account, "INBOX", [(1, 2**32 - 1)]):
                raw = store.read_message(info)
                seq = int(re.search(rb"X-Seq: (\d+)", raw).group(1))
                assert raw == message(seq)
                copies[(account, seq)] = copies.get((account, seq), 0) + 1
    for seq in acknowledged:
        for account in (f"u{seq % 32}@example.test", f"u{(seq + 1) % 32}@example.test"):
            assert copies.get((account, seq)) == 1, f"{account} {seq}: {copies.get((account, seq))}"


CHECKPOINT_CUT = """
import msgspec
from storage import wal
from storage.shard import DATABASES
for seq in range(1, 41):
    store.deliver([ACCOUNT], message(seq))
for seq in range(41, 61):
    store.append(ACCOUNT, 'INBOX', message(seq))
shard = store.shard(ACCOUNT)
append, journal = shard.wal.append, DATABASES.index("journal")
def append_then_die(record, end):
    stop = append(record, end)
    changes = msgspec.msgpack.decode(record[wal.HEADER.size:])
    if any(changes[i] == journal and changes[i + 2] is None for i in range(0, len(changes), 3)):
        os._exit(9)  # the checkpoint's record is flushed; LMDB never commits it
    return stop
shard.wal.append = append_then_die
shard.checkpoint()
"""


def test_a_kill_between_a_checkpoints_log_flush_and_its_commit(data_dir):
    """The checkpoint's record deletes the journal entries of files its flush made durable;
    killed before LMDB commits it, LMDB still names them all. The next opening replays the
    record: a power cut then finds no journal entry to damage (CI once damaged files a
    flush had covered, reading LMDB alone), and nothing is lost."""
    writer = child(data_dir, CHECKPOINT_CUT)
    assert writer.wait(60) == 9
    [in_lmdb] = [n for n in _lmdb_journal_sizes(data_dir) if n]
    assert in_lmdb == 60
    assert power_cut(data_dir) == 0
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 61)}})
    assert journal_bases(data_dir) == {p: [] for p in journal_bases(data_dir)}


DELIVERY_CUT = """
import msgspec
from storage import wal
from storage.shard import DATABASES
for seq in range(1, 21):
    store.deliver([ACCOUNT], message(seq))
say("ready")
sys.stdin.readline()
shard = store.shard(ACCOUNT)
append, journal = shard.wal.append, DATABASES.index("journal")
def append_then_die(record, end):
    stop = append(record, end)
    changes = msgspec.msgpack.decode(record[wal.HEADER.size:])
    if any(changes[i] == journal and changes[i + 2] is not None for i in range(0, len(changes), 3)):
        os._exit(9)  # the delivery's record is flushed; its file not made, LMDB never commits
    return stop
shard.wal.append = append_then_die
store.deliver([ACCOUNT], message(21))
"""


def test_a_kill_between_a_deliverys_log_flush_and_its_file(data_dir):
    """A delivery's record is flushed to the log before LMDB commits it. Killed in
    between, its process leaves the record only: the next write transaction of a
    process that has the shard open already replays it and makes the file, so its readers
    never find the UID without it; then a power cut, and the next opening puts it back."""
    writer = ready_child(data_dir, DELIVERY_CUT)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert len(store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])) == 20
        go_and_die(writer)
        store.deliver([ACCOUNT], message(22))  # its transaction replays the record first
        infos = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
        assert [i.uid for i in infos] == list(range(1, 23))
        assert [store.read_message(i) for i in infos] == [message(seq) for seq in range(1, 23)]
        assert check(store, ACCOUNT) == []
    assert power_cut(data_dir) > 0
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 23)}})


FILE_CUT = """
for seq in range(1, 21):
    store.deliver([ACCOUNT], message(seq))
store.shard(ACCOUNT).checkpoint()  # the mailboxes' own records settled: check looks into them
say("ready")
sys.stdin.readline()
rename = os.rename
def die(source, target):
    if str(source).endswith(".placing"):
        os._exit(9)  # LMDB has the delivery's commit and its caller was told; its file is not made
    rename(source, target)
storage.shard.os.rename = die
store.deliver([ACCOUNT], message(21))
"""


def test_a_kill_between_a_deliverys_commit_and_its_file(data_dir):
    """A journaled message's file is made once LMDB has its commit, outside the writer lock.
    Killed in between, its process leaves the UID without its file: a reader already there
    takes the journal's copy (and `store check` calls it file-not-made, not file-missing:
    nothing is expunged for it); the next process to open the shard makes the file."""
    writer = ready_child(data_dir, FILE_CUT)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert len(store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])) == 20
        go_and_die(writer)
        infos = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
        assert [i.uid for i in infos] == list(range(1, 22))
        assert [store.read_message(i) for i in infos] == [message(seq) for seq in range(1, 22)]
        assert [p.kind for p in check(store, ACCOUNT)] == ["file-not-made"]
        opener = child(data_dir, "store.recover()\nsay('opened')\n")
        run_until(opener, "opened")
        assert opener.wait(30) == 0
        assert check(store, ACCOUNT) == []
        store.deliver([ACCOUNT], message(22))
        assert [store.read_message(i) for i in store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])] == \
            [message(seq) for seq in range(1, 23)]
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 23)}})


HALF_WRITTEN = """
store.deliver([ACCOUNT], message(1))
store.shard(ACCOUNT).checkpoint()
say("ready")
sys.stdin.readline()
def half(path, data, mtime, *, flush=True, replace=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data[: len(data) // 2])
    os._exit(9)  # killed halfway through the file of a delivery LMDB has committed
storage.shard.write_file = half
store.deliver([ACCOUNT], message(2, 40_000))
"""


def test_a_file_killed_halfway_is_never_seen_half(data_dir):
    """The file of a committed delivery is written whole elsewhere and renamed into cur/:
    killed halfway through, its process leaves no short file under the message's name for
    a reader (FETCH, RETR) or a COPY, which would link it and keep it short for good; the
    next opening of the shard makes the file and removes the half-written one."""
    writer = ready_child(data_dir, HALF_WRITTEN)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.create_mailbox(ACCOUNT, "Copy")
        go_and_die(writer)
        [one, two] = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
        assert store.read_message(two) == message(2, 40_000)
        store.copy(ACCOUNT, "INBOX", [(2, 2)], "Copy")
        assert [p.kind for p in check(store, ACCOUNT)] == ["file-not-made"]
        opener = child(data_dir, "store.recover()\nsay('opened')\n")
        run_until(opener, "opened")
        assert opener.wait(30) == 0
        assert not list(data_dir.rglob("*.placing"))
        assert check(store, ACCOUNT) == []
        store.shard(ACCOUNT).checkpoint()
    verify(data_dir, {"INBOX": {1: message(1), 2: message(2, 40_000)}, "Copy": {2: message(2, 40_000)}})


IN_THE_WINDOW = """
store.ensure_account(ACCOUNT)
say("ready")
for line in sys.stdin:
    action, uid = line.split()
    if action == "flag":
        store.store_flags(ACCOUNT, "INBOX", [(int(uid), int(uid))], "add", ["\\\\Seen", "\\\\Flagged"])
    elif action == "expunge":
        store.remove(ACCOUNT, "INBOX", [int(uid)])
    say("done")
"""


def test_changes_committed_before_a_deliverys_file_is_made_are_applied_to_it(data_dir, monkeypatch):
    """Between LMDB's commit of a delivery and its file, another process (imapd) may flag
    or expunge the new message: its settle finds no file yet. Once made, the file takes the
    name the index gives it then (flags), or goes (expunged); store check finds nothing."""
    import storage.shard

    other = ready_child(data_dir, IN_THE_WINDOW)
    write_file = storage.shard.write_file
    actions = iter([("expunge", 2), ("flag", 3), ("none", 4)])

    def in_the_window(path, data, mtime, **kwargs):
        write_file(path, data, mtime, **kwargs)
        if str(path).endswith(".placing"):  # LMDB has the commit; the file is not in cur/ yet
            action, uid = next(actions)
            other.stdin.write(f"{action} {uid}\n")
            other.stdin.flush()
            run_until(other, "done")

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.deliver([ACCOUNT], message(1))
        monkeypatch.setattr(storage.shard, "write_file", in_the_window)
        for seq in (2, 3, 4):
            store.deliver([ACCOUNT], message(seq))
        monkeypatch.setattr(storage.shard, "write_file", write_file)
        other.stdin.close()
        assert other.wait(30) == 0
        infos = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
        assert [i.uid for i in infos] == [1, 3, 4]
        assert [store.read_message(i) for i in infos] == [message(1), message(3), message(4)]
        assert check(store, ACCOUNT) == []
        [box] = [m for m in store.mailboxes(ACCOUNT) if m.name == "INBOX"]
        def uid_of(name):
            return int(name.split(",U=")[1].split(",")[0])

        # By UID, not by name: a Maildir name's microseconds are not zero-padded.
        names = sorted((p.name for p in (store.shard(ACCOUNT).mailbox_dir(ACCOUNT, box.id) / "cur").iterdir()), key=uid_of)
        assert [uid_of(n) for n in names] == [1, 3, 4], names
        assert [n.endswith(":2,FS") for n in names] == [False, True, False], names
    verify(data_dir, {"INBOX": {1: message(1), 3: message(3), 4: message(4)}})


def test_a_file_that_cannot_be_made_after_its_commit_is_made_at_the_checkpoint(data_dir, caplog, monkeypatch):
    """Once the 250 is told (the record flushed), a file that cannot be made (here its cur/
    is not a directory; on a full disk, no room) does not undo the delivery: its bytes stay
    in the journal, and each checkpoint tries again until the file is made."""
    import storage.shard

    monkeypatch.setattr(storage.shard, "CHECKPOINT_INTERVAL", 3600.0)  # only the checkpoints called here
    caplog.set_level("ERROR", logger="storage.shard")
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        store.deliver([ACCOUNT], message(1))
        shard = store.shard(ACCOUNT)
        [box] = [m for m in store.mailboxes(ACCOUNT) if m.name == "INBOX"]
        cur = shard.mailbox_dir(ACCOUNT, box.id) / "cur"
        kept = cur.with_name("cur.kept")

        def journaled() -> int:
            with shard.read() as txn:
                return txn.stat(shard.db["journal"])["entries"]

        shard.checkpoint()
        assert journaled() == 0
        cur.rename(kept)
        cur.write_bytes(b"")  # not a directory: the file cannot be made
        [delivered] = store.deliver([ACCOUNT], message(2))
        assert delivered.uid == 2
        assert [r.getMessage() for r in caplog.records] == ["file_place_failed"]
        with pytest.raises(OSError):
            shard.checkpoint()  # cur/ is still no directory: the key waits
        assert journaled() == 1  # message 2's bytes, still
        cur.unlink()
        kept.rename(cur)
        shard.checkpoint()
        infos = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
        assert [store.read_message(i) for i in infos] == [message(1), message(2)]
        assert check(store, ACCOUNT) == []
        assert journaled() == 0
    verify(data_dir, {"INBOX": {1: message(1), 2: message(2)}})


UNPLACED_WRITER = """
import errno
import storage.maildir, storage.shard
store.deliver([ACCOUNT], message(1))
shard = store.shard(ACCOUNT)
shard.checkpoint()
real = storage.shard.write_file
def fail(*args, **kwargs):
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))  # this process out of descriptors
storage.shard.write_file = storage.maildir.write_file = fail
[delivered] = store.deliver([ACCOUNT], message(2))
say(f"told {delivered.uid}")
sys.stdin.readline()
storage.shard.write_file = storage.maildir.write_file = real
shard.checkpoint()
say("checkpointed")
sys.stdin.readline()
"""


def test_a_repair_makes_the_file_its_process_could_not_and_never_expunges_it(data_dir):
    """A delivery told (250) whose file its process could not make has its bytes in the
    journal. `store check` from another process (the CLI) reports it, and --repair makes
    the file: it expunged the message before, and the writer's next checkpoint then forgot
    its bytes (found by a review)."""
    writer = subprocess.Popen([sys.executable, "-c", PRELUDE + f"store = Store(open_data_dir({str(data_dir)!r}, "
                               f"{SHARDS}))\n" + UNPLACED_WRITER], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                              text=True)
    try:
        assert run_until(writer, "told 2")[-1] == "told 2"
        with Store(open_data_dir(data_dir, SHARDS)) as store:  # the CLI
            kinds = [p.kind for p in check(store, ACCOUNT)]
            assert kinds == ["file-not-made"]
            assert [p.kind for p in check(store, ACCOUNT, repair=True)] == ["file-not-made"]
            assert check(store, ACCOUNT) == []
            infos = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
            assert [store.read_message(i) for i in infos] == [message(1), message(2)]
        writer.stdin.write("go\n")
        writer.stdin.flush()
        run_until(writer, "checkpointed")
        assert power_cut(data_dir) == 0  # every file flushed: nothing left for a cut to damage
    finally:
        kill(writer)
    verify(data_dir, {"INBOX": {1: message(1), 2: message(2)}})


def test_a_rebuild_keeps_a_message_whose_file_its_process_could_not_make(data_dir):
    """`store rebuild` reads the files: a told message whose bytes are only in the journal
    has its file made first, so the rebuilt index has it (a review found it dropped, and
    its bytes then forgotten by the writer's checkpoint)."""
    from storage.check import rebuild

    writer = subprocess.Popen([sys.executable, "-c", PRELUDE + f"store = Store(open_data_dir({str(data_dir)!r}, "
                               f"{SHARDS}))\n" + UNPLACED_WRITER], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                              text=True)
    try:
        run_until(writer, "told 2")
        with Store(open_data_dir(data_dir, SHARDS)) as store:
            assert rebuild(store, ACCOUNT)["messages"] == 2
        writer.stdin.write("go\n")
        writer.stdin.flush()
        run_until(writer, "checkpointed")
    finally:
        kill(writer)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        infos = store.fetch(ACCOUNT, "INBOX", [(1, 2**32 - 1)])
        assert sorted(store.read_message(i) for i in infos) == [message(1), message(2)]
        assert check(store, ACCOUNT) == []


TAKEN_BACK = """
import lmdb
store.deliver([ACCOUNT], message(1))
shard = store.shard(ACCOUNT)
shard.checkpoint()
class CommitFails:
    def __init__(self, raw):
        self._raw = raw
    def __getattr__(self, name):
        return getattr(self._raw, name)
    def commit(self):
        self._raw.abort()
        raise lmdb.MapFullError("LMDB could not commit")
begin, taken_back = shard._begin_caught_up, shard._taken_back
def failing_begin(counters):
    shard._begin_caught_up = begin
    return CommitFails(begin(counters))
def taken_back_then_die(seq, end, batch=None):
    taken_back(seq, end, batch)
    os._exit(9)  # the record voided: no file of it may be left in cur/
shard._room_for = lambda *args: False  # a nearly full disk: nobody is told before LMDB commits
shard._begin_caught_up = failing_begin
shard._taken_back = taken_back_then_die
store.deliver([ACCOUNT], message(2))
"""


def test_a_transaction_taken_back_leaves_no_file_of_it(data_dir):
    """LMDB could not commit a transaction nobody was told of: its record is voided, and
    its placed files go first, so a kill right after leaves no file under a UID the next
    delivery is given again (a review found the unlink after the void)."""
    writer = child(data_dir, TAKEN_BACK)
    assert writer.wait(60) == 9
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert check(store, ACCOUNT) == []
        [delivered] = store.deliver([ACCOUNT], message(3))
        assert delivered.uid == 2
    verify(data_dir, {"INBOX": {1: message(1), 3: message(3)}})


def _lmdb_journal_sizes(data_dir: Path) -> list[int]:
    """How many `journal` entries each shard's LMDB holds, the write-ahead log aside."""
    import lmdb

    sizes = []
    for shard_dir in sorted((data_dir / "shards").iterdir()):
        env = lmdb.open(str(shard_dir / "index.lmdb"), max_dbs=64, readonly=True, lock=False)
        try:
            with env.begin() as txn:
                sizes.append(txn.stat(env.open_db(b"journal", txn=txn, create=False))["entries"])
        except lmdb.NotFoundError:
            sizes.append(0)
        finally:
            env.close()
    return sizes


PREPENDED = """
store.ensure_account(ACCOUNT)
for seq, size, head in ((1, 65000, 536), (2, 65000, 537), (3, 65536, 1), (4, 100, 70000), (5, 70000, 10)):
    raw = message(seq, size)
    with store.begin_delivery([ACCOUNT, "bob@example.test"]) as delivery:
        for at in range(0, len(raw), 4000):
            delivery.write(raw[at:at + 4000])
        delivery.prepend(b"X-Verdict: " + b"v" * (head - 13) + b"\\r\\n")
        if seq % 2:
            delivery.send_to_each({ACCOUNT: "Junk", "bob@example.test": "INBOX"})
        delivery.commit()
say("ready")
time.sleep(600)
"""


def test_a_power_cut_after_deliveries_the_policy_prepended_to(data_dir):
    """The policy's verdict header is prepended at the message's end: around 64 KiB that
    decides whether the message is journaled or flushed; and a Junk verdict changes the
    target mailbox. Both copies (two accounts, two shards maybe) come back whole."""
    writer = child(data_dir, PREPENDED)
    run_until(writer, "ready")
    kill(writer)
    assert power_cut(data_dir) > 0
    wanted = {}
    for seq, size, head in ((1, 65000, 536), (2, 65000, 537), (3, 65536, 1), (4, 100, 70000), (5, 70000, 10)):
        wanted[seq] = b"X-Verdict: " + b"v" * (head - 13) + b"\r\n" + message(seq, size)
    verify(data_dir, {"INBOX": {s: wanted[s] for s in (2, 4)}, "Junk": {s: wanted[s] for s in (1, 3, 5)}})
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert check(store) == []
        assert sorted(store.read_message(i) for i in store.fetch("bob@example.test", "INBOX", [(1, 2**32 - 1)])) \
            == sorted(wanted.values())


def test_a_restore_killed_halfway_and_the_power_cut_again(data_dir):
    """The process restoring the journal is killed at random moments of its restore, and
    each time the files the journal still names are damaged again: the restore's own
    writes are unflushed until its syncfs. The last open restores everything."""
    import random

    rng = random.Random(4)
    writer = child(data_dir, "for seq in range(1, 801):\n"
                             "    store.deliver([ACCOUNT], message(seq))\n"
                             "say('ready')\ntime.sleep(600)\n")
    run_until(writer, "ready")
    kill(writer)
    killed_with_work_left = 0
    for _ in range(5):
        assert power_cut(data_dir) > 0
        restorer = child(data_dir, "say('opening')\nstore.recover()\nsay('opened')\ntime.sleep(600)\n")
        run_until(restorer, "opening")
        time.sleep(rng.uniform(0.0, 0.15))
        kill(restorer)
        if sum(map(len, journal_bases(data_dir).values())) == 0:
            break
        killed_with_work_left += 1
    assert killed_with_work_left >= 2, "the restore always finished before the kill: the test proves little"
    verify(data_dir, {"INBOX": {seq: message(seq) for seq in range(1, 801)}})


def test_a_message_whose_file_cannot_be_made_yet_is_read_from_the_journal(write_config, data_dir, tmp_path):
    """A delivery told (250) whose file its process could not make after the log's flush
    (here cur/ is immutable, chattr +i; in life a full disk, no descriptors) stands, and each
    checkpoint tries again. Meanwhile IMAP and POP3 read it from the journal's copy: a FETCH
    used to be NO, the store saying "run store check", until the file was made."""
    import imaplib
    import poplib
    import smtplib

    from conftest import POSTROOM, add_accounts, client_tls_context, start_daemon

    password = "correct horse battery staple"
    config = write_config(imap={"plaintext_auth": False})
    add_accounts(config, password, users=[ACCOUNT])
    daemon = start_daemon(config, tmp_path)
    cur: Path | None = None
    try:
        smtp = daemon.listen("smtp.listen")

        def send(seq: int) -> None:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
                client.sendmail("bob@example.org", [ACCOUNT], message(seq))  # raises unless 250

        def files() -> list[Path]:
            return sorted(cur.iterdir()) if cur is not None else sorted(data_dir.glob(f"shards/*/{ACCOUNT}/*/cur/*"))

        send(1)
        deadline = time.monotonic() + 10
        while not files() and time.monotonic() < deadline:
            time.sleep(0.05)
        [first] = files()
        cur = first.parent
        subprocess.run(["chattr", "+i", str(cur)], check=True)
        send(2)
        deadline = time.monotonic() + 10
        while "file_place_failed" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "file_place_failed" in daemon.stderr()
        assert files() == [first]  # message 2 has no file: its bytes are the journal's only

        context = client_tls_context(daemon.config)
        imap_address = daemon.listen("imap.listen")
        with imaplib.IMAP4(imap_address.host, imap_address.port, timeout=30) as imap:
            imap.starttls(ssl_context=context)
            imap.login(ACCOUNT, password)
            # The 250 comes once the log has the message, LMDB's commit (what IMAP reads) just after.
            deadline = time.monotonic() + 10
            while imap.select("INBOX")[1] != [b"2"] and time.monotonic() < deadline:
                time.sleep(0.05)
            status, data = imap.uid("FETCH", "2", "(BODY.PEEK[] RFC822.SIZE)")
            assert status == "OK", data
            assert data[0][1].endswith(message(2)), data
            # A copy takes the journal's bytes too (it took the file's); a flag change
            # waits for the file, which is made under the name the flags give it.
            assert imap.create("Kept")[0] == "OK"
            status, data = imap.uid("COPY", "2", "Kept")
            assert status == "OK", data
            assert imap.uid("STORE", "2", "+FLAGS", r"(\Flagged)")[0] == "OK"
            imap.select("Kept", readonly=True)
            status, data = imap.uid("FETCH", "1", "(BODY.PEEK[])")
            assert status == "OK" and data[0][1].endswith(message(2)), data
        pop3_address = daemon.listen("pop3.listen")
        pop3 = poplib.POP3(pop3_address.host, pop3_address.port, timeout=30)
        try:
            pop3.stls(context)
            pop3.user(ACCOUNT)
            pop3.pass_(password)
            _, lines, _ = pop3.retr(2)
            assert b"\r\n".join(lines).endswith(message(2).rstrip(b"\r\n"))
        finally:
            pop3.quit()

        subprocess.run(["chattr", "-i", str(cur)], check=True)
        deadline = time.monotonic() + 15  # the next checkpoint (one a second) makes it
        while time.monotonic() < deadline and len(files()) < 2:
            time.sleep(0.1)
        assert len(files()) == 2, daemon.stderr()[-2000:]
        [made] = [path for path in files() if path != first]
        # Named for its flags: IMAP's \Flagged, RETR's \Seen.
        assert ",U=2," in made.name and made.name.endswith(":2,FS"), made
        result = subprocess.run([POSTROOM, "--config", str(config), "store", "check"], capture_output=True,
                                text=True, timeout=120)
        assert (result.returncode, result.stdout) == (0, "0 problem(s)\n"), result.stdout + result.stderr
    finally:
        if cur is not None:
            subprocess.run(["chattr", "-i", str(cur)], check=False)
        assert daemon.stop() == 0, daemon.stderr()
    assert "Traceback" not in daemon.stderr()
