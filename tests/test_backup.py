"""`postroom backup` of a live server: the copy is consistent whatever the daemons do
meanwhile, and restored as docs/backups.md says it checks clean and serves the mail.

One `postroom serve` for the module. The first test makes the races happen at a chosen
moment: its copier expunges, flags and delivers through the daemon (IMAP, SMTP) as the
first file of a shard is copied. The second runs the docs' blocks (`backup`, `restore`,
`check-restored`) with deliveries and expunges running through the daemon all along, then
starts the daemon again on the restored data dir and reads the mail back.
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import smtplib
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    BIN,
    CHEAP_HASHER,
    client_tls_context,
    free_port,
    start_daemon,
    start_module_daemon,
    write_config_file,
)
from docs_blocks import commands
from storage import Accounts, Queue, QueuedRecipient, QueueEnvelope, Store, open_data_dir
from storage.check import check
from storage.snapshot import CopyStats, FileCopier, finish, snapshot_shard, still_indexed

PASSWORD = "correct horse battery staple"
LOAD_SECONDS = 30.0  # bound on the load thread, whatever happens
LOAD_ROUNDS = 2000


class Server:
    """The module's daemon; the restore test stops it and starts another on the restored dir."""

    def __init__(self, root: Path):
        self.root = root
        self.overrides = {"storage": {"shards": 2}, "tls": {
            # Outside the data dir, as in production (/etc/postroom/tls): the backup takes them too.
            "cert": str(root / "etc-tls/fullchain.pem"), "key": str(root / "etc-tls/privkey.pem"),
            "self_signed": True},
            # On, so the data dir holds the processes' metrics files, which a backup leaves out.
            "metrics": {"listen": [f"127.0.0.1:{free_port()}"]}}
        self.daemon = start_module_daemon(root, **self.overrides)
        with Accounts(root / "var/accounts.lmdb", hasher=CHEAP_HASHER) as accounts:
            accounts.add_domain("example.test")
            for user in ("race", "load", "keep"):
                accounts.add_user(f"{user}@example.test", PASSWORD)

    def restart(self) -> None:
        """Start serve again on its config; should another test run on this machine have
        taken one of its ports meanwhile, on new ports (start_module_daemon's way)."""
        for attempt in range(3):
            try:
                self.daemon = start_daemon(self.root / "postroom.toml", self.root)
                return
            except AssertionError as e:
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
                write_config_file(self.root / "postroom.toml", self.root / "var", **self.overrides)

    def deliver(self, user: str, count: int, tag: str = "m") -> None:
        address = self.daemon.listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=30) as smtp:
            for n in range(count):
                body = f"Subject: {tag} {n}\r\nFrom: s@example.org\r\n\r\nbody {tag} {n}\r\n".encode()
                assert smtp.sendmail("s@example.org", [f"{user}@example.test"], body) == {}

    def imap(self, user: str) -> imaplib.IMAP4_SSL:
        address = self.daemon.listen("imap.listen_tls")
        client = imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(self.daemon.config),
                                   timeout=30)
        client.login(f"{user}@example.test", PASSWORD)
        client.select("INBOX")
        return client


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("backup"))
    yield server
    assert server.daemon.stop() == 0, server.daemon.stderr()
    assert "Traceback" not in server.daemon.stderr(), server.daemon.stderr()


class RacingCopier(FileCopier):
    """Copies as FileCopier does; before its first file, `race()` runs (the daemon changes
    the store between the snapshot and the copying of its files)."""

    def __init__(self, race):
        super().__init__()
        self.race = race

    def place(self, source, target, stats):
        race, self.race = self.race, None
        if race is not None:
            race()
        super().place(source, target, stats)


