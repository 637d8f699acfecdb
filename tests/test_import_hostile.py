"""`postroom store import` fed hostile or broken sources (issue 16, session 9's attack):
a Maildir the user could write to (symbolic links out of it, FIFOs, devices, a folder that
contains itself), a dovecot-uidlist with absurd or duplicate UIDs, a fake IMAP server that
lies. The command is run as the sysadmin runs it; what came in is read from the store.
"""

from __future__ import annotations

import asyncio
import os
import time
import subprocess
from pathlib import Path

import pytest

from conftest import POSTROOM, add_accounts, write_config_file
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery staple"
USER = "u@example.test"


@pytest.fixture
def target(tmp_path):
    config = write_config_file(tmp_path / "postroom.toml", tmp_path / "var")
    add_accounts(config, PASSWORD, users=[USER])

    def run(source: Path | str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([POSTROOM, "--config", str(config), "store", "import", USER, str(source)],
                              input=input, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              stdin=None if input is not None else subprocess.DEVNULL)

    run.data_dir = tmp_path / "var"
    return run


def bodies(data_dir: Path, mailbox: str = "INBOX") -> dict[int, bytes]:
    """{uid: bytes} of a mailbox of USER, read from the store after the import."""
    with Store(open_data_dir(data_dir, 4)) as store:
        return {info.uid: store.read_message(info) for info in store.fetch(USER, mailbox, ((1, 2**32 - 1),))}


def maildir(root: Path, messages: dict[str, bytes]) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, raw in messages.items():
        (root / "cur" / name).write_bytes(raw)
    return root


def test_a_maildir_imports_no_file_through_a_link_nor_a_fifo_nor_a_device(target, tmp_path):
    """Before: the link's target (any file root can read) came in as mail, the FIFO hung the
    import for ever, /dev/zero would have filled the disk, and ".Loop -> ." nested the
    Maildir in itself until a traceback (ELOOP)."""
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:secret-hash:19000::::::\n")
    source = maildir(tmp_path / "Maildir", {"1.host:2,S": b"Subject: mine\n\nreal mail\n"})
    (source / "cur" / "2.host:2,S").symlink_to(secret)
    os.mkfifo(source / "new" / "3.host")
    (source / "new" / "4.host").symlink_to("/dev/zero")
    (source / ".Loop").symlink_to(".")
    outside = maildir(tmp_path / "elsewhere", {"5.host:2,": b"Subject: not the user's\n\nx\n"})
    (source / ".Linked").symlink_to(outside)

    done = target(source, timeout=20)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1  # messages failed: a script notices
    assert "INBOX: 1 imported, 0 already in, 3 failed" in done.stdout, done.stdout
    assert "maildir:2.host: cannot read it: a symbolic link, not followed" in done.stderr
    assert "maildir:3.host: cannot read it: not a regular file" in done.stderr
    assert "maildir:4.host: cannot read it: a symbolic link, not followed" in done.stderr
    assert "Loop" not in done.stdout and "Linked" not in done.stdout
    got = bodies(target.data_dir)
    assert list(got.values()) == [b"Subject: mine\r\n\r\nreal mail\r\n"]


def test_a_maildir_whose_cur_is_a_link_elsewhere_is_refused_in_one_line(target, tmp_path):
    elsewhere = maildir(tmp_path / "elsewhere", {"5.host:2,": b"Subject: not the user's\n\nx\n"})
    source = maildir(tmp_path / "Maildir", {})
    (source / "cur").rmdir()
    (source / "cur").symlink_to(elsewhere / "cur")
    done = target(source)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"postroom: {source}/cur: a symbolic link, not followed" in done.stderr
    assert bodies(target.data_dir) == {}


def test_a_uid_given_twice_in_the_uidlist_loses_no_message(target, tmp_path):
    """Before: the second file with UID 7 counted as "already in" and was never imported."""
    source = maildir(tmp_path / "Maildir", {f"100{i}.host:2,S": f"Subject: m{i}\n\nbody {i}\n".encode()
                                            for i in range(1, 4)})
    (source / "dovecot-uidlist").write_text("3 V1234 N20\n7 :1001.host\n7 :1002.host\n8 :1003.host\n")
    done = target(source)
    assert done.returncode == 0, done.stderr
    assert "INBOX: 3 imported, 0 already in" in done.stdout, done.stdout
    got = bodies(target.data_dir)
    assert got[7] == b"Subject: m1\r\n\r\nbody 1\r\n" and got[8] == b"Subject: m3\r\n\r\nbody 3\r\n"
    assert b"Subject: m2\r\n\r\nbody 2\r\n" in got.values() and max(got) >= 20  # a new UID, above the source's


@pytest.mark.parametrize("uidlist", [
    "3 V1234 N4294967295\n5 :1001.host\n99999999999 :1002.host\n",  # UIDNEXT at the top, a UID past 32 bits
    "3 V1234 N20\n5 :1001.host\n4294967296 :1002.host\n",  # a UID past 32 bits
    "3 V1234\n5 :1001.host\n6 :1002.host\n",  # no UIDNEXT at all
])
def test_absurd_uids_in_the_uidlist_are_not_kept_and_new_mail_still_fits(target, tmp_path, uidlist):
    """Before: a struct.error traceback (a UID past 32 bits), or a mailbox whose UIDNEXT
    left no UID for new mail; without UIDNEXT, UIDs were numbered from 1 under the source's
    UIDVALIDITY (a client's cache would show another message under a UID it knows)."""
    source = maildir(tmp_path / "Maildir", {f"100{i}.host:2,S": f"Subject: m{i}\n\nbody {i}\n".encode()
                                            for i in range(1, 3)})
    (source / "dovecot-uidlist").write_text(uidlist)
    done = target(source)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "INBOX: 2 imported" in done.stdout, done.stdout
    with Store(open_data_dir(target.data_dir, 4)) as store:
        inbox = store.mailbox(USER, "INBOX")
        _, uids, _ = store.uids(USER, "INBOX")
        if inbox.id == 1234:  # the source's UIDVALIDITY: then its UIDs are its own and below 2**31
            assert "UIDNEXT" not in uidlist or "N20" in uidlist
            assert 5 in uids and all(uid < 2**31 for uid in uids)
        store.append(USER, "INBOX", b"Subject: new\r\n\r\nnew mail\r\n")
        _, after, _ = store.uids(USER, "INBOX")
    assert len(after) == 3 and max(after) < 2**31
    if "N20" not in uidlist:
        assert "not the source's 1234" in done.stdout, done.stdout


# -- a hostile IMAP source: a fake server, in-process ------------------------------------------------------


class FakeIMAP:
    """A tiny IMAP4rev1 server on loopback (implicit TLS) whose answers the test writes:
    `answers[command name]` is a function of (tag, arguments) returning what to send, or an
    async function of (tag, arguments, writer) that sends it itself. Runs in a thread."""

    def __init__(self, tmp_path: Path):
        import ssl
        import threading

        import conf
        from conf.tls import ensure_certificate

        config = conf.load(write_config_file(tmp_path / "fake.toml", tmp_path / "fake"))
        ensure_certificate(config.tls, "localhost")
        self.cafile = str(config.tls.cert)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(config.tls.cert, config.tls.key)
        self.answers: dict = {}
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, ssl=self.context))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _session(self, reader, writer) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] fake\r\n")
        try:
            while line := await reader.readline():
                tag, _, rest = line.decode().rstrip("\r\n").partition(" ")
                name, _, args = rest.partition(" ")
                name = name.upper()
                if name == "UID":
                    sub, _, args = args.partition(" ")
                    name = "UID " + sub.upper()
                answer = self.answers.get(name) or self.DEFAULT.get(name)
                if answer is None:
                    writer.write(f"{tag} BAD unknown\r\n".encode())
                elif asyncio.iscoroutinefunction(answer):
                    await answer(tag, args, writer)
                else:
                    writer.write(answer(tag, args))
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    DEFAULT = {
        "CAPABILITY": lambda tag, args: f"* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n".encode(),
        "LOGIN": lambda tag, args: f"{tag} OK logged in\r\n".encode(),
        "LIST": lambda tag, args: f'* LIST () "/" INBOX\r\n{tag} OK done\r\n'.encode(),
        "STATUS": lambda tag, args: (f"* STATUS INBOX (UIDVALIDITY 77 UIDNEXT 3 MESSAGES 2)\r\n"
                                     f"{tag} OK done\r\n").encode(),
        "EXAMINE": lambda tag, args: (f"* 2 EXISTS\r\n* OK [UIDVALIDITY 77] v\r\n* OK [UIDNEXT 3] n\r\n"
                                      f"{tag} OK [READ-ONLY] done\r\n").encode(),
        "UID SEARCH": lambda tag, args: f"* SEARCH 1 2\r\n{tag} OK done\r\n".encode(),
        "UID FETCH": lambda tag, args: (f'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "01-Jan-2024 00:00:00 +0000" '
                                        f"RFC822.SIZE 10)\r\n{tag} OK done\r\n").encode(),
        "LOGOUT": lambda tag, args: f"* BYE\r\n{tag} OK bye\r\n".encode(),
    }

    def folder(self):
        from postroom import importer_imap

        server = importer_imap.Server(tls=True, host="localhost", port=self.port, user="u")
        imap = importer_imap.connect(server, "password", self.cafile)
        (inbox,) = importer_imap.folders(imap, f"localhost:{self.port}")
        return imap, inbox

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def fake_imap(tmp_path):
    server = FakeIMAP(tmp_path)
    yield server
    server.close()


