"""The inbound MX agent, as other MTAs meet it: `postroom serve` on loopback, driven by
smtplib, swaks and raw sockets; every stored result checked through the storage API."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from conftest import add_accounts, client_tls_context, start_daemon, start_module_daemon
from procs import processes
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery"
_tests = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `postroom serve` for the tests that need no daemon of their own (starting one
    for each cost more than most of them take); each test has accounts of its own (`mx`),
    so none sees another's mail."""
    daemon = start_module_daemon(tmp_path_factory.mktemp("mx"))
    add_accounts(daemon.config_path)
    daemon.store = Store(open_data_dir(daemon.config.server.data_dir, 4))
    yield daemon
    daemon.store.close()
    assert daemon.stop() == 0, daemon.stderr()


class MX:
    """The module's daemon as one test sees it: users `alice` and `bob`, `team` (an alias of
    both) and `fwd` (a forward to someone@remote.example) in example.test, of this test
    alone; `log()` is what the daemon logged since the test began."""

    def __init__(self, daemon, n: int):
        self.daemon = daemon
        self.alice, self.bob = f"alice{n}@example.test", f"bob{n}@example.test"
        self.team, self.fwd = f"team{n}@example.test", f"fwd{n}@example.test"
        self._log_start = len(daemon.stderr())

    def __getattr__(self, name: str):
        return getattr(self.daemon, name)

    def log(self) -> str:
        return self.daemon.stderr()[self._log_start:]


@pytest.fixture
def mx(server):
    view = MX(server, next(_tests))
    add_accounts(server.config_path, PASSWORD, [view.alice, view.bob],
                 {view.team: [view.alice, view.bob], view.fwd: ["someone@remote.example"]}, domains=())
    return view


def smtp(daemon) -> smtplib.SMTP:
    address = daemon.listen("smtp.listen")
    client = smtplib.SMTP(address.host, address.port, timeout=30)
    client.ehlo("client.example.org")
    return client


def inbox(daemon, account: str) -> list[bytes]:
    store = daemon.store
    return [store.read_message(m) for m in store.fetch(account, "INBOX", [(1, 2**32 - 1)])]


def concurrently(fn, count: int, timeout: float) -> list[str]:
    """Run fn(0..count-1) in as many threads at once; the exceptions they raised, as text."""
    failures: list[str] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except Exception as e:  # collected for the caller to assert on
            failures.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return failures


def raw_session(daemon, script: bytes, *, read_until: bytes = b"221", timeout: float = 10) -> str:
    """Send `script` in one write and read replies until `read_until` appears."""
    address = daemon.listen("smtp.listen")
    with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
        received = sock.recv(4096)
        sock.sendall(script)
        while read_until not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received.decode("utf-8", "replace")


def test_plain_delivery_stores_exact_bytes_once(mx):
    body = b"Subject: plain\r\nMessage-ID: <plain@example.org>\r\n\r\nhello\r\n..dot line\r\n"
    with smtp(mx) as client:
        assert client.sendmail("sender@example.org", [mx.alice], body) == {}
    (stored,) = inbox(mx, mx.alice)
    assert stored.startswith(b"Return-Path: <sender@example.org>\r\nReceived: from client.example.org ([127.0.0.1])")
    assert b"with ESMTP id " in stored and f"for <{mx.alice}>;".encode() in stored
    # smtplib dot-stuffs the leading dots on the wire; the store has the message as it was written.
    assert stored.endswith(body)


def test_starttls_delivery_records_tls_in_received(mx):
    with smtp(mx) as client:
        client.starttls(context=client_tls_context(mx.config))
        client.ehlo("client.example.org")
        assert client.sendmail("sender@example.org", [mx.bob], b"Subject: tls\r\n\r\nsecret\r\n") == {}
    (stored,) = inbox(mx, mx.bob)
    assert b"with ESMTPS id" in stored and b"(using TLSv1." in stored and b"with cipher " in stored


def test_one_copy_per_mailbox_for_several_recipients(mx):
    with smtp(mx) as client:
        tagged = mx.alice.split("@")[0].upper() + "+news@example.test"  # ALICE7+news@example.test
        recipients = [mx.alice, tagged, mx.team, mx.bob]
        refused = client.sendmail("s@example.org", recipients, b"Subject: m\r\n\r\nx\r\n")
    assert refused == {}
    assert len(inbox(mx, mx.alice)) == 1 and len(inbox(mx, mx.bob)) == 1