def test_changes_between_the_snapshot_and_the_files_leave_the_copy_consistent(server, tmp_path):
    server.deliver("race", 5)

    def race():
        client = server.imap("race")
        client.uid("STORE", "2", "+FLAGS", r"(\Seen)")  # renames uid 2's file
        client.uid("STORE", "3", "+FLAGS", r"(\Deleted)")
        client.expunge()  # unlinks uid 3's file
        client.create("Archive")
        client.uid("MOVE", "4", "Archive")  # uid 4's file: a new name in another mailbox
        client.logout()
        server.deliver("race", 1, tag="late")  # after the snapshot: not in the copy

    account = "race@example.test"
    data_dir = open_data_dir(server.root / "var", 2)
    target = tmp_path / "copy"
    with Store(data_dir) as store:
        shard = store.shard(account)
        stats = snapshot_shard(shard, target / shard.path.relative_to(data_dir.path), RacingCopier(race))
        assert [(g.account, g.uid) for g in stats.gone] == [(account, 3)]
        assert stats.found_elsewhere == 1  # the moved one
        assert not still_indexed(shard, stats.gone[0].base)
    (target / "layout.json").write_bytes((data_dir.path / "layout.json").read_bytes())
    copy = open_data_dir(target, 2)
    removed = finish(copy, stats.gone)
    with Store(copy) as store:
        assert check(store, account) == []
        assert removed == 1
        mailbox, uids, _ = store.uids(account, "INBOX")
        assert uids == [1, 2, 4, 5]  # uid 3 expunged in the copy too; the late one (6) not there
        (two,) = store.fetch(account, "INBOX", [(2, 2)])
        assert "\\Seen" not in store.flags(account, "INBOX", [(2, 2)])[0].flags  # as the snapshot had it
        assert b"body m 1" in store.read_message(two)
        (four,) = store.fetch(account, "INBOX", [(4, 4)])
        assert b"body m 3" in store.read_message(four)  # where the snapshot had it
        assert store.uids(account, "Archive")[1] == []  # the move came after it


