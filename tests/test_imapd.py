"""imapd end to end: a running `postroom serve`, real clients (imaplib, imapclient, mbsync),
mail delivered through the MX agent, results checked on the wire and through the store.

Here is what needs the wire: TLS and STARTTLS, real client libraries parsing our answers,
literals both ways, IDLE latency, flow control, timeouts, stopping. The semantics of the
commands are tested in process, much faster, in test_imap_session.py.

One daemon serves the module; each test works in an account of its own, so tests neither
see nor disturb each other's mailboxes.
"""

from __future__ import annotations

import datetime
import imaplib
import itertools
import os
import re
import smtplib
import socket
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import imapclient
import pytest

from conftest import (
    CHEAP_HASHER,
    CHEAP_PASSWORDS,
    LISTENERS,
    client_tls_context,
    free_port,
    render_config,
    start_daemon,
    write_mbsyncrc,
)
from storage import Accounts, open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery staple"
_accounts = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("imapd")
    data_dir = root / "var"
    sections: dict[str, dict[str, object]] = {
        "server": {"hostname": "mail.example.test", "data_dir": str(data_dir), "log_level": "info"},
        "tls": {"cert": str(data_dir / "tls/cert.pem"), "key": str(data_dir / "tls/key.pem"), "self_signed": True},
        "storage": {"shards": 4},
        "smtp": {"max_connections_per_ip": 200, "max_message_size": "10M"},
        "imap": {"max_connections_per_ip": 2000},
        "accounts": dict(CHEAP_PASSWORDS),
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = [f"127.0.0.1:{free_port()}"]
    config_path = root / "postroom.toml"
    config_path.write_text(render_config(sections))
    daemon = start_daemon(config_path, root)
    daemon.data_dir = data_dir
    daemon.accounts = Accounts(data_dir / "accounts.lmdb", hasher=CHEAP_HASHER)
    daemon.accounts.add_domain("example.test")
    daemon.store = Store(open_data_dir(data_dir, 4))
    yield daemon
    daemon.store.close()
    daemon.accounts.close()
    assert daemon.stop() == 0, daemon.stderr()
    assert "Traceback" not in daemon.stderr(), daemon.stderr()


@pytest.fixture
def user(server) -> str:
    address = f"user{next(_accounts)}@example.test"
    server.accounts.add_user(address, PASSWORD)
    return address


def connect(server, *, tls: bool = True) -> imaplib.IMAP4:
    context = client_tls_context(server.config)
    if tls:
        address = server.listen("imap.listen_tls")
        return imaplib.IMAP4_SSL(address.host, address.port, ssl_context=context, timeout=30)
    address = server.listen("imap.listen")
    return imaplib.IMAP4(address.host, address.port, timeout=30)


def login(server, user: str) -> imaplib.IMAP4:
    client = connect(server)
    client.login(user, PASSWORD)
    return client


def imapclient_login(server, user: str) -> imapclient.IMAPClient:
    address = server.listen("imap.listen_tls")
    client = imapclient.IMAPClient(address.host, address.port, ssl=True,
                                   ssl_context=client_tls_context(server.config), timeout=30)
    client.login(user, PASSWORD)
    return client


def send_mail(server, to: str, subject: str = "hello", body: str = "Hello there.\n") -> bytes:
    message = EmailMessage()
    message["From"] = "sender@remote.example"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{time.monotonic_ns()}@remote.example>"
    message.set_content(body)
    address = server.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as smtp:
        smtp.send_message(message)
    return bytes(message)


def raw(server, lines: list[bytes], *, until: bytes, tls: bool = True, login_as: str | None = None,
        timeout: float = 10) -> bytes:
    """Send each line (written as given, CRLF included) after the greeting; read until `until`."""
    address = server.listen("imap.listen_tls" if tls else "imap.listen")
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    if tls:
        sock = client_tls_context(server.config).wrap_socket(sock, server_hostname=address.host)
    with sock:
        received = _read_until(sock, b"\r\n")
        if login_as:
            sock.sendall(f'L1 LOGIN "{login_as}" "{PASSWORD}"\r\n'.encode())
            _read_until(sock, b"L1 OK")
        sock.sendall(b"".join(lines))
        return _read_until(sock, until, received)


def _read_until(sock, marker: bytes, received: bytes = b"") -> bytes:
    deadline = time.monotonic() + 10
    while marker not in received and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def untagged(client: imaplib.IMAP4, name: str) -> list:
    return client.untagged_responses.pop(name, [])


# -- connecting and logging in ---------------------------------------------------------------


def test_greeting_and_capabilities_before_and_after_login(server, user):
    client = connect(server)
    caps = client.capabilities
    assert "IMAP4REV1" in caps and "AUTH=PLAIN" in caps and "LITERAL+" in caps and "SASL-IR" in caps
    assert "STARTTLS" not in caps  # already TLS
    client.login(user, PASSWORD)
    typ, data = client.capability()
    after = data[0].decode().split()
    for cap in ("UIDPLUS", "MOVE", "IDLE", "NAMESPACE", "ID", "ENABLE", "UNSELECT", "CHILDREN", "SPECIAL-USE",
                "CREATE-SPECIAL-USE", "QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE",
                "LIST-STATUS", "CONDSTORE", "APPENDLIMIT=10485760",
                # issue 15: what Dovecot offers
                "IMAP4rev2", "ESEARCH", "SEARCHRES", "SORT", "SORT=DISPLAY", "THREAD=REFERENCES",
                "THREAD=ORDEREDSUBJECT", "ESORT", "CONTEXT=SEARCH", "CONTEXT=SORT", "MULTIAPPEND", "CATENATE",
                "BINARY", "QRESYNC", "UTF8=ACCEPT", "COMPRESS=DEFLATE", "NOTIFY", "METADATA", "OBJECTID",
                "SAVEDATE", "PREVIEW", "URLAUTH", "URLAUTH=BINARY"):
        assert cap in after
    client.logout()


def test_plain_port_refuses_passwords_until_starttls(server, user):
    client = connect(server, tls=False)
    assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
    assert "AUTH=PLAIN" not in client.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        client.login(user, PASSWORD)
    client.starttls(ssl_context=client_tls_context(server.config))
    client.login(user, PASSWORD)
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_commands_pipelined_behind_starttls_are_discarded(server, user):
    address = server.listen("imap.listen")
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        _read_until(sock, b"\r\n")
        sock.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
        assert b"a OK" in _read_until(sock, b"a OK")
        tls = client_tls_context(server.config).wrap_socket(sock, server_hostname=address.host)
        tls.sendall(b"c NOOP\r\n")
        reply = _read_until(tls, b"c OK")
        assert b"b " not in reply and b"c OK" in reply


def test_wrong_password_is_refused_after_a_delay(server, user):
    client = connect(server)
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(user, "wrong password")
    assert time.monotonic() - started >= 0.9
    assert "login_failed" in server.stderr()
    client.login(user, PASSWORD)  # the same session may try again
    client.logout()


def test_authenticate_plain_with_and_without_initial_response(server, user):
    import base64

    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
    reply = raw(server, [b"A1 AUTHENTICATE PLAIN " + token + b"\r\n"], until=b"A1 ")
    assert b"A1 OK" in reply
    address = server.listen("imap.listen_tls")
    sock = client_tls_context(server.config).wrap_socket(
        socket.create_connection((address.host, address.port), timeout=10), server_hostname=address.host)
    with sock:
        _read_until(sock, b"\r\n")
        sock.sendall(b"A2 AUTHENTICATE PLAIN\r\n")
        assert _read_until(sock, b"+").startswith(b"+")
        sock.sendall(token + b"\r\n")
        assert b"A2 OK" in _read_until(sock, b"A2 ")
        sock.sendall(b"A3 AUTHENTICATE PLAIN\r\n")
        assert b"A3 BAD" in _read_until(sock, b"A3 ")  # already authenticated


# -- mailboxes -------------------------------------------------------------------------------


def test_new_account_lists_its_special_use_mailboxes(server, user):
    client = login(server, user)
    typ, data = client.list()
    listed = {line.decode() for line in data}
    assert '(\\HasNoChildren) "/" INBOX' in listed
    assert '(\\HasNoChildren \\Sent) "/" Sent' in listed
    assert '(\\HasNoChildren \\Trash) "/" Trash' in listed
    typ, data = client.list('""', '""')
    assert data == [b'(\\Noselect) "/" ""']
    client.logout()


# -- messages --------------------------------------------------------------------------------


def test_append_then_fetch_exact_bytes_flags_and_date(server, user):
    message = b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nbody line\r\n"
    client = login(server, user)
    date = imaplib.Time2Internaldate(time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1)))
    typ, data = client.append("Drafts", "(\\Draft $Label)", date, message)
    assert typ == "OK"
    match = re.search(rb"APPENDUID (\d+) (\d+)", data[0])
    assert match and int(match.group(2)) == 1
    client.select("Drafts")
    typ, data = client.uid("FETCH", "1", "(FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])")
    head = data[0][0].decode()
    assert "FLAGS (\\Draft $Label \\Recent)" in head  # appended with Drafts closed: the SELECT's
    assert f"RFC822.SIZE {len(message)}" in head
    assert data[0][1] == message
    assert imaplib.Internaldate2tuple(data[0][0])[:6] == (2025, 3, 4, 5, 6, 7)
    typ, data = client.append("Nowhere", None, None, message)
    assert typ == "NO" and b"TRYCREATE" in data[0]
    client.logout()


