"""`postroom store import` (issue 16, item 4), run as docs/migration.md says, and checked the
way a mail client sees the result: over IMAP, from the daemon the mail was imported into.

Sources: a Maildir written by Python's `mailbox`, one written by Debian's Dovecot (its imap
process on a pipe: tests/dovecot_peer.py), an mbox file, and a live IMAP server (this same
Postroom daemon, another account). A rerun imports nothing twice; bad input is one line.

Mailbox ids are UIDVALIDITYs, unique per shard, and the sources here are made in the same
second as everything else: each account whose source UIDVALIDITYs must be kept gets a shard
of its own (real sources' folders were made years before the Postroom they move to).
"""

from __future__ import annotations

import imaplib
import mailbox
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import POSTROOM, add_accounts, client_tls_context, start_module_daemon
from docs_blocks import commands
from dovecot_peer import DovecotMaildir
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery staple"
PRODUCTION_CONFIG = "postroom --config /etc/postroom/postroom.toml"


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.daemon = start_module_daemon(root)
        self.config_path = self.daemon.config_path
        data_dir = self.daemon.config.server.data_dir
        # Accounts by shard (see the module's docstring): the IMAP source and the plain
        # Maildir/mbox targets share shard A; the IMAP target and Dovecot's target each have one.
        store = Store(open_data_dir(data_dir, self.daemon.config.storage.shards))
        shard_of = store.shard_number
        names = (f"user{i}@example.test" for i in range(1000))
        self.source = next(names)
        a = shard_of(self.source)
        self.imap_target = next(n for n in names if shard_of(n) != a)
        b = shard_of(self.imap_target)
        self.dovecot_target = next(n for n in names if shard_of(n) not in (a, b))
        self.maildir_target = next(n for n in names if shard_of(n) == a)
        self.mbox_target = next(n for n in names if shard_of(n) == a)
        store.close()
        add_accounts(self.config_path, PASSWORD, users=[self.source, self.imap_target, self.dovecot_target,
                                                          self.maildir_target, self.mbox_target])

    def run(self, *command: str, input: str | None = None, env: dict | None = None, shell: bool = False
            ) -> subprocess.CompletedProcess:
        return subprocess.run(command[0] if shell else command, shell=shell, input=input, capture_output=True,
                              text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=self.root,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def import_(self, account: str, source: str, *options: str, input: str | None = None,
                env: dict | None = None) -> subprocess.CompletedProcess:
        return self.run(POSTROOM, "--config", str(self.config_path), "store", "import", account, source, *options,
                        input=input, env=env)

    def replace(self, values: dict[str, str]) -> dict[str, str]:
        """What a docs block's commands get replaced: the production config, and `values`."""
        return {PRODUCTION_CONFIG: f"{POSTROOM} --config {self.config_path}", **values}

    def run_block(self, lines: list[str], env: dict | None = None) -> list[str]:
        """Run a docs block's commands in a shell; the stdout of each."""
        outputs = []
        for line in lines:
            done = self.run(line, env=env, shell=True)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            assert "Traceback" not in done.stderr
            outputs.append(done.stdout)
        return outputs

    def imap(self, user: str) -> imaplib.IMAP4:
        address = self.daemon.listen("imap.listen_tls")
        client = imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(self.daemon.config),
                                   timeout=30)
        client.login(user, PASSWORD)
        return client


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("import"))
    yield running
    running.daemon.stop()


# -- what a client sees ------------------------------------------------------------------------