def test_a_backup_goes_into_a_new_directory_outside_the_data_dir(server, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    refused = ((tmp_path / "full", "exists and is not empty"), (server.root / "var/b", "inside the data dir"))
    for target, says in refused:
        done = subprocess.run([str(BIN / "postroom"), "--config", str(server.root / "postroom.toml"), "backup",
                               str(target)], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert says in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (server.root / "var/b").exists()


def test_on_another_file_system_files_are_copied_with_their_dates(server, tmp_path):
    server.deliver("race", 2, tag="other-fs")
    other = Path(tempfile.mkdtemp(prefix="postroom-backup-", dir="/dev/shm"))  # tmpfs
    assert os.stat(other).st_dev != os.stat(server.root).st_dev
    try:
        done = subprocess.run([str(BIN / "postroom"), "--config", str(server.root / "postroom.toml"), "backup",
                               str(other / "b")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        manifest = json.loads((other / "b/backup.json").read_text())
        assert manifest["linked"] == 0 and manifest["copied"] == manifest["messages"] > 0
        live = {p.name: p for p in (server.root / "var/shards").rglob("cur/*")}
        copied = list((other / "b/data/shards").rglob("cur/*"))
        assert copied and all(p.name in live for p in copied)
        for path in copied:  # the mtime is the internal date (storage/maildir.py)
            assert path.stat().st_mtime == live[path.name].stat().st_mtime
            assert path.read_bytes() == live[path.name].read_bytes()
    finally:
        shutil.rmtree(other)


def test_a_queued_message_sent_while_the_queue_is_copied_is_not_in_the_copy(write_config, data_dir, tmp_path):
    config_path = write_config()
    queue_dir = open_data_dir(data_dir, 4)
    qids, calls = [], []
    with Queue(queue_dir) as queue:
        for n in range(3):
            with queue.begin(QueueEnvelope("a@example.test", (QueuedRecipient(f"b{n}@remote.test"),))) as entry:
                entry.write(f"Subject: {n}\r\n\r\nqueued {n}\r\n".encode())
                qids.append(entry.commit())

        def place(source: Path, target: Path) -> None:
            if not calls:  # another process finishes one now, as the delivery runner would
                done = subprocess.run([str(BIN / "postroom"), "--config", str(config_path), "queue", "remove",
                                       qids[1]], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
            calls.append(source.name)
            FileCopier().place(source, target, CopyStats())

        copied, gone = queue.snapshot(tmp_path / "copy/queue", place)
    assert (copied, gone) == (2, [qids[1]])
    (tmp_path / "copy/layout.json").write_bytes((data_dir / "layout.json").read_bytes())
    with Queue(open_data_dir(tmp_path / "copy", 4)) as copy:
        assert copy.recovered == ([], [])  # no record without its file for recovery to drop
        assert sorted(m.id for m in copy.list()) == sorted([qids[0], qids[2]])
        assert copy.read(qids[2]).endswith(b"queued 2\r\n")


def _shell(lines: list[str], env: dict) -> str:
    """A docs block run as one script, as a sysadmin pastes it; stopped at the first failure."""
    script = "\n".join(["set -e", *lines])
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"{script}\n{done.stdout}{done.stderr}"
    return done.stdout


class Load(threading.Thread):
    """Deliveries to `load@` and expunges of its oldest message, through the daemon, until
    stopped (bounded in rounds and time). `log` has (time, what) of each change done."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server = server
        self.stopping = threading.Event()
        self.log: list[tuple[float, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = self.server.imap("load")
            deadline = time.monotonic() + LOAD_SECONDS
            for n in range(LOAD_ROUNDS):
                if self.stopping.is_set() or time.monotonic() > deadline:
                    break
                self.server.deliver("load", 1, tag=f"load{n}")
                self.log.append((time.monotonic(), "delivered"))
                client.noop()
                _, data = client.uid("SEARCH", "ALL")
                uids = data[0].split()
                if len(uids) > 1:
                    client.uid("STORE", uids[0], "+FLAGS", r"(\Deleted)")
                    client.uid("STORE", uids[-1], "+FLAGS", r"(\Seen)")
                    client.expunge()
                    self.log.append((time.monotonic(), "expunged"))
            client.logout()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_backup_under_load_restores_as_documented_to_a_store_that_checks_clean(server, tmp_path):
    root = server.root
    server.deliver("keep", 10, tag="keep")
    server.deliver("load", 40, tag="first")
    replace = {
        "/etc/postroom/postroom.toml": str(root / "postroom.toml"),
        "/etc/postroom/tls": str(root / "etc-tls"),
        "/var/lib/postroom": str(root / "var"),
        "/var/backups/postroom": str(tmp_path / "backups"),
        "-o postroom -g postroom ": "",  # the tests run as root, owner of the data dir
        "systemctl stop postroom": "true",  # the test stops its daemon itself, below
        "systemctl start postroom": "true",  # and starts it again
    }
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}

    load = Load(server)
    load.start()
    try:
        while not any(what == "expunged" for _, what in load.log) and load.is_alive():
            time.sleep(0.05)
        began = time.monotonic()
        _shell(commands("backups.md", "backup", replace), env)
        ended = time.monotonic()
        # Wait for one more change after the end, so the load surely spans the backup.
        count = len(load.log)
        while len(load.log) == count and load.is_alive():
            time.sleep(0.05)
    finally:
        load.stopping.set()
        load.join(LOAD_SECONDS + 10)
    assert load.error is None, repr(load.error)
    during = {what for when, what in load.log if began <= when <= ended}
    assert during == {"delivered", "expunged"}, f"the load did not run during the backup: {load.log}"

    (backup,) = [p for p in (tmp_path / "backups").iterdir() if p.is_dir() and not p.is_symlink()]
    manifest = json.loads((backup / "backup.json").read_text())
    assert manifest["problems"] == []
    assert {p.name for p in (backup / "tls").iterdir()} == {"fullchain.pem", "privkey.pem"}
    assert (root / "var/metrics").is_dir() and not (backup / "data/metrics").exists()

    assert server.daemon.stop() == 0, server.daemon.stderr()
    certificate = (root / "etc-tls/fullchain.pem").read_bytes()
    (root / "etc-tls/fullchain.pem").unlink()  # the restore must bring it back
    _shell(commands("backups.md", "restore", replace), env)
    assert (root / "etc-tls/fullchain.pem").read_bytes() == certificate
    # `store check` exits 1 on any problem, which stops the script (set -e).
    assert _shell(commands("backups.md", "check-restored", replace), env) == "0 problem(s)\n"

    server.restart()
    client = server.imap("keep")
    _, data = client.uid("SEARCH", "ALL")
    assert len(data[0].split()) == 10
    _, fetched = client.uid("FETCH", data[0].split()[-1], "BODY.PEEK[TEXT]")
    assert fetched[0][1] == b"body keep 9\r\n"
    client.logout()
    with Store(open_data_dir(root / "var", 2)) as store:
        total = sum(len(store.uids(f"{user}@example.test", mailbox.name)[1])
                    for user in ("race", "load", "keep") for mailbox in store.mailboxes(f"{user}@example.test"))
    assert total == manifest["messages"]