def finished_within(seconds: float, function) -> tuple[bool, object]:
    """(whether function() returned or raised within `seconds`, its result or exception)."""
    import threading

    out: list = []

    def run() -> None:
        try:
            out.append(function())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive(), out[0] if out else None)


def test_a_folder_of_200000_messages_is_listed_despite_imaplib_s_line_limit(fake_imap):
    """UID SEARCH ALL answers in one line: 200,000 UIDs are more than imaplib's 1 MB limit,
    and the import of a big (legitimate) archive folder stopped with "got more than 1000000
    bytes"."""
    count = 200_000
    fake_imap.answers["UID SEARCH"] = lambda tag, args: (
        b"* SEARCH " + " ".join(map(str, range(1, count + 1))).encode() + f"\r\n{tag} OK done\r\n".encode())
    imap, inbox = fake_imap.folder()
    asked: list[int] = []
    assert list(inbox.messages(lambda key, uid: asked.append(uid) or True)) == []  # all in already
    assert len(asked) == count and inbox.count == count


def test_a_literal_bigger_than_asked_for_ends_the_import_at_once(fake_imap):
    """A body piece of 1 MiB is asked for; the server announces 10 GB. imaplib would read
    it whole into memory (a MemoryError, or as much as the server sends)."""
    from postroom.importer_source import SourceError

    async def endless(tag, args, writer):
        if "BODY.PEEK" not in args:
            writer.write(FakeIMAP.DEFAULT["UID FETCH"](tag, args))
            return
        writer.write(b"* 1 FETCH (UID 1 BODY[]<0> {10000000000}\r\n")
        for _ in range(200):  # 12 MB, then silence: a client that reads it all is stuck
            writer.write(b"x" * 65536)
            await writer.drain()

    fake_imap.answers["UID FETCH"] = endless
    imap, inbox = fake_imap.folder()
    (message,) = inbox.messages(lambda key, uid: False)
    done, result = finished_within(10, lambda: b"".join(message.chunks()))
    assert done and isinstance(result, SourceError), result
    assert "a literal of 10000000000 bytes" in str(result)