def mailbox_view(client: imaplib.IMAP4, name: str) -> tuple[dict[str, int], dict[int, tuple]]:
    """({UIDVALIDITY, UIDNEXT, EXISTS}, {uid: (flags, internal date, bytes)}) of a folder,
    read with EXAMINE (nothing changes)."""
    status, _ = client.select(quote(name), readonly=True)
    assert status == "OK", name
    state = {key: int(client.untagged_responses[key][-1]) for key in ("UIDVALIDITY", "UIDNEXT", "EXISTS")}
    messages = {}
    if state["EXISTS"]:
        status, data = client.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
        assert status == "OK"
        for item in data:
            if not isinstance(item, tuple):
                continue
            head, body = item
            uid = int(re.search(rb"UID (\d+)", head)[1])
            flags = frozenset(re.search(rb"FLAGS \(([^)]*)\)", head)[1].decode().split()) - {"\\Recent"}
            date = imaplib.Internaldate2tuple(head)
            messages[uid] = (flags, time.mktime(date), body)
    return state, messages


def quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def listed(client: imaplib.IMAP4) -> set[str]:
    _, data = client.list()
    return {re.match(rb'\(.*?\) ".*?" (.*)$', line)[1].decode().strip('"') for line in data}


# -- a Maildir written by Python's mailbox -----------------------------------------------------------


def test_a_maildir_from_python_mailbox_comes_in_with_folders_flags_and_dates(server, tmp_path):
    source = tmp_path / "Maildir"
    md = mailbox.Maildir(source, create=True)
    sent = [
        ("", 1_500_000_000, b"Subject: plain\nFrom: a@example.net\n\nfirst line\n"),
        ("RS", 1_500_003_600, b"Subject: read and answered\nFrom: a@example.net\n\nsecond\n"),
        ("F", 1_500_007_200, b"Subject: flagged\nFrom: a@example.net\n\nthird\n"),
    ]
    for flags, date, raw in sent:
        message = mailbox.MaildirMessage(raw)
        if flags:
            message.set_subdir("cur")
            message.set_flags(flags)
        message.set_date(date)  # Python's Maildir keeps it as the file's mtime, as Dovecot does
        md.add(message)
    work = md.add_folder("Work")
    work.add(mailbox.MaildirMessage(b"Subject: work\n\nw\n"))
    work.add_folder("Deep").add(mailbox.MaildirMessage(b"Subject: deep\n\nd\n"))  # .Work/.Deep: Work/Deep

    account = server.maildir_target
    (out,) = server.run_block(commands("migration.md", "import-maildir", replace=server.replace(
        {"alice@example.org": account, "/var/vmail/example.org/alice/Maildir": str(source)})))
    assert "INBOX: 3 imported, 0 already in, 0 failed" in out
    assert "Work: 1 imported" in out and "Work/Deep: 1 imported" in out

    client = server.imap(account)
    assert {"INBOX", "Work", "Work/Deep", "Sent", "Trash"} <= listed(client)
    _, messages = mailbox_view(client, "INBOX")
    by_subject = {body.split(b"\r\n", 1)[0]: (flags, date, body) for flags, date, body in messages.values()}
    expected = {"": set(), "RS": {"\\Seen", "\\Answered"}, "F": {"\\Flagged"}}
    for flags, date, raw in sent:
        got_flags, got_date, body = by_subject[raw.split(b"\n", 1)[0]]
        assert got_flags == expected[flags]
        assert got_date == date
        assert body == raw.replace(b"\n", b"\r\n")  # stored as it travels: CRLF
    assert mailbox_view(client, "Work/Deep")[1][1][2] == b"Subject: deep\r\n\r\nd\r\n"
    client.logout()

    # Again: nothing twice. Then mail that reached the old server meanwhile, and only that.
    again = server.import_(account, str(source))
    assert again.returncode == 0, again.stderr
    assert "INBOX: 0 imported, 3 already in" in again.stdout
    work.add(mailbox.MaildirMessage(b"Subject: late\n\nlate\n"))
    late = server.import_(account, str(source))
    assert "Work: 1 imported, 1 already in" in late.stdout, late.stdout
    assert "total: 1 imported, 5 already in, 0 failed in 3 folder(s)" in late.stdout
    assert "importing INBOX" in late.stderr  # progress on stderr, the summary on stdout


# -- a Maildir written by Dovecot ------------------------------------------------------------------------


