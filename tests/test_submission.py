"""The submission agent as mail clients meet it: `postroom serve` on loopback, driven by
smtplib (STARTTLS on the submission port, implicit TLS on the submissions port), swaks and
raw sockets; what was stored is read back over IMAP, as the recipient's client would."""

from __future__ import annotations

import base64
import imaplib
import itertools
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SharedDaemon, add_accounts, client_tls_context, start_daemon, start_module_daemon
from procs import processes
from storage import Accounts, parse_address

PASSWORD = "correct horse battery"
ALICE = object()  # submit()'s default: the daemon's alice
_tests = itertools.count(1)


class Sub(SharedDaemon):
    """A daemon as one test sees it: a domain of the test's own (`domain`) with alice, bob
    and carol, aliases that reach alice and a catch-all for carol; `stderr()` is what the
    daemon logged since the test began."""

    def __init__(self, daemon, domain: str):
        super().__init__(daemon)
        self.domain = domain
        _accounts(daemon.config_path, domain)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `postroom serve` for the tests that need no daemon of their own (starting one
    for each cost more than most of them take); each has a domain of its own (`sub`)."""
    daemon = start_module_daemon(tmp_path_factory.mktemp("submission"))
    yield daemon
    assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture
def sub(server):
    """The module's daemon, with a domain of this test's own: s7.example.test, ..."""
    return Sub(server, f"s{next(_tests)}.example.test")


@pytest.fixture
def fresh_sub(daemon):
    """A daemon of this test's own, with example.test: for a test that stops it, or that
    fails logins (they slow down every later failure from 127.0.0.1, policy/logins.py)."""
    return Sub(daemon, "example.test")


def _accounts(config_path: Path, domain: str = "example.test") -> None:
    """Made through the accounts API in this process, as `postroom user add` makes them: six
    CLI processes cost each test seconds (the commands have their own tests, test_cli.py)."""
    add_accounts(config_path, PASSWORD, [f"{user}@{domain}" for user in ("alice", "bob", "carol")],
                 {f"team@{domain}": [f"alice@{domain}", f"bob@{domain}"], f"sales@{domain}": [f"team@{domain}"],
                  f"@{domain}": [f"carol@{domain}"]}, domains=(domain,))


def submit(daemon, user=ALICE, *, implicit_tls: bool = False) -> smtplib.SMTP:
    """A client logged in as `user` (None: not logged in), alice@ of the test's domain by
    default: STARTTLS on [submission] listen, or TLS from the start on listen_tls."""
    if user is ALICE:
        user = f"alice@{daemon.domain}"
    context = client_tls_context(daemon.config)
    if implicit_tls:
        address = daemon.listen("submission.listen_tls")
        client = smtplib.SMTP_SSL(address.host, address.port, timeout=30, context=context)
        client.ehlo("laptop.example.org")
    else:
        address = daemon.listen("submission.listen")
        client = smtplib.SMTP(address.host, address.port, timeout=30)
        client.ehlo("laptop.example.org")
        client.starttls(context=context)
        client.ehlo("laptop.example.org")
    if user is not None:
        client.login(user, PASSWORD)
    return client


def wrong_login(client: smtplib.SMTP, user: str = "alice@example.test") -> tuple[int, bytes, float]:
    """One AUTH PLAIN with a wrong password (smtplib's login() would try LOGIN after it):
    the reply and how long it took."""
    credentials = base64.b64encode(f"\0{user}\0wrong password".encode()).decode()
    started = time.monotonic()
    code, text = client.docmd("AUTH", f"PLAIN {credentials}")
    return code, text, time.monotonic() - started


def imap_inbox(daemon, user: str) -> list[bytes]:
    """Every message of the user's INBOX, read over IMAPS."""
    address = daemon.listen("imap.listen_tls")
    with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config),
                           timeout=30) as client:
        client.login(user, PASSWORD)
        client.select("INBOX", readonly=True)
        _, data = client.uid("SEARCH", "ALL")
        out = []
        for uid in data[0].split():
            _, fetched = client.uid("FETCH", uid, "(BODY.PEEK[])")
            out.append(fetched[0][1])
        return out