def test_fetch_sections_and_bodystructure_of_a_multipart(server, user):
    message = EmailMessage()
    message["From"] = "Ann Example <ann@example.org>"
    message["To"] = user
    message["Subject"] = "report"
    message.set_content("plain text part\n")
    message.add_alternative("<p>html part</p>\n", subtype="html")
    message.add_attachment(b"\x00\x01binary", maintype="application", subtype="octet-stream",
                           filename="data.bin")
    raw_bytes = bytes(message).replace(b"\n", b"\r\n")
    client = imapclient_login(server, user)
    client.append("INBOX", raw_bytes)
    client.select_folder("INBOX")
    fetched = client.fetch([1], ["BODYSTRUCTURE", "ENVELOPE", "BODY.PEEK[1.1]", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]",
                                 "BODY.PEEK[]<0.10>", "FLAGS"])[1]
    structure = fetched[b"BODYSTRUCTURE"]
    assert structure.is_multipart
    assert fetched[b"ENVELOPE"].subject == b"report"
    assert fetched[b"ENVELOPE"].from_[0].mailbox == b"ann"
    assert fetched[b"BODY[1.1]"].strip() == b"plain text part"
    assert fetched[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: report\r\n\r\n"
    assert fetched[b"BODY[]<0>"] == raw_bytes[:10]
    assert b"\\Seen" not in fetched[b"FLAGS"]
    # A non-peek BODY[] sets \Seen, and says so.
    again = client.fetch([1], ["BODY[TEXT]"])[1]
    assert b"\\Seen" in again[b"FLAGS"]
    client.logout()


def test_sort_and_thread_with_imapclient(server, user):
    """SORT and THREAD (RFC 5256) as a client library sends and reads them."""
    client = imapclient_login(server, user)
    assert {b"SORT", b"THREAD=REFERENCES", b"ESEARCH", b"CONTEXT=SEARCH"} <= set(client.capabilities())
    for message_id, subject, reply_to in (("1@x", "plans", None), ("2@x", "Re: plans", "1@x"), ("3@x", "agenda", None)):
        header = f"Message-ID: <{message_id}>\r\nSubject: {subject}\r\n"
        header += f"In-Reply-To: <{reply_to}>\r\n" if reply_to else ""
        client.append("INBOX", (header + "\r\nbody\r\n").encode())
    client.select_folder("INBOX")
    assert client.sort(["SUBJECT"]) == [3, 1, 2]
    assert client.sort(["REVERSE", "ARRIVAL"], ["NOT", "SUBJECT", "agenda"]) == [2, 1]
    assert client.thread("REFERENCES") == ((1, 2), (3,))
    assert client.thread("ORDEREDSUBJECT") == ((1, 2), (3,))
    client.logout()


def test_idle_is_woken_by_a_delivery_within_a_second(server, user):
    client = imapclient_login(server, user)
    client.select_folder("INBOX")
    client.idle()
    time.sleep(0.3)
    started = time.monotonic()
    send_mail(server, user, subject="wake up")
    responses = client.idle_check(timeout=5)
    elapsed = time.monotonic() - started
    client.idle_done()
    assert (1, b"EXISTS") in responses
    assert elapsed < 1.5  # delivery itself included
    client.logout()


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_on_the_wire_is_answered_and_the_session_goes_on(server, user):
    # The semantics of each bad command are in test_imap_session.py; here, the Twisted
    # side: a refused line, a parse error and an unknown command, pipelined on one socket.
    reply = raw(server, [b"s1 SELECT INBOX\r\n", b"a1 " + b"X" * 70000 + b"\r\n", b"a2 SEARCH FOO\r\n",
                         b"a3 FROBNICATE\r\n", b"z9 NOOP\r\n"], until=b"z9 OK", login_as=user)
    assert b"a1 BAD [TOOBIG]" in reply and b"a2 BAD" in reply and b"a3 BAD unknown command" in reply, reply
    assert b"z9 OK" in reply


# -- mbsync ----------------------------------------------------------------------------------


def test_mbsync_syncs_both_ways_and_then_finds_nothing_to_do(server, user, tmp_path):
    for i in range(3):
        send_mail(server, user, subject=f"sync {i}")
    local = tmp_path / "Mail"
    local.mkdir()
    rc = write_mbsyncrc(tmp_path / "mbsyncrc", server, user, PASSWORD, local)

    def mbsync() -> subprocess.CompletedProcess:
        # -D: the IMAP dialogue, to check what the third run did (and to debug a failure)
        return subprocess.run(["mbsync", "-D", "-c", str(rc), "sync"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOME": str(tmp_path)})

    first = mbsync()
    assert first.returncode == 0, first.stdout + first.stderr
    pulled = list((local / "INBOX" / "new").iterdir()) + list((local / "INBOX" / "cur").iterdir())
    assert len(pulled) == 3
    # Locally: mark one seen, add a new message; mbsync must push both.
    seen = pulled[0]
    seen.rename(seen.parent.parent / "cur" / (seen.name.split(":")[0] + ":2,S"))
    (local / "INBOX" / "new" / f"{int(time.time())}.local.host").write_bytes(
        b"From: me@example.test\r\nSubject: written offline\r\n\r\nhi\r\n")
    second = mbsync()
    assert second.returncode == 0, second.stdout + second.stderr
    infos = server.store.fetch(user, "INBOX", [(1, 1000)])
    assert len(infos) == 4
    assert sum("\\Seen" in m.flags for m in infos) == 1
    assert any(b"written offline" in server.store.read_message(m) for m in infos)
    before_server = server.store.mailbox(user, "INBOX")
    before_local = sorted(p.name for p in (local / "INBOX").rglob("*") if p.is_file())
    third = mbsync()
    assert third.returncode == 0, third.stdout + third.stderr
    # Nothing to do: no message moved either way, no flag changed on either side.
    assert not re.search(r">>> \d+ (APPEND|UID STORE|UID FETCH \S+ \(BODY)", third.stdout), third.stdout
    assert server.store.mailbox(user, "INBOX").highestmodseq == before_server.highestmodseq
    assert sorted(p.name for p in (local / "INBOX").rglob("*") if p.is_file()) == before_local


# -- more of RFC 3501 and its extensions -----------------------------------------------------


def test_append_with_non_synchronizing_literal(server, user):
    message = b"Subject: plus\r\n\r\nsent without waiting\r\n"
    reply = raw(server, [b"a1 APPEND INBOX (\\Flagged) {%d+}\r\n" % len(message), message, b"\r\n",
                         b"a2 NOOP\r\n"], until=b"a2 OK", login_as=user)
    assert not any(line.startswith(b"+") for line in reply.split(b"\r\n"))  # no continuation asked for
    assert b"a1 OK [APPENDUID" in reply
    stored = server.store.fetch(user, "INBOX", [(1, 1)])[0]
    assert server.store.read_message(stored) == message and stored.flags == ("\\Flagged",)


def test_imapd_command_runs_only_the_imap_listeners(tmp_path):
    import signal

    from conftest import BIN

    data_dir = tmp_path / "var"
    sections: dict[str, dict[str, object]] = {
        "server": {"hostname": "mail.example.test", "data_dir": str(data_dir)},
        "tls": {"cert": str(data_dir / "tls/cert.pem"), "key": str(data_dir / "tls/key.pem"), "self_signed": True},
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = [f"127.0.0.1:{free_port()}"]
    config_path = tmp_path / "postroom.toml"
    config_path.write_text(render_config(sections))
    process = subprocess.Popen([str(BIN / "imapd"), "--config", str(config_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        address = sections["imap"]["listen"][0].split(":")
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((address[0], int(address[1])), timeout=2) as sock:
                    greeting = sock.recv(200)
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.1)
        assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1") and b"STARTTLS" in greeting
        assert b"LOGINDISABLED" in greeting  # production default: no passwords before TLS
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "IMAP (STARTTLS)" in out and "IMAPS" in out and "SMTP" not in out and "POP3" not in out


# -- what review found -------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_when_the_client_does_not_read(server, user):
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000  # ~1 MB
    for _ in range(40):
        server.store.append(user, "INBOX", big)
    pid = server.child_pid("imapd")
    before = _rss_kib(pid)
    address = server.listen("imap.listen_tls")
    sock = client_tls_context(server.config).wrap_socket(
        socket.create_connection((address.host, address.port), timeout=10), server_hostname=address.host)
    with sock:
        _read_until(sock, b"\r\n")
        sock.sendall(f'L LOGIN "{user}" "{PASSWORD}"\r\n'.encode())
        _read_until(sock, b"L OK")
        sock.sendall(b"S SELECT INBOX\r\nF FETCH 1:* (BODY.PEEK[])\r\n" + b"C CAPABILITY\r\n" * 50_000)
        time.sleep(3)  # not reading: the server must stop producing, not buffer it all
        grown = _rss_kib(pid) - before
    assert grown < 25_000, f"daemon grew {grown} KiB for a client that does not read"
    client = login(server, user)  # and it still serves others
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_a_client_that_does_not_log_in_in_time_is_told_and_dropped(write_config, tmp_path):
    daemon = start_daemon(write_config(imap={"login_timeout": "2s"}), tmp_path)
    try:
        address = daemon.listen("imap.listen")
        with socket.create_connection((address.host, address.port), timeout=10) as sock:
            started = time.monotonic()
            assert _read_until(sock, b"\r\n").startswith(b"* OK")
            for _ in range(3):  # trickling bytes does not buy more time before login
                time.sleep(0.5)
                sock.sendall(b"a NOOP\r\n")
            reply = _read_until(sock, b"* BYE")
            assert b"* BYE autologout" in reply
            assert sock.recv(100) == b""  # and the connection is closed
            assert 1.5 < time.monotonic() - started < 5
    finally:
        assert daemon.stop() == 0


def test_clients_are_told_when_the_server_stops(write_config, tmp_path):
    daemon = start_daemon(write_config(), tmp_path)
    stopped = False
    try:
        address = daemon.listen("imap.listen_tls")
        sock = client_tls_context(daemon.config).wrap_socket(
            socket.create_connection((address.host, address.port), timeout=10), server_hostname=address.host)
        with sock:
            _read_until(sock, b"\r\n")
            assert daemon.stop() == 0
            stopped = True
            assert b"* BYE [UNAVAILABLE] server shutting down" in _read_until(sock, b"reconnect later")
    finally:
        if not stopped:
            daemon.stop()


def test_qresync_objectid_savedate_and_preview_through_real_clients(server, user):
    """Issue 15's sync extensions on the wire: mail through the MX agent, imapclient parsing
    EMAILID, SAVEDATE and a UTF-8 PREVIEW literal, and a raw QRESYNC SELECT that is told
    what vanished (the semantics are tested in process: test_imap_qresync.py and others)."""
    send_mail(server, user, subject="first", body="Grüße aus Köln.\n")
    send_mail(server, user, subject="second")
    client = imapclient_login(server, user)
    assert client.enable("QRESYNC") == [b"QRESYNC"]
    selected = client.select_folder("INBOX")
    uidvalidity, modseq = selected[b"UIDVALIDITY"], selected[b"HIGHESTMODSEQ"]
    fetched = client.fetch([1, 2], ["EMAILID", "THREADID", "SAVEDATE", "PREVIEW"])
    assert fetched[1][b"PREVIEW"].decode() == "Grüße aus Köln."
    assert fetched[1][b"THREADID"] is None and fetched[1][b"EMAILID"] != fetched[2][b"EMAILID"]
    saved = datetime.datetime.strptime(fetched[1][b"SAVEDATE"].decode(), "%d-%b-%Y %H:%M:%S %z")
    assert abs(saved.timestamp() - time.time()) < 600
    client.delete_messages([1])
    client.expunge()
    client.logout()

    answer = raw(server, [b"a ENABLE QRESYNC\r\n",
                          f"b SELECT INBOX (QRESYNC ({uidvalidity} {modseq}))\r\n".encode()],
                 until=b"b OK", login_as=user)
    assert b"* VANISHED (EARLIER) 1\r\n" in answer and b"* 1 EXISTS\r\n" in answer
    assert re.search(rb"\* OK \[MAILBOXID \([A-Za-z0-9_-]+\)\]", answer)


def test_urlauth_between_two_users_over_the_wire(server, user):
    """URLAUTH (RFC 4467) on the wire: alice's GENURLAUTH through imaplib, bob's URLFETCH
    on a socket of his own gets the message for an authuser URL and a user+bob URL, NIL for
    a user+alice one, and NIL for all of them after alice's RESETKEY."""
    bob = f"user{next(_accounts)}@example.test"
    server.accounts.add_user(bob, PASSWORD)
    message = send_mail(server, user, subject="for bob")
    local, domain = user.split("@")
    alice = login(server, user)
    imaplib.Commands.update({"GENURLAUTH": ("AUTH", "SELECTED"), "URLFETCH": ("AUTH", "SELECTED"),
                             "RESETKEY": ("AUTH", "SELECTED")})
    made = {}
    for access in ("authuser", f"user+{bob}", f"user+{user}"):
        rump = f"imap://{local}@{domain}/INBOX/;uid=1;urlauth={access}"
        status, _ = alice._simple_command("GENURLAUTH", f'"{rump}"', "INTERNAL")
        assert status == "OK"
        (url,) = untagged(alice, "GENURLAUTH")
        made[access] = url.decode()
    bob_client = login(server, bob)
    for access, url in made.items():
        status, _ = bob_client._simple_command("URLFETCH", url)
        assert status == "OK"
        answer = untagged(bob_client, "URLFETCH")[0]
        if access == f"user+{user}":
            assert answer == url.encode() + b" NIL"
        else:  # (url {n}, the stored message: the MX agent's trace field first)
            assert answer[0].startswith(url.encode() + b" {"), access
            assert answer[1].endswith(message.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")), access
            assert b"Subject: for bob\r\n" in answer[1]
    assert alice._simple_command("RESETKEY")[0] == "OK"
    for url in made.values():
        assert bob_client._simple_command("URLFETCH", url)[0] == "OK"
        assert untagged(bob_client, "URLFETCH") == [url.encode() + b" NIL"]
    alice.logout()
    bob_client.logout()
