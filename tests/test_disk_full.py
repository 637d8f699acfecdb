"""A full disk is a normal day: every message that cannot be kept is answered 452 4.3.1
(RFC 3463 "mail system full"), whatever its size and wherever the space ran out (the message
file its chunks are written into as they arrive, its fsync, the index commit), nothing is
left half-written,
the session goes on, and mail flows again once space is freed.

The data dir is a small tmpfs the test mounts (the suite runs as root, as `make test` does on
a fresh Debian machine) and fills with a file of its own.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess

import pytest

from diskfill import fill
from conftest import add_accounts, start_daemon
from storage import open_data_dir
from storage.check import check
from storage.store import Store

PASSWORD = "correct horse battery"
ALICE = "alice@example.test"
SIZES = (1_000, 40_000, 100_000, 2_000_000)  # one chunk; one; several; big (committed in a thread)


@pytest.fixture
def small_disk(data_dir):
    assert os.geteuid() == 0, "mounting the test's tmpfs needs root (make test runs as root)"
    data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0750", "tmpfs", str(data_dir)], check=True)
    yield data_dir
    subprocess.run(["umount", "-l", str(data_dir)], check=True)


@pytest.fixture
def mx(small_disk, config_path, tmp_path):
    add_accounts(config_path, PASSWORD, [ALICE])
    daemon = start_daemon(config_path, tmp_path)
    daemon.store = Store(open_data_dir(small_disk, 4))
    daemon.store.ensure_account(ALICE)
    yield daemon
    daemon.store.close()
    assert daemon.stop() == 0


class Filler:
    """One file that takes all the space there is, and gives back as much as asked."""

    def __init__(self, directory):
        self.path = directory / "filler"

    def fill(self) -> None:
        fill(self.path.parent)

    def free(self, amount: int) -> None:
        size = self.path.stat().st_size
        os.truncate(self.path, max(0, size - amount))

    def remove(self) -> None:
        self.path.unlink()


def message(size: int, tag: str) -> bytes:
    head = f"From: bob@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@example.org>\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def send_data(daemon, raw: bytes) -> tuple[int, bytes]:
    address = daemon.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=60) as client:
        client.ehlo("client.example.org")
        client.mail("bob@example.org")
        client.rcpt(ALICE)
        code, text = client.data(raw)
        assert client.noop()[0] == 250, "the session goes on after the refusal"
        return code, text


def send_bdat(daemon, raw: bytes) -> tuple[int, bytes]:
    """The message in two BDAT chunks (RFC 3030), on a raw socket."""
    address = daemon.listen("smtp.listen")
    half = len(raw) // 2
    with socket.create_connection((address.host, address.port), timeout=60) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return lines[-1]

        reply()
        envelope = (b"EHLO client.example.org\r\n", b"MAIL FROM:<bob@example.org>\r\n",
                    f"RCPT TO:<{ALICE}>\r\n".encode())
        for command in envelope:
            sock.sendall(command)
            assert reply()[:3] == b"250"
        sock.sendall(f"BDAT {half}\r\n".encode() + raw[:half])
        assert reply()[:3] == b"250"
        sock.sendall(f"BDAT {len(raw) - half} LAST\r\n".encode() + raw[half:])
        last = reply()
        sock.sendall(b"NOOP\r\n")
        assert reply()[:3] == b"250", "the session goes on after the refusal"
        return int(last[:3]), last[4:].strip()


def nothing_half_written(daemon) -> None:
    data_dir = daemon.config.server.data_dir
    assert check(daemon.store) == []
    leftovers = [p for p in (data_dir / "shards").glob("*/tmp/*/*")]
    assert leftovers == [], f"files of refused messages left behind: {leftovers}"
    assert not (data_dir / "spool").exists(), "messages go straight into the store: no spool"


@pytest.mark.parametrize("send", [send_data, send_bdat], ids=["DATA", "BDAT"])
def test_a_full_disk_is_452_for_every_size(mx, send):
    filler = Filler(mx.config.server.data_dir)
    filler.fill()
    for size in SIZES:
        code, text = send(mx, message(size, f"full-{size}"))
        assert (code, text[:5]) == (452, b"4.3.1"), f"{size} bytes: {code} {text!r}"
    assert mx.store.mailbox(ALICE, "INBOX").exists == 0
    nothing_half_written(mx)
    assert "Traceback" not in mx.stderr()
    filler.remove()
    for size in SIZES:
        assert send(mx, message(size, f"after-{size}"))[0] == 250
    stored = [mx.store.read_message(m) for m in mx.store.fetch(ALICE, "INBOX", [(1, 2**32 - 1)])]
    assert len(stored) == len(SIZES)
    assert all(raw.endswith(message(size, f"after-{size}")) for raw, size in zip(stored, SIZES, strict=True))


def test_wherever_the_space_runs_out_the_answer_is_250_or_452(mx):
    """With a little space left, some messages fit and some do not, and the space runs out
    in every phase in turn (the message file, its fsync, the index commit): each answer is
    250, with the message stored whole, or 452 4.3.1 with nothing of it kept."""
    filler = Filler(mx.config.server.data_dir)
    filler.fill()
    accepted = {}
    answers = set()
    for free in (8 << 10, 32 << 10, 128 << 10, 512 << 10):
        filler.free(free)
        for size in (1_000, 30_000, 100_000, 400_000):
            tag = f"f{free}-s{size}"
            code, text = send_data(mx, message(size, tag))
            assert code == 250 or (code, text[:5]) == (452, b"4.3.1"), f"{tag}: {code} {text!r}"
            answers.add(code)
            if code == 250:
                accepted[tag] = message(size, tag)
        filler.fill()
    assert answers == {250, 452}, "the sweep should see both outcomes"
    stored = {m.envelope.subject: mx.store.read_message(m)
              for m in mx.store.fetch(ALICE, "INBOX", [(1, 2**32 - 1)])}
    assert set(stored) == set(accepted)
    assert all(stored[tag].endswith(raw) for tag, raw in accepted.items())
    nothing_half_written(mx)
    assert "Traceback" not in mx.stderr()


def test_imap_append_on_a_full_disk_is_no_overquota(mx):
    import imaplib

    from conftest import client_tls_context

    filler = Filler(mx.config.server.data_dir)
    filler.fill()
    address = mx.listen("imap.listen")
    with imaplib.IMAP4(address.host, address.port) as imap:
        imap.starttls(ssl_context=client_tls_context(mx.config))
        imap.login(ALICE, PASSWORD)
        for size in SIZES:
            status, data = imap.append("INBOX", None, None, message(size, f"append-{size}"))
            assert (status, data) == ("NO", [b"[OVERQUOTA] not enough disk space"]), size  # no library text
        nothing_half_written(mx)
        filler.remove()
        assert imap.append("INBOX", None, None, message(1_000, "appended"))[0] == "OK"