def test_a_dovecot_maildir_keeps_uidvalidity_uids_keywords_and_dates(server):
    dovecot = DovecotMaildir()
    try:
        session = dovecot.session()
        flags = [None, r"(\Seen $Forwarded)", "(Junk)", r"(\Answered \Flagged)", None]
        for i, flag in enumerate(flags):
            raw = f"Subject: dovecot {i}\r\nMessage-ID: <{i}@old.example>\r\n\r\nbody {i}\r\n".encode()
            assert session.append("INBOX", flag, imaplib.Time2Internaldate(1_600_000_000 + i * 3600), raw)[0] == "OK"
        # Expunged: UID 1, and the last (5), so that UIDNEXT (6) is above every UID left
        session.select("INBOX")
        session.uid("STORE", "1,5", "+FLAGS", r"(\Deleted)")
        session.expunge()
        assert session.create("&AMk-t&AOk-.Sub")[0] == "OK"  # Été.Sub: modified UTF-7, "." levels
        session.append("&AMk-t&AOk-.Sub", r"(\Flagged)", imaplib.Time2Internaldate(1_600_100_000),
                       b"Subject: sub\r\n\r\nsub\r\n")
        # Keyed by the name Postroom lists it under (modified UTF-7, "/" levels)
        before = {name: mailbox_view(session, raw) for name, raw in (("INBOX", "INBOX"),
                                                                      ("&AMk-t&AOk-/Sub", "&AMk-t&AOk-.Sub"))}
        session.logout()
        assert before["INBOX"][0]["UIDNEXT"] == 6 and sorted(before["INBOX"][1]) == [2, 3, 4]

        account = server.dovecot_target
        done = server.import_(account, str(dovecot.maildir))
        assert done.returncode == 0, done.stderr
        assert "INBOX: 3 imported, 0 already in, 0 failed (UIDVALIDITY" in done.stdout
        assert "Été/Sub: 1 imported" in done.stdout and "UIDs kept" in done.stdout

        client = server.imap(account)
        assert "&AMk-t&AOk-/Sub" in listed(client)
        for name, (state, messages) in before.items():
            got_state, got = mailbox_view(client, name)
            assert got_state == state, name  # UIDVALIDITY, UIDNEXT, EXISTS: a client's cache still holds
            assert got == messages, name  # the same UIDs, flags and keywords, dates, bytes
        # New mail gets a UID Dovecot never handed out
        status, data = client.append("INBOX", None, None, b"Subject: new\r\n\r\nnew\r\n")
        assert re.search(rb"APPENDUID \d+ 6\]", data[0]), data
        client.logout()

        again = server.import_(account, str(dovecot.maildir))
        assert "total: 0 imported, 4 already in, 0 failed" in again.stdout, again.stdout
    finally:
        dovecot.remove()


# -- an mbox file -------------------------------------------------------------------------------------------


def test_an_mbox_file_comes_in_once_with_its_flags_and_from_line_dates(server, tmp_path):
    path = tmp_path / "archive.mbox"
    box = mailbox.mbox(path, create=True)
    first = mailbox.mboxMessage(b"Subject: first\nFrom: a@example.net\n\nFrom the past, a line\nbye\n")
    first.set_from("a@example.net", time.gmtime(1_400_000_000))
    first.set_flags("ROAF")  # Status: RO, X-Status: AF
    box.add(first)
    twin = mailbox.mboxMessage(b"Subject: twin\n\nsame bytes\n")
    twin.set_from("b@example.net", time.gmtime(1_400_003_600))
    box.add(twin)
    box.add(twin)  # two identical messages are two messages
    box.close()
    assert b"\n>From the past" in path.read_bytes()

    account = server.mbox_target
    (out,) = server.run_block(commands("migration.md", "import-mbox", replace=server.replace(
        {"alice@example.org": account, "/home/alice/mail/archive-2019.mbox": str(path)})))
    assert "Archive/2019: 3 imported, 0 already in, 0 failed" in out
    client = server.imap(account)
    _, messages = mailbox_view(client, "Archive/2019")
    client.logout()
    got = sorted(messages.values(), key=lambda m: m[1])
    assert got[0] == (frozenset({"\\Seen", "\\Answered", "\\Flagged"}), 1_400_000_000,
                      b"Subject: first\r\nFrom: a@example.net\r\n\r\nFrom the past, a line\r\nbye\r\n")
    assert got[1] == got[2] == (frozenset(), 1_400_003_600, b"Subject: twin\r\n\r\nsame bytes\r\n")

    again = server.import_(account, str(path), "--into", "Archive/2019")
    assert "Archive/2019: 0 imported, 3 already in, 0 failed" in again.stdout, again.stdout