def test_an_answer_that_trickles_for_ever_ends_in_command_time(fake_imap, monkeypatch):
    """A byte every 50 ms: no socket timeout ever fires, and the import waited for ever."""
    from postroom import importer_imap
    from postroom.importer_source import SourceError

    monkeypatch.setattr(importer_imap, "COMMAND_TIME", 1.0, raising=False)

    async def trickle(tag, args, writer):
        if "BODY.PEEK" not in args:
            writer.write(FakeIMAP.DEFAULT["UID FETCH"](tag, args))
            return
        writer.write(b"* 1 FETCH (UID 1 BODY[]<0> {10}\r\nSubj")
        for _ in range(400):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    fake_imap.answers["UID FETCH"] = trickle
    imap, inbox = fake_imap.folder()
    (message,) = inbox.messages(lambda key, uid: False)
    started = time.monotonic()
    done, result = finished_within(10, lambda: b"".join(message.chunks()))
    assert done and isinstance(result, SourceError), result
    assert "no complete answer in 1 s" in str(result) and time.monotonic() - started < 3


# -- a hostile mbox ------------------------------------------------------------------------------------------


def test_a_long_from_line_costs_no_more_than_a_short_one():
    """Each word of a From_ line was a place to try strptime at: a 64 KiB line of one-letter
    words took 0.3 s (a 100 MB mbox of such lines, eight minutes of CPU)."""
    from postroom.importer_mbox import _separator_date

    assert _separator_date(b"From a@b Mon Jan  1 00:00:00 2024\n") == 1704067200.0
    hostile = b"From " + b"a " * 32_000  # a piece of the line: the importer reads 64 KiB at a time
    started = time.process_time()
    for _ in range(10):
        assert _separator_date(hostile) is None
    assert time.process_time() - started < 0.1  # before: 0.9 s and more