def message(sender: str | None = None, to: str | None = None, subject: str = "hello", extra: str = "",
            *, domain: str = "example.test") -> bytes:
    """From alice@`domain` to bob@`domain` unless told otherwise."""
    sender, to = sender or f"alice@{domain}", to or f"bob@{domain}"
    return (f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n"
            f"Hi there.\r\n").encode()


def header(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode()


def test_starttls_and_auth_on_the_submission_port_deliver_to_a_local_inbox(sub):
    with submit(sub) as client:
        assert "AUTH PLAIN LOGIN" in client.ehlo_resp.decode() or client.has_extn("auth")
        code, reply = client.docmd("NOOP")
        refused = client.sendmail(f"alice@{sub.domain}", [f"bob@{sub.domain}"], message(domain=sub.domain))
    assert refused == {}
    (stored,) = imap_inbox(sub, f"bob@{sub.domain}")
    head = header(stored)
    assert head.startswith(f"Return-Path: <alice@{sub.domain}>\r\nReceived: from laptop.example.org\r\n")
    # RFC 3848: ESMTPSA, the user, and (hide_client_ip, the default) not the client's address.
    assert "with ESMTPSA id " in head and f"(authenticated user alice@{sub.domain})" in head
    assert "127.0.0.1" not in head and "(using TLSv1." in head
    # RFC 6409 §8.2, §8.3: the client gave neither, so the server added both.
    assert re.search(r"\r\nDate: \w{3}, \d+ \w{3} \d{4} ", head)
    assert re.search(r"\r\nMessage-ID: <[^@>]+@mail\.example\.test>", head)
    # Added at the end of the header section, the client's bytes untouched before them.
    assert re.search(r"\r\nSubject: hello\r\nDate: [^\r]+\r\nMessage-ID: <[^>]+>$", head)
    assert stored.endswith(b"\r\n\r\nHi there.\r\n")
    log = sub.stderr()
    assert re.search(rf"event=login .*user=alice@{sub.domain}", log)
    line = next(line for line in log.splitlines() if "event=message_accepted" in line and "mtad.submission" in line)
    assert f"user=alice@{sub.domain}" in line and "qid=" in line


def test_implicit_tls_on_the_submissions_port(sub):
    given = "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <given@laptop.example.org>\r\n"
    with submit(sub, implicit_tls=True) as client:
        code, text = client.mail(f"alice@{sub.domain}")
        assert code == 250
        client.rcpt(f"bob@{sub.domain}")
        code, text = client.data(message(extra=given, domain=sub.domain))
    assert code == 250 and re.fullmatch(rb"2\.0\.0 OK: queued as \w+", text)
    (stored,) = imap_inbox(sub, f"bob@{sub.domain}")
    head = header(stored)
    assert head.count("Date: ") == 1 and head.count("Message-ID: ") == 1 and "<given@laptop.example.org>" in head
    assert "with ESMTPSA id " in head


def test_hide_client_ip_off_shows_the_address(write_config, tmp_path, cli):
    path = write_config("shown.toml", submission={"hide_client_ip": False})
    daemon = Sub(start_daemon(path, tmp_path), "example.test")
    try:
        with submit(daemon) as client:
            client.sendmail("alice@example.test", ["bob@example.test"], message())
        (stored,) = imap_inbox(daemon, "bob@example.test")
        assert "Received: from laptop.example.org ([127.0.0.1])" in header(stored)
    finally:
        assert daemon.stop() == 0


def test_auth_is_refused_before_tls(sub):
    address = sub.listen("submission.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("laptop.example.org")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        credentials = base64.b64encode(f"\0alice@{sub.domain}\0{PASSWORD}".encode()).decode()
        assert client.docmd("AUTH", f"PLAIN {credentials}") == (538, b"5.7.11 Encryption required for requested "
                                                                     b"authentication mechanism")
        code, text = client.mail(f"alice@{sub.domain}")
        assert (code, text) == (530, b"5.7.0 Authentication required")
    assert "event=login" not in sub.stderr()


def test_mail_before_auth_is_530_even_over_tls(sub):
    with submit(sub, user=None) as client:
        assert client.has_extn("auth")
        assert client.mail(f"alice@{sub.domain}") == (530, b"5.7.0 Authentication required")


def test_a_wrong_password_is_535_after_a_delay_that_grows(fresh_sub):
    sub = fresh_sub
    with submit(sub, user=None) as client:
        delays = []
        for _ in range(2):
            code, text, took = wrong_login(client)
            assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
            delays.append(took)
        assert delays[0] >= 0.9 and delays[1] >= 1.9  # 1 s, then 2 s (policy/logins.py)
        client.login(f"alice@{sub.domain}", PASSWORD)  # the same session may try again
    assert sub.stderr().count("event=login_failed") == 2


def test_auth_login_mechanism(sub):
    with submit(sub, user=None) as client:
        client.user, client.password = f"bob@{sub.domain}", PASSWORD
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
        assert client.sendmail(f"bob@{sub.domain}", [f"alice@{sub.domain}"], message(f"bob@{sub.domain}",
                                                                                     f"alice@{sub.domain}")) == {}


@pytest.mark.parametrize("sender", ["bob@{d}", "someone@example.org", "nobody@{d}", ""])
def test_a_sender_not_the_users_is_553(sub, sender):
    """Another user's address, another domain's, an unknown address of ours (which the
    catch-all takes for carol, not alice) and the null sender are all refused."""
    sender = sender.format(d=sub.domain)
    with submit(sub) as client:
        code, text = client.mail(sender)
        assert (code, text[:5]) == (553, b"5.7.1")
        assert client.mail(f"alice@{sub.domain}")[0] == 250  # the session goes on


@pytest.mark.parametrize("sender", ["alice@{d}", "ALICE+lists@{d}", "team@{d}", "sales@{d}"])
def test_the_users_addresses_are_taken(sub, sender):
    """The address, a sub-address of it, and aliases that reach the user (directly, or
    through another alias)."""
    sender = sender.format(d=sub.domain)
    with submit(sub) as client:
        assert client.sendmail(sender, [f"bob@{sub.domain}"], message(sender, domain=sub.domain)) == {}
    assert len(imap_inbox(sub, f"bob@{sub.domain}")) == 1


@pytest.mark.parametrize("from_field, code", [
    ("From: Bob <bob@{d}>", 553),
    ("From: Alice <alice@{d}>, Bob <bob@{d}>", 553),
    ('From: "alice@{d}" <bob@{d}>', 553),
    ("From: alice@{d})<bob@{d}>", 550),
    ("From: Alice <alice@{d}>\r\nFrom: Bob <bob@{d}>", 550),
    ("Subject: no From: at all", 550),
])
def test_a_from_field_not_the_users_is_refused_at_the_end_of_data(sub, from_field, code):
    from_field = from_field.format(d=sub.domain)
    body = f"{from_field}\r\nTo: bob@{sub.domain}\r\nSubject: s\r\n\r\nspoofed\r\n".encode()
    with submit(sub) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(f"alice@{sub.domain}", [f"bob@{sub.domain}"], body)
        assert refused.value.smtp_code == code
        assert refused.value.smtp_error.startswith(b"5.7.1" if code == 553 else b"5.6.0")
        # The session goes on, and a message in the user's own name passes.
        mine = message(subject="mine", domain=sub.domain)
        assert client.sendmail(f"alice@{sub.domain}", [f"bob@{sub.domain}"], mine) == {}
    (stored,) = imap_inbox(sub, f"bob@{sub.domain}")
    assert b"Subject: mine" in stored


def test_a_big_message_streams_through_with_its_header_checked(sub):
    body = message(extra="X-Filler: " + "y" * 900 + "\r\n", domain=sub.domain) + b"z" * 998 + b"\r\n"
    body = body * 1 + (b"line of body text\r\n" * 200_000)
    with submit(sub) as client:
        assert client.sendmail(f"alice@{sub.domain}", [f"bob@{sub.domain}", f"alice@{sub.domain}"], body) == {}
    (stored,) = imap_inbox(sub, f"bob@{sub.domain}")
    assert stored.endswith(b"line of body text\r\n" * 1000) and len(stored) > len(body)


def test_bdat_from_a_raw_client(sub):
    address = sub.listen("submission.listen_tls")
    context = client_tls_context(sub.config)
    credentials = base64.b64encode(f"\0alice@{sub.domain}\0{PASSWORD}".encode())
    chunk = message(subject="chunked", domain=sub.domain)
    with socket.create_connection((address.host, address.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="mail.example.test") as tls:
            script = (b"EHLO laptop.example.org\r\nAUTH PLAIN " + credentials + b"\r\n"
                      + f"MAIL FROM:<alice@{sub.domain}>\r\nRCPT TO:<bob@{sub.domain}> NOTIFY=NEVER\r\n".encode()
                      + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
            tls.sendall(script)
            said = b""
            while b"221 " not in said:
                data = tls.recv(65536)
                if not data:
                    break
                said += data
    assert b"235 2.7.0" in said and b"250 2.0.0 OK: queued as" in said, said
    (stored,) = imap_inbox(sub, f"bob@{sub.domain}")
    assert b"Subject: chunked" in stored and b"Message-ID: <" in stored


def test_swaks_as_a_real_client(sub):
    address = sub.listen("submission.listen")
    result = subprocess.run(["swaks", "--server", f"{address.host}:{address.port}", "--tls",
                             "--auth-user", f"alice@{sub.domain}", "--auth-password", PASSWORD,
                             "--from", f"alice@{sub.domain}", "--to", f"bob@{sub.domain}",
                             "--header", "Subject: from swaks", "--helo", "swaks.example.org"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout and "250 2.0.0 OK: queued as" in result.stdout
    (stored,) = imap_inbox(sub, f"bob@{sub.domain}")
    assert b"Subject: from swaks" in stored and b"with ESMTPSA" in stored
    # swaks writes its own Date: and Message-ID:, which are kept, once each.
    assert header(stored).lower().count("\r\nmessage-id:") == 1 and header(stored).count("\r\nDate:") == 1


def test_may_send_as(tmp_path):
    """Accounts.may_send_as, the rule behind both checks, on a real accounts database."""
    with Accounts(tmp_path / "accounts.lmdb") as accounts:
        accounts.add_domain("example.test")
        accounts.add_domain("other.test")
        for user in ("alice@example.test", "bob@example.test"):
            accounts.add_user(user, PASSWORD)
        accounts.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
        accounts.add_alias("ext@other.test", ["alice@example.test"])
        accounts.add_alias("away@example.test", ["someone@remote.example"])
        accounts.add_alias("@other.test", ["alice@example.test"])
        alice = parse_address("alice@example.test")
        for address in ("alice@example.test", "Alice@Example.TEST", "alice+x@example.test", "team@example.test",
                        "team+y@example.test", "ext@other.test"):
            assert accounts.may_send_as(alice, address), address
        for address in ("bob@example.test", "bob+alice@example.test", "away@example.test", "anyone@other.test",
                        "alice@remote.example", "alice", "", '"alice"@example.test'):
            assert not accounts.may_send_as(alice, address), address


def test_the_login_throttle_holds_across_worker_processes(write_config, tmp_path, cli):
    """With two mtad processes on the submission port (SO_REUSEPORT), failures counted by
    one slow down the next failure answered by the other: 1 s, 2 s, 4 s whatever process
    each lands on."""
    path = write_config("workers.toml", smtp={"workers": 2, "max_connections_per_ip": 200})
    daemon = Sub(start_daemon(path, tmp_path), "example.test")
    try:
        deadline = time.monotonic() + 15  # the second worker binds after READY
        while len([p for p in processes().values() if b"--smtp-worker" in p.cmdline]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1)
        # Connections are spread by the kernel: open a few, and see which process has each.
        clients, ports = [], []
        for _ in range(12):
            client = submit(daemon, user=None)
            clients.append(client)
            ports.append(client.sock.getsockname()[1])
        time.sleep(0.3)
        served = {}
        for line in daemon.stderr().splitlines():
            if "event=connect" in line and "logger=mtad.submission" in line:
                port = int(re.search(r" port=(\d+)", line).group(1))
                served[port] = re.search(r" pid=(\d+)", line).group(1)
        by_pid: dict[str, list[smtplib.SMTP]] = {}
        for client, port in zip(clients, ports, strict=True):
            by_pid.setdefault(served[port], []).append(client)
        assert len(by_pid) == 2, "the kernel gave every connection to one process"
        first, second = by_pid.values()
        order = [first[0], second[0], first[1] if len(first) > 1 else first[0]]
        delays = []
        for client in order:
            code, _, took = wrong_login(client)
            assert code == 535
            delays.append(took)
        # One table: 1 s, 2 s, 4 s. Counted per process it would be 1 s, 1 s, 2 s.
        assert delays[0] >= 0.9 and delays[1] >= 1.9 and delays[2] >= 3.9, delays
        failed = [line for line in daemon.stderr().splitlines() if "event=login_failed" in line]
        assert [re.search(r" delay=([\d.]+)", line).group(1) for line in failed] == ["1.0", "2.0", "4.0"]
        assert len({re.search(r" pid=(\d+)", line).group(1) for line in failed}) == 2
        for client in clients:
            client.close()
    finally:
        assert daemon.stop() == 0


def test_imap_failures_count_for_submission_too(fresh_sub):
    """One table for every daemon: a guesser gains nothing by switching protocol."""
    sub = fresh_sub
    address = sub.listen("imap.listen_tls")
    with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(sub.config),
                           timeout=30) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(f"alice@{sub.domain}", "wrong password")
    with submit(sub, user=None) as client:
        code, _, took = wrong_login(client)
        assert code == 535 and took >= 1.9


def test_serve_lists_the_submission_listeners(sub):
    out = sub.stdout()
    for label, dotted in [("submission (STARTTLS)", "submission.listen"), ("submissions (TLS)",
                                                                            "submission.listen_tls")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert str(sub.listen(dotted)) in line and "listening" in line


def test_a_stop_lets_a_message_finish(fresh_sub):
    sub = fresh_sub
    client = submit(sub)
    client.mail(f"alice@{sub.domain}")
    client.rcpt(f"bob@{sub.domain}")
    client.putcmd("DATA")
    assert client.getreply()[0] == 354
    client.send(message(subject="during stop", domain=sub.domain)[:40])
    sub.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    client.send(message(subject="during stop", domain=sub.domain)[40:] + b".\r\n")
    code, text = client.getreply()
    assert code == 250, text
    assert client.docmd("NOOP")[0] == 421  # RFC 5321 §3.8: then the session ends
    client.close()
    assert sub.process.wait(20) == 0
    # The store has it: read it without the daemon.
    from storage import open_data_dir
    from storage.store import Store

    with Store(open_data_dir(sub.config.server.data_dir, 4)) as store:
        assert store.mailbox(f"bob@{sub.domain}", "INBOX").exists == 1


def test_the_tls_handshake_is_required_on_the_submissions_port(sub):
    address = sub.listen("submission.listen_tls")
    with socket.create_connection((address.host, address.port), timeout=10) as raw:
        raw.sendall(b"EHLO plaintext.example.org\r\n")
        try:
            answer = raw.recv(100)
        except (ConnectionResetError, ssl.SSLError):
            answer = b""
    assert not answer.startswith(b"220") and not answer.startswith(b"250")