def test_a_big_message_is_streamed_not_held(server, tmp_path):
    """Peak memory of the command, with a 24 MiB message and with a small one: the same."""
    def peak(source: Path, into: str) -> int:
        wrapper = ("import resource, subprocess, sys; "
                   "done = subprocess.run(sys.argv[1:], capture_output=True); "
                   "assert done.returncode == 0, done.stderr; "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        done = server.run(sys.executable, "-c", wrapper, POSTROOM, "--config", str(server.config_path), "store",
                          "import", server.mbox_target, str(source), "--into", into)
        assert done.returncode == 0, done.stderr
        return int(done.stdout) * 1024

    small, big = tmp_path / "small.mbox", tmp_path / "big.mbox"
    small.write_bytes(b"From a@example.net Mon Jan  1 00:00:00 2024\nSubject: small\n\nhello\n")
    line = b"QUJD" * 19 + b"\n"  # base64-like lines of 77 bytes
    with open(big, "wb") as f:
        f.write(b"From a@example.net Mon Jan  1 00:00:00 2024\nSubject: big\nMIME-Version: 1.0\n"
                b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n")
        f.write(line * ((24 << 20) // len(line)))
    baseline = peak(small, "Small")
    assert peak(big, "Big") - baseline < 8 << 20


# -- a live IMAP server ----------------------------------------------------------------------------------------


def test_a_live_imap_account_comes_in_with_folders_flags_dates_and_uids(server):
    source = server.imap(server.source)
    big = b"Subject: big\r\nContent-Type: text/plain\r\n\r\n" + b"0123456789abcdef" * 160_000 + b"\r\n"  # 2.4 MiB
    messages = [
        ("INBOX", r"(\Seen)", b"Subject: one\r\n\r\none\r\n"),
        ("INBOX", r"(\Answered $Forwarded)", b"Subject: two\r\n\r\ntwo\r\n"),
        ("INBOX", None, big),  # fetched in pieces of 1 MiB
        ("Projects/2024", r"(\Flagged Important)", b"Subject: plan\r\n\r\nplan\r\n"),
    ]
    assert source.create("Projects/2024")[0] == "OK"
    for i, (folder, flags, raw) in enumerate(messages):
        assert source.append(folder, flags, imaplib.Time2Internaldate(1_650_000_000 + i * 60), raw)[0] == "OK"
    folders = ["INBOX", "Projects", "Projects/2024"]
    before = {name: mailbox_view(source, name) for name in folders}
    source.logout()

    account = server.imap_target
    address = server.daemon.listen("imap.listen_tls")
    (out,) = server.run_block(
        commands("migration.md", "import-imap", replace=server.replace(
            {"alice@example.org": account,
             "imaps://alice@old.example.org": f"imaps://{server.source}@localhost:{address.port}"})),
        # The daemon's certificate is self-signed: trusted here as a CA the system knew would be.
        env={"OLD_PASSWORD": PASSWORD, "SSL_CERT_FILE": str(server.daemon.config.tls.cert)})
    assert "INBOX: 3 imported, 0 already in, 0 failed (UIDVALIDITY" in out
    assert "Projects/2024: 1 imported" in out

    client = server.imap(account)
    for name in folders:
        got_state, got = mailbox_view(client, name)
        assert got_state == before[name][0], name
        assert got == before[name][1], name
    client.logout()

    # Again, over imap:// and STARTTLS this time, the certificate given with --cafile
    starttls = server.daemon.listen("imap.listen")
    again = server.import_(account, f"imap://{server.source.replace('@', '%40')}@localhost:{starttls.port}",
                           "--cafile", str(server.daemon.config.tls.cert), input=PASSWORD + "\n")
    assert "total: 0 imported, 4 already in, 0 failed" in again.stdout, again.stdout + again.stderr


# -- bad input: one line, exit 1 --------------------------------------------------------------------------------


def test_bad_sources_are_one_line_each(server, tmp_path):
    port = server.daemon.listen("imap.listen_tls").port
    not_mbox = tmp_path / "notes.txt"
    not_mbox.write_text("hello\n")
    cert = {"SSL_CERT_FILE": str(server.daemon.config.tls.cert)}
    cases = [
        ((server.maildir_target, str(tmp_path / "missing")), None, {}, "no such file or directory"),
        ((server.maildir_target, str(not_mbox)), None, {}, "not an mbox file"),
        ((server.maildir_target, str(tmp_path)), None, {}, "not a Maildir (no cur/ directory)"),
        (("nobody@example.test", str(tmp_path)), None, {}, "no user nobody@example.test"),
        ((server.imap_target, f"imaps://{server.source}@localhost:{port}"), "wrong password\n", cert,
         f"localhost:{port}: login as {server.source} refused"),
        ((server.imap_target, f"imaps://{server.source}@localhost:{port}"), PASSWORD + "\n", {},
         f"localhost:{port}: certificate not trusted"),
    ]
    running = [(subprocess.Popen([POSTROOM, "--config", str(server.config_path), "store", "import", *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **env}), stdin, expected)
               for args, stdin, env, expected in cases]
    for process, stdin, expected in running:
        out, err = process.communicate(stdin or "", timeout=60)
        assert process.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("postroom: ") and expected in err, err


# -- the store side: which mailbox gets which id ------------------------------------------------------------------


def test_mailboxes_made_on_the_way_leave_the_source_uidvalidities_free(tmp_path):
    """A parent made for a child folder (and INBOX, made first) takes the next id the shard
    hands out: without the plan of every source folder, that is the id the next folder needs."""
    from storage import ImportMailbox, finish_import

    now = int(time.time())
    plan = {"INBOX": now + 10, "A/B": now + 11, "Sent": now + 12}  # as Dovecot hands them out: one after another
    with Store(open_data_dir(tmp_path / "var", 1)) as store:
        made = {name: ImportMailbox(store, "u@example.test", name, uidvalidity=uidvalidity, uidnext=1,
                                    plan=plan)
                for name, uidvalidity in plan.items()}
        for name, target in made.items():
            assert target.kept_uidvalidity and target.mailbox.id == plan[name], name
            target.finish()
        finish_import(store, "u@example.test")
        ids = {m.name: m.id for m in store.mailboxes("u@example.test")}
    assert ids["A"] not in plan.values()  # the parent, made on the way, under an id of its own
    assert {"Drafts", "Junk", "Trash", "Archive"} <= set(ids)  # the defaults, made after
    assert ids["Sent"] == now + 12


def test_a_maildir_message_renamed_while_the_import_runs_is_still_read(tmp_path):
    """Dovecot moves a message from new/ to cur/ when a client sees it, and renames it for a
    flag change: between the listing and the read, the file has another name."""
    from postroom import importer_maildir

    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    key = md.add(mailbox.MaildirMessage(b"Subject: moving\n\nm\n"))
    (inbox,) = importer_maildir.folders(tmp_path / "Maildir")
    (message,) = inbox.messages(lambda key, uid: False)
    os.rename(tmp_path / "Maildir" / "new" / key, tmp_path / "Maildir" / "cur" / f"{key}:2,S")
    assert b"".join(message.chunks()) == b"Subject: moving\r\n\r\nm\r\n"