def test_a_hostile_mbox_is_one_line_or_imported_with_its_nul_bytes_and_long_lines(target, tmp_path):
    """No From_ line at the start: one line. NUL bytes and a line of 3 MiB with no end:
    imported as they are, a piece at a time."""
    junk = tmp_path / "junk.mbox"
    junk.write_bytes(b"\x00\x00garbage\nFrom a@b Mon Jan  1 00:00:00 2024\n\nx\n")
    done = target(junk)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not an mbox file" in done.stderr, done.stderr
    source = tmp_path / "hostile.mbox"
    long_line = b"y" * (3 << 20)
    source.write_bytes(b"From a@b Mon Jan  1 00:00:00 2024\nSubject: nul\x00here\n\nbody\x00\x00\n\n"
                       b"From " + b"z" * (3 << 20) + b"\nSubject: long\n\n" + long_line)
    done = target(source)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    got = sorted(bodies(target.data_dir).values(), key=len)
    assert got == [b"Subject: nul\x00here\r\n\r\nbody\x00\x00\r\n", b"Subject: long\r\n\r\n" + long_line]


def test_untagged_lines_without_end_stop_at_the_answer_limit(fake_imap, monkeypatch):
    """imaplib keeps every untagged line until the command ends: "* OK" lines sent without
    end grew the importer's memory for as long as the server liked."""
    from postroom import importer_imap
    from postroom.importer_source import SourceError

    monkeypatch.setattr(importer_imap, "MAX_ANSWER", 4 << 20, raising=False)

    async def flood(tag, args, writer):
        for _ in range(3000):  # 12 MiB at most, then silence
            writer.write(b"* OK flood " + b"x" * 4000 + b"\r\n")
            await writer.drain()

    fake_imap.answers["UID SEARCH"] = flood
    imap, inbox = fake_imap.folder()
    done, result = finished_within(10, lambda: list(inbox.messages(lambda key, uid: False)))
    assert done and isinstance(result, SourceError), result
    assert "an answer of more than 4194304 bytes" in str(result)


def test_a_uidlist_of_one_enormous_line_is_read_a_piece_at_a_time(tmp_path):
    """A dovecot-uidlist is the user's file: one line of 64 MiB was read whole into memory
    (any size: a file of gigabytes would have been). Lines past 64 KiB are skipped."""
    import resource

    from postroom import importer_maildir

    source = maildir(tmp_path / "Maildir", {"1001.host:2,S": b"Subject: a\n\nx\n",
                                            "1002.host:2,": b"Subject: b\n\ny\n"})
    with open(source / "dovecot-uidlist", "wb") as uidlist:
        uidlist.write(b"3 V1234 N20\n5 :1001.host\n9 ")
        chunk = b"z" * (1 << 20)
        for _ in range(64):
            uidlist.write(chunk)
        uidlist.write(b"\n6 :1002.host\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (inbox,) = importer_maildir.folders(source)
    got = {m.key: m.uid for m in inbox.messages(lambda key, uid: False)}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert got == {"maildir:1001.host": 5, "maildir:1002.host": 6}
    assert grown < 32 << 10, f"{grown} KiB more"


def test_a_body_whose_pieces_never_end_stops_at_the_message_limit(fake_imap, monkeypatch):
    """Partial fetches go on while each piece comes back full: a server that answers every
    offset with a full piece (and no RFC822.SIZE) was read until the disk was full."""
    from postroom import importer_imap

    monkeypatch.setattr(importer_imap, "MAX_MESSAGE", 3 << 20, raising=False)
    piece = importer_imap.PIECE

    async def endless(tag, args, writer):
        if "BODY.PEEK" not in args:
            writer.write(f"* 1 FETCH (UID 1 FLAGS ())\r\n{tag} OK done\r\n".encode())
            return
        writer.write(b"* 1 FETCH (UID 1 BODY[]<0> {%d}\r\n" % piece + b"x" * piece + f")\r\n{tag} OK done\r\n".encode())

    fake_imap.answers["UID FETCH"] = endless
    imap, inbox = fake_imap.folder()
    (message,) = inbox.messages(lambda key, uid: False)
    read = []

    def take() -> None:
        for chunk in message.chunks():
            read.append(len(chunk))
            if sum(read) > 64 * piece:
                return

    done, result = finished_within(20, take)
    assert done and isinstance(result, OSError), result
    assert "more than 3145728 bytes" in str(result) and sum(read) <= 3 * piece