def test_8bit_and_smtputf8_are_stored_byte_exact(mx):
    body = "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄrger über Öl\r\n".encode()
    with smtp(mx) as client:
        client.sendmail("jörg@example.org", [mx.alice], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    (stored,) = inbox(mx, mx.alice)
    assert stored.endswith(body) and "Return-Path: <jörg@example.org>".encode() in stored


@pytest.mark.parametrize("recipient, code", [
    ("nobody@example.test", 550), ("someone@elsewhere.example", 554), ("{alice}%elsewhere.example@example.test", 553),
    ("elsewhere.example!{alice}@example.test", 553), ('"{alice}@elsewhere.example"@example.test', 553),
    ("a" * 65 + "@example.test", 553),
])
def test_refused_recipients(mx, recipient, code):
    recipient = recipient.format(alice=mx.alice.split("@")[0])  # a route to this test's alice
    with smtp(mx) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("s@example.org", [recipient], b"Subject: r\r\n\r\nx\r\n")
    assert refused.value.recipients[recipient][0] == code
    assert inbox(mx, mx.alice) == []


def test_source_route_relay_trick(mx):
    reply = raw_session(mx, b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<@example.test:user@elsewhere.example>\r\n"
                            b"QUIT\r\n")
    assert "501 5.1.3" in reply


def test_size_limits(mx):
    limit = mx.config.smtp.max_message_size
    reply = raw_session(mx, f"EHLO c\r\nMAIL FROM:<s@example.org> SIZE={limit + 1}\r\nQUIT\r\n".encode())
    assert "552 5.3.4" in reply
    # Without SIZE= the limit holds while receiving; the session stays usable afterwards.
    big = b"x" * 998 + b"\r\n"
    rcpt = f"RCPT TO:<{mx.alice}>\r\n".encode()
    reply = raw_session(mx, b"EHLO c\r\nMAIL FROM:<s@example.org>\r\n" + rcpt + b"DATA\r\n"
                        + big * (limit // 1000 + 2)
                        + b".\r\nMAIL FROM:<s@example.org>\r\n" + rcpt
                        + b"DATA\r\nSubject: small\r\n\r\nx\r\n.\r\nQUIT\r\n", timeout=60)
    assert "552 5.3.4" in reply and "250 2.0.0 OK: queued as" in reply
    (stored,) = inbox(mx, mx.alice)
    assert stored.endswith(b"Subject: small\r\n\r\nx\r\n")
    with smtp(mx) as client:  # smtplib announces SIZE= itself: refused at MAIL
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("s@example.org", [mx.alice], b"Subject: big\r\n\r\n" + b"x" * (limit + 10))
    assert refused.value.smtp_code == 552


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"])
def test_smtp_smuggling_is_refused(mx, smuggle):
    script = (f"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<{mx.alice}>\r\nDATA\r\n".encode()
              + b"Subject: first\r\n\r\nbody" + smuggle
              + f"MAIL FROM:<evil@example.org>\r\nRCPT TO:<{mx.bob}>\r\n".encode()
              + b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nQUIT\r\n")
    reply = raw_session(mx, script)
    assert "550 5.6.11" in reply
    assert inbox(mx, mx.alice) == [] and inbox(mx, mx.bob) == []


def test_pipelined_commands_after_starttls_are_discarded(mx):
    address = mx.listen("smtp.listen")
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        sock.recv(4096)
        sock.sendall(b"EHLO c\r\n")
        assert b"STARTTLS" in sock.recv(4096)
        sock.sendall(f"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<{mx.alice}>\r\n".encode())
        assert sock.recv(4096).startswith(b"220 2.0.0")
        tls = client_tls_context(mx.config).wrap_socket(sock, server_hostname="mail.example.test")
        tls.sendall(f"RCPT TO:<{mx.alice}>\r\n".encode())
        # Had the injected MAIL run, this RCPT would be accepted; the session starts over.
        assert tls.recv(4096).startswith(b"503 5.5.1")
        tls.sendall(b"QUIT\r\n")
        tls.recv(4096)


def test_mail_loop_is_refused(mx):
    headers = b"".join(b"Received: from hop%d\r\n" % i for i in range(101))
    with smtp(mx) as client:
        with pytest.raises(smtplib.SMTPDataError) as loop:
            client.sendmail("s@example.org", [mx.alice], headers + b"Subject: loop\r\n\r\nx\r\n")
    assert loop.value.smtp_code == 554 and b"5.4.6" in loop.value.smtp_error
    # The same message in BDAT chunks (RFC 3030), the header cut mid-field.
    message = headers + b"Subject: loop\r\n\r\nx\r\n"
    with smtp(mx) as client:
        assert client.mail("s@example.org")[0] == 250 and client.rcpt(mx.alice)[0] == 250
        client.send(b"BDAT 1005\r\n" + message[:1005])
        assert client.getreply()[0] == 250
        client.send(f"BDAT {len(message) - 1005} LAST\r\n".encode() + message[1005:])
        code, text = client.getreply()
    assert code == 554 and text.startswith(b"5.4.6")
    assert [m for m in inbox(mx, mx.alice) if b"Subject: loop" in m] == []


def test_over_quota(mx, cli):
    assert cli("user", "quota", mx.bob, "1K", config=mx.config_path).returncode == 0
    with smtp(mx) as client:
        # Under quota at RCPT, over it once the message is in: refused at the end of data.
        with pytest.raises(smtplib.SMTPDataError) as too_much:
            client.sendmail("s@example.org", [mx.bob], b"Subject: q\r\n\r\n" + b"y" * 2000 + b"\r\n")
        assert (too_much.value.smtp_code, too_much.value.smtp_error) == (452, b"4.2.2 Mailbox full")
        assert cli("user", "quota", mx.bob, "0", config=mx.config_path).returncode == 0
        assert client.sendmail("s@example.org", [mx.bob], b"Subject: q\r\n\r\n" + b"y" * 2000) == {}
        assert cli("user", "quota", mx.bob, "1K", config=mx.config_path).returncode == 0
        # Full: refused at RCPT already.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as full:
            client.sendmail("s@example.org", [mx.bob], b"Subject: q2\r\n\r\nx\r\n")
    assert full.value.recipients[mx.bob][:2] == (452, b"4.2.2 Mailbox full")
    assert len(inbox(mx, mx.bob)) == 1


def test_account_changes_apply_to_the_next_recipient(mx, cli):
    """A change the CLI commits applies to the very next RCPT of an open session."""
    with smtp(mx) as client:
        assert client.rcpt(mx.bob)[0] == 503  # no MAIL yet: only checks the session works
        client.mail("s@example.org")
        assert client.rcpt(mx.bob)[0] == 250
        assert cli("user", "remove", mx.bob, config=mx.config_path).returncode == 0
        assert client.rcpt(mx.bob)[0] == 550
        assert cli("alias", "add", mx.bob, mx.alice, config=mx.config_path).returncode == 0
        assert client.rcpt(mx.bob)[0] == 250
        client.data(b"Subject: to the new alias\r\n\r\nx\r\n")
    assert len(inbox(mx, mx.alice)) == 1


def test_errors_and_unknown_commands(mx):
    script = b"X" * 600 + b"\r\nFROB\r\nRCPT TO:<a@example.test>\r\n" + b"FROB\r\n" * 8
    reply = raw_session(mx, script, read_until=b"421")
    assert "500 5.5.2" in reply and "500 5.5.1" in reply and "503 5.5.1" in reply
    assert reply.rstrip().endswith("421 4.7.0 Too many errors, closing connection")


def test_fifty_concurrent_clients(mx):
    def send(i: int) -> None:
        with smtp(mx) as client:
            client.sendmail("s@example.org", [mx.alice], f"Subject: c{i}\r\n\r\nbody {i}\r\n".encode())

    assert concurrently(send, 50, timeout=60) == []
    stored = inbox(mx, mx.alice)
    assert sorted(int(m.split(b"body ")[1].split(b"\r\n")[0]) for m in stored) == list(range(50))


def test_swaks(mx):
    assert shutil.which("swaks"), "swaks is installed by the Makefile"
    address = mx.listen("smtp.listen")
    result = subprocess.run(["swaks", "--to", mx.alice, "--from", "s@example.org",
                             "--server", f"{address.host}:{address.port}", "--helo", "swaks.example.org",
                             "--header", "Subject: from swaks"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK: queued as" in result.stdout
    (stored,) = inbox(mx, mx.alice)
    assert b"Subject: from swaks" in stored and b"Received: from swaks.example.org" in stored


def test_mtad_runs_only_the_smtp_agents(config_path, tmp_path):
    """`mtad --config FILE` starts the SMTP listeners the way `postroom serve` does."""
    import os
    import signal
    import time

    from conftest import BIN

    process = subprocess.Popen([str(BIN / "mtad"), "--config", str(config_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        config = __import__("conf").load(config_path)
        address = config.smtp.listen[0]
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((address.host, address.port), timeout=2) as sock:
                    assert sock.recv(100).startswith(b"220 mail.example.test ESMTP")
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.1)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    assert "SMTP (MX)" in out and "IMAP" not in out


def test_timeout_and_connection_limits(write_config, tmp_path):
    from conftest import start_daemon

    path = write_config("limits.toml", smtp={"timeout": "1s", "max_connections_per_ip": 2, "max_connections": 10})
    daemon = start_daemon(path, tmp_path)
    try:
        address = daemon.listen("smtp.listen")
        first = socket.create_connection((address.host, address.port), timeout=10)
        second = socket.create_connection((address.host, address.port), timeout=10)
        assert first.recv(100).startswith(b"220") and second.recv(100).startswith(b"220")
        with socket.create_connection((address.host, address.port), timeout=10) as third:
            assert third.recv(100) == b"421 4.7.0 Too many connections, try again later\r\n"
        # Silent for longer than the timeout: told so, then disconnected.
        assert first.recv(100) == b"421 4.4.2 Timeout, closing connection\r\n"
        assert first.recv(100) == b""
        first.close()
        second.close()
        time.sleep(0.2)
        with socket.create_connection((address.host, address.port), timeout=10) as again:
            assert again.recv(100).startswith(b"220")  # the slots were given back
    finally:
        assert daemon.stop() == 0


def test_data_has_its_own_timeout(write_config, tmp_path):
    from conftest import start_daemon

    path = write_config("data_timeout.toml", smtp={"timeout": "3s", "data_timeout": "1s"})
    add_accounts(path, PASSWORD, ["alice@example.test"])
    daemon = start_daemon(path, tmp_path)
    try:
        address = daemon.listen("smtp.listen")
        with socket.create_connection((address.host, address.port), timeout=10) as sock:
            sock.recv(100)
            sock.sendall(b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\n")
            time.sleep(1.5)  # between commands: the 3 s timeout, not the data one
            sock.sendall(b"DATA\r\n")
            replies = b""
            while b"354" not in replies:
                replies += sock.recv(1000)
            started = time.monotonic()
            sock.sendall(b"Subject: stalled\r\n")
            rest = b""
            while b"421" not in rest:
                chunk = sock.recv(1000)
                if not chunk:
                    break
                rest += chunk
            assert b"421 4.4.2" in rest and time.monotonic() - started < 2.5
    finally:
        assert daemon.stop() == 0


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _child_pid(parent: int, name: str) -> int:
    """The pid of `postroom serve`'s child process `name` (mtad, imapd, pop3d)."""
    children = [pid for pid, p in processes().items() if p.parent == parent and p.name == name]
    assert len(children) == 1, f"{name} children of {parent}: {children}"
    return children[0]


@pytest.fixture
def fresh_mx(write_config, tmp_path, data_dir):
    """A daemon of this test's own, with alice and bob: for what other tests would disturb."""
    path = write_config()
    add_accounts(path, PASSWORD, ["alice@example.test", "bob@example.test"])
    daemon = start_daemon(path, tmp_path)
    daemon.store = Store(open_data_dir(data_dir, 4))
    yield daemon
    daemon.store.close()
    assert daemon.stop() == 0, daemon.stderr()


def test_big_messages_at_once_do_not_grow_mtad_by_their_size(fresh_mx):
    """Message data goes straight into the store's file as it arrives, and the message is
    parsed from that file a window at a time: ten 20 MB messages at once must not grow the
    mtad process by even one of them (it held each whole, two at a time, before). A daemon
    of its own: VmHWM is the peak over mtad's whole life, other tests' mail included."""
    import base64

    mx = fresh_mx

    attachment = base64.encodebytes(os.urandom(14_500_000))
    message = (b"Subject: big attachment\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
               b"--B\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
               b"--B\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=data.bin\r\n\r\n"
               + attachment.replace(b"\n", b"\r\n") + b"--B--\r\n")
    assert 19_500_000 < len(message) < mx.config.smtp.max_message_size
    pid = _child_pid(mx.process.pid, "mtad")
    with smtp(mx) as client:  # warm up: the first delivery loads what every later one shares
        client.sendmail("s@example.org", ["bob@example.test"], b"Subject: warm\r\n\r\nx\r\n")
    before = _rss_kib(pid, "VmRSS")

    def send(i: int) -> None:
        with smtp(mx) as client:
            client.sendmail("s@example.org", ["alice@example.test"], message)

    assert concurrently(send, 10, timeout=600) == []
    peak = _rss_kib(pid, "VmHWM")
    assert peak - before < 20_000, f"mtad grew from {before} KiB to a peak of {peak} KiB"
    infos = mx.store.fetch("alice@example.test", "INBOX", [(1, 2**32 - 1)])
    assert len(infos) == 10
    assert all(mx.store.read_message(i).endswith(message) for i in infos[:3])
    # The part's size leaves out its last CRLF: that belongs to the delimiter.
    assert infos[0].structure.parts[1].size == len(attachment.replace(b"\n", b"\r\n")) - 2


def test_ipv4_and_ipv6_listeners_side_by_side(write_config, tmp_path, data_dir):
    """[::]:25 and 0.0.0.0:25 coexist (IPv6 sockets are IPv6-only); here on loopback."""
    from conftest import free_port, start_daemon

    port = free_port()
    path = write_config("dual.toml", smtp={"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                                           "max_connections_per_ip": 200})
    add_accounts(path, PASSWORD, ["alice@example.test"])
    daemon = start_daemon(path, tmp_path)
    try:
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP(host, port, timeout=30) as client:
                client.sendmail("s@example.org", ["alice@example.test"], f"Subject: via {host}\r\n\r\nx\r\n".encode())
        with Store(open_data_dir(data_dir, 4)) as store:
            stored = [store.read_message(m) for m in store.fetch("alice@example.test", "INBOX", [(1, 10)])]
        assert len(stored) == 2 and b"([::1])" in stored[1] and b"([127.0.0.1])" in stored[0]
    finally:
        assert daemon.stop() == 0


@contextlib.contextmanager
def broken_inbox(store: Store, account: str):
    """Every delivery to the account's INBOX fails while inside: its index record is damaged
    (as a bad sector would leave it), and mended on the way out."""
    from storage.shard import pack_u32

    shard = store.shard(account)
    key = pack_u32(store.mailbox(account, "INBOX").id)
    with shard.env.begin(write=True) as txn:
        good = txn.get(key, db=shard.db["mailboxes"])
        txn.put(key, b"\xff damaged", db=shard.db["mailboxes"])
    try:
        yield
    finally:
        with shard.env.begin(write=True) as txn:
            txn.put(key, good, db=shard.db["mailboxes"])


def test_a_storage_failure_is_451_never_250(mx):
    with smtp(mx) as client:
        client.sendmail("s@example.org", [mx.alice], b"Subject: first\r\n\r\nx\r\n")
    with broken_inbox(mx.store, mx.alice):
        with smtp(mx) as client:
            with pytest.raises(smtplib.SMTPDataError) as failed:
                client.sendmail("s@example.org", [mx.alice, mx.bob], b"Subject: 2\r\n\r\nx\r\n")
        assert failed.value.smtp_code == 451 and failed.value.smtp_error.startswith(b"4.3.0")
        assert "Traceback" not in failed.value.smtp_error.decode()
        # Bob's copy was taken back: the sender's retry must not give him the message twice.
        assert [m for m in inbox(mx, mx.bob) if b"Subject: 2" in m] == []
    assert "event=store_failed" in mx.log()
    with smtp(mx) as client:  # the sender's retry
        client.sendmail("s@example.org", [mx.alice, mx.bob], b"Subject: 2\r\n\r\nx\r\n")
    assert len([m for m in inbox(mx, mx.bob) if b"Subject: 2" in m]) == 1


def test_a_client_gone_after_its_final_dot_still_gets_all_or_none(mx):
    """The sender hangs up right after the end of data, so it never hears our reply and will
    send again to everyone: the copy stored for Bob must be taken back when Alice's fails,
    even though the session that asked for them is gone."""
    with smtp(mx) as client:
        client.sendmail("s@example.org", [mx.alice, mx.bob], b"Subject: first\r\n\r\nx\r\n")
    with broken_inbox(mx.store, mx.alice):
        address = mx.listen("smtp.listen")
        with socket.create_connection((address.host, address.port), timeout=10) as raw:
            raw.sendall(f"EHLO c.example.org\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<{mx.alice}>\r\n"
                        f"RCPT TO:<{mx.bob}>\r\nDATA\r\n".encode())
            said = b""
            while b"\r\n354 " not in said:
                said += raw.recv(4096)
            raw.sendall(b"Subject: gone\r\n\r\nx\r\n.\r\n")
            raw.shutdown(socket.SHUT_RDWR)  # gone without reading the reply
        # Logged once the copies are withdrawn: store_failed_after_disconnect when the
        # session was gone first (the case this is about), store_failed when the delivery
        # failed before the server noticed the hang-up.
        deadline = time.monotonic() + 10
        while "event=store_failed" not in mx.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "event=store_failed" in mx.log()
        assert [m for m in inbox(mx, mx.bob) if b"Subject: gone" in m] == []


def test_a_message_sent_again_is_answered_250_and_stored_once(mx):
    """A sender that lost our 250 sends the message again (new Received:, new queue id):
    it hears 250 again and the mailbox keeps one copy (its Message-ID and the bytes it sent,
    [storage] dedupe_window). A recipient added the second time gets the message; another
    message under the same Message-ID (another Subject: a list's copy) is stored too."""
    message = b"Message-ID: <twice@example.org>\r\nSubject: twice\r\n\r\nonly once please\r\n"
    with smtp(mx) as client:
        assert client.sendmail("s@example.org", [mx.alice], message) == {}
    with smtp(mx) as client:
        assert client.sendmail("s@example.org", [mx.alice, mx.bob], message) == {}
    assert len(inbox(mx, mx.alice)) == 1
    assert len(inbox(mx, mx.bob)) == 1
    line = next(line for line in mx.log().splitlines() if "event=message_duplicate" in line)
    assert "message_id=<twice@example.org>" in line and f"mailboxes={mx.alice}" in line
    with smtp(mx) as client:
        assert client.sendmail("s@example.org", [mx.alice],
                               message.replace(b"Subject: twice", b"Subject: [list] twice")) == {}
    assert len(inbox(mx, mx.alice)) == 2
    # Without a Message-ID two sendings are two messages.
    with smtp(mx) as client:
        for _ in range(2):
            client.sendmail("s@example.org", [mx.bob], b"Subject: no id\r\n\r\nsame\r\n")
    assert len([m for m in inbox(mx, mx.bob) if b"Subject: no id" in m]) == 2


def test_an_odd_ehlo_name_cannot_break_the_received_header(mx):
    """RFC 5321 §4.4: in Received:, ";" ends the from/by/with clauses and "(" opens a
    comment; an EHLO name carrying them (found by an attack) must not forge either."""
    raw_session(mx, b"EHLO x;by(evil)\"<q>\r\nMAIL FROM:<s@example.org>\r\n" + f"RCPT TO:<{mx.bob}>\r\n".encode()
                    + b"DATA\r\nSubject: odd helo\r\n\r\nx\r\n.\r\nQUIT\r\n")
    (stored,) = [m for m in inbox(mx, mx.bob) if b"Subject: odd helo" in m]
    assert b"Received: from x?by?evil???q? ([127.0.0.1])\r\n" in stored


def test_the_message_log_line_has_each_recipient_with_its_outcome(mx):
    with smtp(mx) as client:
        client.sendmail("s@example.org", [mx.alice, "nobody@example.test"], b"Subject: l\r\n\r\nx\r\n")
    line = next(line for line in mx.log().splitlines() if "event=message_accepted" in line)
    assert f"recipients={mx.alice}:250,nobody@example.test:550" in line
    assert "message_id=" in line and "size=" in line and "sender=s@example.org" in line and "qid=" in line


def test_several_worker_processes_share_the_port(write_config, tmp_path, data_dir):
    from conftest import start_daemon

    path = write_config("workers.toml", smtp={"workers": 3, "max_connections_per_ip": 200})
    add_accounts(path, PASSWORD, ["alice@example.test"])
    daemon = start_daemon(path, tmp_path)
    try:
        def children() -> list[int]:
            """The extra workers: children of serve's mtad process, which starts them."""
            table = processes()
            return [pid for pid, p in table.items() if b"--smtp-worker" in p.cmdline
                    and p.parent in table and table[p.parent].parent == daemon.process.pid]

        workers = children()
        assert len(workers) == 2
        # Bound already: mtad is ready once each worker has notified READY=1, after binding.
        sent = []

        def send(i: int) -> None:
            with smtp(daemon) as client:
                client.sendmail("s@example.org", ["alice@example.test"], f"Subject: w{i}\r\n\r\n{i}\r\n".encode())
                sent.append(i)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(sent) == 30
        with Store(open_data_dir(data_dir, 4)) as store:
            assert store.mailbox("alice@example.test", "INBOX").exists == 30
        connects = [line for line in daemon.stderr().splitlines() if "event=connect" in line]
        serving = {line.split(" pid=")[1].split()[0] for line in connects}
        assert len(serving) >= 2, "the kernel gave every connection to one process"
        # A worker that dies is started again.
        __import__("os").kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        now = children()  # one look at a time: the killed worker vanishes between two
        while time.monotonic() < deadline and (len(now) < 2 or workers[0] in now):
            time.sleep(0.2)
            now = children()
        assert len(now) == 2 and workers[0] not in now
        assert "event=worker_restarted" in daemon.stderr()
        workers = children()
    finally:
        assert daemon.stop() == 0
    assert all(not __import__("os").path.exists(f"/proc/{pid}/cmdline") or
               b"--smtp-worker" not in open(f"/proc/{pid}/cmdline", "rb").read() for pid in workers)
    assert "smtp_workers=3" in daemon.stderr()


def test_two_workers_delivering_to_fresh_shards_never_deadlock(write_config, tmp_path, data_dir):
    """Both processes open shards for the first time while the other commits to them: once,
    py-lmdb's open_db held the GIL while waiting for the other process's writer lock, and
    the two processes hung each other for good."""
    from conftest import start_daemon

    path = write_config("fresh_shards.toml", smtp={"workers": 2, "max_connections_per_ip": 200, "timeout": "20s"},
                        storage={"shards": 16})
    users = [f"u{i}@example.test" for i in range(16)]
    add_accounts(path, PASSWORD, users)
    daemon = start_daemon(path, tmp_path)
    try:
        # The load of bench/smtp_in.py that first hung it: 50 clients at once, every shard new.
        async def client(i: int) -> int:
            reader, writer = await asyncio.open_connection(address.host, address.port)
            accepted = 0
            try:
                await reader.readline()
                writer.write(b"EHLO bench.example.org\r\n")
                while not (await reader.readline())[3:4] == b" ":
                    pass
                for j in range(10):
                    writer.write(f"MAIL FROM:<b@example.org>\r\nRCPT TO:<{users[(i + j) % 16]}>\r\nDATA\r\n".encode())
                    replies = [await reader.readline() for _ in range(3)]
                    assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
                    writer.write(b"Subject: x\r\n\r\n" + b"y" * 4000 + b"\r\n.\r\n")
                    accepted += (await reader.readline()).startswith(b"250")
            finally:
                writer.close()
            return accepted

        async def run() -> list[int]:
            return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(50))), 60)

        address = daemon.listen("smtp.listen")
        assert sum(asyncio.run(run())) == 500
    finally:
        assert daemon.stop() == 0
