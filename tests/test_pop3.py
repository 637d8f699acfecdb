"""pop3d as mail clients meet it: `postroom serve` (and `pop3d`) on loopback, driven by
poplib over STLS and implicit TLS, by fetchmail, and by raw sockets for what clients never
send. Mail arrives through the MX agent (smtplib); results are checked through the
storage API."""

from __future__ import annotations

import base64
import itertools
import os
import poplib
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, SharedDaemon, add_accounts, client_tls_context, start_daemon, start_module_daemon
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery"
ALICE = "alice@example.test"  # the user of a test with a daemon of its own
HOSTNAME = "mail.example.test"
_tests = itertools.count(1)


def add_users(config_path: Path) -> None:
    add_accounts(config_path, PASSWORD, [ALICE, "bob@example.test"])


class Pop(SharedDaemon):
    """The module's daemon as one test sees it: `alice` and `bob` in a domain of the test's
    own (alice@p7.example.test, ...), so that no maildrop, lock or message is another
    test's; `store` is opened on the daemon's data dir, and `stderr()` is what the daemon
    logged since the test began."""

    def __init__(self, daemon):
        super().__init__(daemon)
        domain = f"p{next(_tests)}.example.test"
        self.alice, self.bob = f"alice@{domain}", f"bob@{domain}"
        add_accounts(daemon.config_path, PASSWORD, [self.alice, self.bob], domains=(domain,))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `postroom serve` for the tests that need no daemon of their own (a start costs
    more CPU than most of them take), with `store` opened on its data dir."""
    daemon = start_module_daemon(tmp_path_factory.mktemp("pop3"))
    daemon.store = Store(open_data_dir(daemon.config.server.data_dir, 4))
    yield daemon
    daemon.store.close()
    assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture
def pop(server):
    """The module's daemon, with an alice and a bob of this test's own."""
    return Pop(server)


def user_of(daemon) -> str:
    """The test's alice: a Pop's, or ALICE on a daemon of the test's own."""
    return getattr(daemon, "alice", ALICE)


def deliver(daemon, body: bytes, to: str | None = None) -> None:
    """Through the MX agent, as mail really arrives."""
    address = daemon.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("client.example.org")
        assert client.sendmail("sender@example.org", [to or user_of(daemon)], body) == {}


def stored(daemon, account: str | None = None) -> list[bytes]:
    store = daemon.store
    return [store.read_message(m) for m in store.fetch(account or user_of(daemon), "INBOX", [(1, 2**32 - 1)])]


def tls_context(daemon):
    return client_tls_context(daemon.config)


def stls_client(daemon, login: bool = True) -> poplib.POP3:
    address = daemon.listen("pop3.listen")
    client = poplib.POP3(address.host, address.port, timeout=30)
    client.stls(tls_context(daemon))  # checks the certificate for mail.example.test (stls sends SNI)
    if login:
        client.user(user_of(daemon))
        client.pass_(PASSWORD)
    return client


def tls_client(daemon, login: bool = True) -> poplib.POP3_SSL:
    address = daemon.listen("pop3.listen_tls")
    client = poplib.POP3_SSL(address.host, address.port, timeout=30, context=tls_context(daemon))
    if login:
        client.user(user_of(daemon))
        client.pass_(PASSWORD)
    return client


def lines_of(raw: bytes) -> list[bytes]:
    """What poplib returns for a message: its lines without CRLF, dots unstuffed."""
    return raw.split(b"\r\n")[:-1] if raw.endswith(b"\r\n") else raw.split(b"\r\n")


def login_when_free(daemon, attempts: int = 50) -> poplib.POP3_SSL:
    """A login that waits (bounded) for a lock a closing session still holds."""
    for _ in range(attempts):
        client = tls_client(daemon, login=False)
        client.user(user_of(daemon))
        try:
            client.pass_(PASSWORD)
            return client
        except poplib.error_proto as e:
            client.close()
            if b"[IN-USE]" not in e.args[0]:
                raise
            time.sleep(0.1)
    raise AssertionError("the maildrop stayed locked")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


DOTTED = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
BIG_LINE = b"0123456789" * 100 + b"\r\n"
BIG = b"Subject: big\r\n\r\n" + BIG_LINE * 3000 + b".after many chunks\r\n"  # ~3 MB, many 128 KiB chunks


# -- every command, over STLS and implicit TLS --------------------------------------------


def test_every_command_over_stls(pop):
    for body in (DOTTED, b"Subject: two\r\n\r\nsecond\r\nline 2\r\nline 3\r\n", BIG):
        deliver(pop, body)
    raw = stored(pop)
    sizes = [len(r) for r in raw]
    uidvalidity = pop.store.mailbox(pop.alice, "INBOX").id
    client = stls_client(pop, login=False)
    caps = client.capa()
    assert {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER"} <= set(caps)
    assert caps["SASL"] == ["PLAIN"] and caps["EXPIRE"] == ["NEVER"] and caps["IMPLEMENTATION"][0] == "Postroom"
    assert "STLS" not in caps  # TLS is on now
    assert client.user(pop.alice) == b"+OK send PASS"
    assert client.pass_(PASSWORD) == f"+OK maildrop has 3 messages ({sum(sizes)} octets)".encode()
    assert client.stat() == (3, sum(sizes))
    assert client.list()[1] == [f"{n} {s}".encode() for n, s in enumerate(sizes, 1)]
    assert client.list(2) == f"+OK 2 {sizes[1]}".encode()
    assert client.uidl()[1] == [f"{n} {uidvalidity}.{n}".encode() for n in (1, 2, 3)]
    assert client.uidl(3) == f"+OK 3 {uidvalidity}.3".encode()
    for number, message in enumerate(raw, 1):
        response, lines, octets = client.retr(number)
        assert response == f"+OK {len(message)} octets".encode()
        assert lines == lines_of(message)  # byte-exact, dots unstuffed by poplib
    header = raw[1].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert client.top(2, 1)[1] == header + [b"", b"second"]
    assert client.top(2, 0)[1] == header + [b""]
    assert client.dele(1) == b"+OK message 1 deleted"
    with pytest.raises(poplib.error_proto, match=r"-ERR message 1 already deleted"):
        client.retr(1)
    assert client.stat() == (2, sum(sizes[1:]))
    assert client.rset() == f"+OK maildrop has 3 messages ({sum(sizes)} octets)".encode()
    assert client.noop() == b"+OK nothing to do"
    client.dele(2)
    assert client.quit().endswith(b" signing off (1 messages deleted)")
    assert stored(pop) == [raw[0], raw[2]]
    # Retrieving marked \Seen for IMAP (written behind, visible within moments).
    assert wait_for(lambda: all("\\Seen" in f.flags for f in pop.store.flags(pop.alice, "INBOX")))


def test_implicit_tls_and_auth_plain(pop):
    deliver(pop, DOTTED)
    client = tls_client(pop, login=False)
    assert "STLS" not in client.capa()
    token = base64.b64encode(f"\0{pop.alice}\0{PASSWORD}".encode()).decode()
    assert client._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK maildrop has 1 messages")
    assert client.retr(1)[1] == lines_of(stored(pop)[0])
    client.quit()
    # The continuation form of RFC 5034.
    client = tls_client(pop, login=False)
    assert client._shortcmd("AUTH PLAIN") == b"+ "
    assert client._shortcmd(token).startswith(b"+OK maildrop has 1 messages")
    client.quit()


def test_passwords_are_refused_before_stls(pop):
    address = pop.listen("pop3.listen")
    client = poplib.POP3(address.host, address.port, timeout=30)
    caps = client.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] plaintext authentication is not allowed"):
        client.user(pop.alice)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        client.pass_(PASSWORD)
    client.quit()


def test_failed_logins_are_delayed_and_logged(pop):
    client = tls_client(pop, login=False)
    client.user(pop.alice)
    started = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] wrong user name or password"):
        client.pass_("wrong")
    assert time.monotonic() - started >= 0.9  # policy.logins: 1 s after a first failure
    client.quit()
    assert wait_for(lambda: "event=login_failed" in pop.stderr() and f"user={pop.alice}" in pop.stderr())
    assert "wrong" not in pop.stderr().split("event=login_failed", 1)[1].split("\n")[0]


# -- session semantics ----------------------------------------------------------------------


def test_a_second_login_gets_in_use_until_the_first_quits(pop):
    deliver(pop, DOTTED)
    first = stls_client(pop)
    second = tls_client(pop, login=False)
    second.user(pop.alice)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\] maildrop already locked"):
        second.pass_(PASSWORD)
    # The lock is per maildrop: bob logs in meanwhile.
    bob = tls_client(pop, login=False)
    bob.user(pop.bob)
    assert bob.pass_(PASSWORD).startswith(b"+OK")
    bob.quit()
    first.quit()
    second.user(pop.alice)  # the same connection may try again once the maildrop is free
    assert second.pass_(PASSWORD).startswith(b"+OK maildrop has 1 messages")
    second.quit()


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from storage import open_data_dir
from storage.locks import lock_maildrop
from storage.store import Store
store = Store(open_data_dir({data_dir!r}, 4))
lock = lock_maildrop(store, {account!r})
print("locked" if lock else "busy", flush=True)
time.sleep(120)
"""


def test_the_lock_holds_across_processes_and_dies_with_its_holder(pop):
    """A second pop3d (here: any process using storage.locks) shares the data dir; a holder
    killed with SIGKILL must not leave the maildrop locked."""
    script = LOCK_HOLDER.format(repo=str(Path(__file__).resolve().parent.parent),
                                data_dir=str(pop.config.server.data_dir), account=pop.alice)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        client = tls_client(pop, login=False)
        client.user(pop.alice)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            client.pass_(PASSWORD)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        client.user(pop.alice)
        assert client.pass_(PASSWORD).startswith(b"+OK")
        # And the other way round: the daemon's session holds it against other processes.
        other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "busy"
        finally:
            other.kill()
            other.wait(10)
        client.quit()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_dropped_connection_deletes_nothing(pop):
    for i in range(3):
        deliver(pop, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
    before = stored(pop)
    client = tls_client(pop)
    for number in (1, 2, 3):
        client.dele(number)
    client.sock.shutdown(socket.SHUT_RDWR)  # no QUIT: the session never reaches UPDATE
    client.close()
    again = login_when_free(pop)
    assert again.stat()[0] == 3
    again.quit()
    assert stored(pop) == before


def test_mail_arriving_and_imap_changes_mid_session_do_not_disturb_it(pop):
    for i in range(3):
        deliver(pop, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
    raw = stored(pop)
    client = tls_client(pop)
    listing, uidl = client.list()[1], client.uidl()[1]
    deliver(pop, b"Subject: new\r\n\r\narrived meanwhile\r\n")
    store = pop.store
    uids = [m.uid for m in store.fetch(pop.alice, "INBOX", [(1, 2**32 - 1)])]
    store.store_flags(pop.alice, "INBOX", [(uids[0], uids[0])], "add", ["\\Flagged", "\\Seen"])  # as IMAP would
    store.store_flags(pop.alice, "INBOX", [(uids[1], uids[1])], "add", ["\\Deleted"])
    store.expunge(pop.alice, "INBOX", [(uids[1], uids[1])])  # IMAP expunges message 2
    assert client.stat()[0] == 3 and client.list()[1] == listing and client.uidl()[1] == uidl
    assert client.retr(1)[1] == lines_of(raw[0])
    with pytest.raises(poplib.error_proto, match=r"-ERR message 2 was removed by another session"):
        client.retr(2)
    assert client.retr(3)[1] == lines_of(raw[2])
    client.dele(3)
    client.quit()
    # The next session sees the new message; UIDLs of the others did not move, and the
    # deleted one's UIDL is never handed out again.
    later = tls_client(pop)
    new_uidl = dict(line.split() for line in later.uidl()[1])
    assert list(new_uidl.values()) == [uidl[0].split()[1], new_uidl[b"2"]]
    assert new_uidl[b"2"] not in [line.split()[1] for line in uidl]
    assert later.retr(2)[1][-1] == b"arrived meanwhile"
    later.quit()


def test_retrieving_a_large_message_streams_it_exactly(pop):
    body = b"Subject: large\r\n\r\n" + b"".join(b"." + bytes([65 + i % 26]) * 70 + b"\r\n" for i in range(80_000))
    pop.store.deliver([pop.alice], body)  # 5.8 MB: past the MX agent's 25 MB default is not needed
    client = tls_client(pop)
    response, lines, octets = client.retr(1)
    assert response == f"+OK {len(body)} octets".encode()
    assert b"\r\n".join(lines) + b"\r\n" == body
    client.quit()


def test_retr_reads_ahead_and_every_message_goes_out_exactly(pop):
    # RETR opens the messages after the one asked for in the same store call
    # (pop3d.session AHEAD_*): small ones read whole, big ones kept open at their first
    # chunk. Every path must send each message exactly: in order, after a DELE, out of
    # order, TOP, and a message bigger than a chunk between small ones.
    raws = []
    for i in range(24):
        size = 300_000 if i in (4, 11) else 200 + 900 * i
        body = b"".join(b"." + bytes([65 + (i + n) % 26]) * 60 + b"\r\n" for n in range(size // 63 + 1))
        raws.append(b"Subject: %d\r\n\r\n" % i + body)
        pop.store.deliver([pop.alice], raws[-1])
    uids = [m.uid for m in pop.store.fetch(pop.alice, "INBOX", [(1, 2**32 - 1)])]
    client = tls_client(pop)
    assert client.retr(1)[1] == lines_of(raws[0])
    # Read ahead with message 1, message 2 is sent as it was when the session began, as one
    # already being sent would be; without read-ahead this RETR would find it gone.
    pop.store.store_flags(pop.alice, "INBOX", [(uids[1], uids[1])], "add", ["\\Deleted"])
    pop.store.expunge(pop.alice, "INBOX", [(uids[1], uids[1])])
    assert client.retr(2)[1] == lines_of(raws[1])
    client.dele(7)
    for number in (3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 12, 5, 1):
        assert client.retr(number)[1] == lines_of(raws[number - 1]), number
    assert client.top(9, 0)[1] == lines_of(raws[8].split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert client.retr(10)[1] == lines_of(raws[9])
    client.quit()


def test_pipelined_retr_sends_every_message_exactly(pop):
    # Pipelined RETRs of messages read ahead whole are answered from the pump, one write
    # each (pop3d.session.retrieve_now); the others take the store path. The bytes on the
    # wire must be the same either way: dot-stuffing, a message of exactly one chunk whose
    # next line (after the chunk edge) starts with a dot, one without a final CRLF, a DELE'd
    # one answered -ERR in the middle, and the order of the replies.
    from pop3d.session import CHUNK

    edge = b"Subject: edge\r\n\r\n" + b"a" * (CHUNK - 17 - 2) + b"\r\n"
    assert len(edge) == CHUNK
    raws = [b"Subject: %d\r\n\r\n.dot\r\n..two\r\nx\r\n.\r\nend\r\n" % i for i in range(20)]
    raws[3] = b"Subject: no final newline\r\n\r\n.last line"
    raws[6] = edge  # exactly one chunk: its end is found by an empty read
    raws[7] = edge + b".hidden\r\n"  # the chunk edge falls between CRLF and a leading dot
    for raw in raws:
        pop.store.deliver([pop.alice], raw)
    address = pop.listen("pop3.listen_tls")
    sock = tls_context(pop).wrap_socket(socket.create_connection((address.host, address.port), timeout=10),
                                        server_hostname=address.host)
    with sock:
        sock.sendall(f"USER {pop.alice}\r\nPASS {PASSWORD}\r\nDELE 10\r\n".encode()
                     + b"".join(b"RETR %d\r\n" % n for n in range(1, 21)) + b"QUIT\r\n")
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    expected = []
    for number, raw in enumerate(raws, 1):
        if number == 10:
            expected.append(b"-ERR")
            continue
        stuffed = raw.replace(b"\r\n.", b"\r\n..")
        stuffed = (b"." + stuffed if stuffed.startswith(b".") else stuffed)
        expected.append(b"+OK %d octets\r\n" % len(raw) + stuffed + (b"" if raw.endswith(b"\r\n") else b"\r\n")
                        + b".\r\n")
    start = received.index(b"+OK message 10 deleted") if b"+OK message 10 deleted" in received else None
    assert start is not None, received[:300]
    rest = received[received.index(b"\r\n", start) + 2 :]
    for number, want in enumerate(expected, 1):
        if want == b"-ERR":
            assert rest.startswith(b"-ERR"), (number, rest[:100])
            rest = rest[rest.index(b"\r\n") + 2 :]
        else:
            assert rest[: len(want)] == want, number
            rest = rest[len(want) :]
    assert rest.startswith(b"+OK"), rest[:100]  # QUIT's


def test_bad_input_gets_clear_errors_on_the_wire(pop):
    address = pop.listen("pop3.listen")
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK Postroom")

        def exchange(line: bytes) -> bytes:
            sock.sendall(line)
            return reader.readline()

        assert exchange(b"FROB\r\n") == b"-ERR unknown command 'FROB'\r\n"
        assert exchange(b"RETR 1\r\n") == b"-ERR RETR is not valid before login\r\n"
        assert exchange(b"NOOP " + b"x" * 20_000 + b"\r\n") == b"-ERR line too long (limit 8192 octets)\r\n"
        assert exchange(b"USER \xff\xfe\r\n") == b"-ERR command is not valid UTF-8\r\n"
        assert exchange(b"AUTH CRAM-MD5\r\n") == b"-ERR unsupported mechanism 'CRAM-MD5': PLAIN only\r\n"
        assert exchange(b"PASS x\r\n").startswith(b"-ERR [AUTH]")
        assert exchange(b"QUIT\r\n").startswith(b"+OK")


def test_pipelined_commands_after_stls_in_the_clear_are_discarded(pop):
    address = pop.listen("pop3.listen")
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"STLS\r\nCAPA\r\n")  # CAPA in the clear must not be answered over TLS
        assert reader.readline() == b"+OK begin TLS negotiation\r\n"
        tls = tls_context(pop).wrap_socket(sock, server_hostname=HOSTNAME)
        tls.sendall(b"NOOP\r\n")
        assert tls.recv(1024) == b"-ERR NOOP is not valid before login\r\n"
        tls.close()


def test_connection_limit_per_address(write_config, tmp_path):
    daemon = start_daemon(write_config(pop3={"max_connections_per_ip": 2}), tmp_path)
    try:
        address = daemon.listen("pop3.listen")
        held = [socket.create_connection((address.host, address.port), timeout=10) for _ in range(2)]
        for sock in held:
            assert sock.makefile("rb").readline().startswith(b"+OK")
        with socket.create_connection((address.host, address.port), timeout=10) as extra:
            assert extra.makefile("rb").readline() == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
        for sock in held:
            sock.close()
    finally:
        assert daemon.stop() == 0


def test_the_110_and_995_listeners_share_one_connection_limit(write_config, tmp_path):
    """One POP3 service, one limit: the service's context is built once per process
    (postroom/daemons.py Shared), whichever listener starts first."""
    daemon = start_daemon(write_config(pop3={"max_connections_per_ip": 2}), tmp_path)
    try:
        plain = daemon.listen("pop3.listen")
        held = socket.create_connection((plain.host, plain.port), timeout=10)
        assert held.makefile("rb").readline().startswith(b"+OK")
        over_tls = tls_client(daemon, login=False)  # the second place, on the other listener
        with socket.create_connection((plain.host, plain.port), timeout=10) as extra:
            assert extra.makefile("rb").readline() == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
        over_tls.quit()
        held.close()
    finally:
        assert daemon.stop() == 0


def test_login_delay_and_expire_as_configured(write_config, tmp_path, data_dir):
    path = write_config(pop3={"login_delay": "1h", "expire": "0"})
    add_users(path)
    daemon = start_daemon(path, tmp_path)
    try:
        deliver(daemon, b"Subject: a\r\n\r\nkept\r\n")
        deliver(daemon, b"Subject: b\r\n\r\nretrieved\r\n")
        client = tls_client(daemon, login=False)
        caps = client.capa()
        assert caps["LOGIN-DELAY"] == ["3600"] and caps["EXPIRE"] == ["0"]
        client.user(ALICE)
        client.pass_(PASSWORD)
        client.top(1, 0)
        client.retr(2)
        client.quit()  # EXPIRE 0: what RETR sent is removed at QUIT, what TOP showed stays
        with Store(open_data_dir(data_dir, 4)) as store:
            (left,) = [store.read_message(m) for m in store.fetch(ALICE, "INBOX", [(1, 2**32 - 1)])]
        assert left.endswith(b"kept\r\n")
        again = tls_client(daemon, login=False)
        again.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\] wait 3600 s between logins"):
            again.pass_(PASSWORD)
        again.quit()
    finally:
        assert daemon.stop() == 0


def test_the_pop3d_command_runs_the_pop3_listeners_only(write_config, tmp_path):
    path = write_config()
    add_users(path)
    process = subprocess.Popen([str(BIN / "pop3d"), "--config", str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out = process.stdout.readline() + process.stdout.readline() + process.stdout.readline()
        assert "POP3 (STLS)" in out and "POP3S" in out and "SMTP" not in out
        from conf import load
        address = load(path).pop3.listen_tls[0]
        client = poplib.POP3_SSL(address.host, address.port, timeout=30,
                                 context=client_tls_context(load(path)))
        client.user(ALICE)
        assert client.pass_(PASSWORD) == b"+OK maildrop has 0 messages (0 octets)"
        client.quit()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


# -- fetchmail ----------------------------------------------------------------------------


def fetchmail(daemon, tmp_path: Path, *, keep: bool, implicit_tls: bool) -> tuple[int, list[bytes], str]:
    """One fetchmail run over TLS, delivering each message to a file through an MDA; the
    exit status (0: mail, 1: none), the messages delivered, and what fetchmail said."""
    home = tmp_path / "fetchmail-home"
    inbox = home / "delivered"
    inbox.mkdir(parents=True, exist_ok=True)
    address = daemon.listen("pop3.listen_tls" if implicit_tls else "pop3.listen")
    mda = home / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{inbox}/$(date +%s%N).eml"\n')
    mda.chmod(0o700)
    rc = home / "fetchmailrc"
    rc.write_text(
        f"poll {address.host} service {address.port} protocol POP3 uidl\n"
        f'  user "{user_of(daemon)}" there with password "{PASSWORD}" is "{os.environ.get("USER", "root")}" here\n'
        f"  {'ssl' if implicit_tls else 'sslproto tls1.2+'} sslcertck sslcertfile \"{daemon.config.tls.cert}\"\n"
        f'  sslcommonname "{HOSTNAME}"\n'
        f"  {'keep' if keep else 'nokeep'}\n"
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    before = set(inbox.iterdir())
    # --pidfile: as root, fetchmail's lock is /var/run/fetchmail.pid whatever HOME says, and
    # fetchmails of parallel test processes refuse each other ("another ... is running").
    result = subprocess.run(
        ["/usr/bin/fetchmail", "--fetchmailrc", str(rc), "--idfile", str(home / "fetchids"), "--nosyslog",
         "--pidfile", str(home / "fetchmail.pid"), "--nodetach", "-v"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)}, cwd=home,
    )
    new = sorted(set(inbox.iterdir()) - before)
    return result.returncode, [p.read_bytes() for p in new], result.stdout + result.stderr


@pytest.mark.parametrize("implicit_tls", [True, False], ids=["pop3s", "stls"])
def test_fetchmail_with_keep_leaves_mail_and_fetches_it_once(pop, tmp_path, implicit_tls):
    deliver(pop, DOTTED)
    deliver(pop, b"Subject: second\r\n\r\nhello fetchmail\r\n")
    code, messages, said = fetchmail(pop, tmp_path, keep=True, implicit_tls=implicit_tls)
    assert code == 0, said
    assert len(messages) == 2 and messages[0].endswith(DOTTED.replace(b"\r\n", b"\n")), said
    assert len(stored(pop)) == 2  # kept
    # With keep, fetchmail reads messages with TOP n 99999999, which (unlike RETR) is no
    # retrieval: IMAP still shows them unread.
    assert "POP3> TOP 1 99999999" in said and "RETR" not in said, said
    assert not any("\\Seen" in f.flags for f in pop.store.flags(pop.alice, "INBOX"))
    code, messages, said = fetchmail(pop, tmp_path, keep=True, implicit_tls=implicit_tls)
    assert code == 1 and messages == [], said  # 1: no new mail (UIDL remembered what it had)


def test_fetchmail_without_keep_empties_the_maildrop(pop, tmp_path):
    for i in range(3):
        deliver(pop, f"Subject: {i}\r\n\r\n.body {i}\r\n".encode())
    code, messages, said = fetchmail(pop, tmp_path, keep=False, implicit_tls=True)
    assert code == 0, said
    assert sorted(m.rsplit(b"\n", 2)[-2] for m in messages) == [b".body 0", b".body 1", b".body 2"], said
    assert "POP3> DELE 1" in said, said
    assert stored(pop) == []
    code, messages, said = fetchmail(pop, tmp_path, keep=False, implicit_tls=True)
    assert code == 1 and messages == [], said


def test_a_session_is_told_when_the_server_stops_and_loses_no_mail(config_path, tmp_path, data_dir):
    add_users(config_path)
    daemon = start_daemon(config_path, tmp_path)
    stopped = False
    try:
        deliver(daemon, b"Subject: kept\r\n\r\nstill here\r\n")
        client = tls_client(daemon)
        client.dele(1)  # marked, never committed: the server stops before QUIT
        assert daemon.stop() == 0
        stopped = True
        with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
            client.noop()
    finally:
        if not stopped:
            daemon.stop()
    with Store(open_data_dir(data_dir, 4)) as store:
        assert len(store.fetch(ALICE, "INBOX", [(1, 2**32 - 1)])) == 1


def _rss_kib(pid: int) -> int:
    """The daemon's own memory: RssAnon, not VmRSS, which also counts the pages of the
    index's memory map (shared with the page cache) that a read faults in, and the kernel
    maps their cached neighbours with them: a measure of what was written near them lately."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


def test_pipelined_commands_from_a_client_that_does_not_read_keep_memory_bounded(pop):
    for i in range(500):
        pop.store.deliver([pop.alice], f"Subject: {i}\r\n\r\nbody\r\n".encode())
    before = _rss_kib(pop.child_pid("pop3d"))
    address = pop.listen("pop3.listen_tls")
    sock = tls_context(pop).wrap_socket(socket.create_connection((address.host, address.port), timeout=10),
                                        server_hostname=address.host)
    with sock:
        sock.recv(1000)
        sock.sendall(f"USER {pop.alice}\r\nPASS {PASSWORD}\r\n".encode())
        answers = b""
        while answers.count(b"\r\n") < 2:  # USER's and PASS's: logged in, the maildrop is open
            answers += sock.recv(1000)
        assert answers.startswith(b"+OK") and b"\r\n+OK" in answers, answers
        sock.sendall(b"UIDL\r\n" * 20_000)  # ~10 KB of reply each, never read
        time.sleep(3)
        grown = _rss_kib(pop.child_pid("pop3d")) - before
    assert grown < 30_000, f"daemon grew {grown} KiB for a client that does not read"
    client = login_when_free(pop)  # and the maildrop is free again once it is gone
    assert client.stat()[0] == 500
    client.quit()


def _fill(store, account: str, count: int, raw: bytes, timeout: float = 120.0) -> None:
    """`count` copies of `raw` in `account`'s INBOX, many deliveries in flight at once, and
    the full-text index built (or the daemon's shard committer would build it in its idle
    time, mapping the whole index into its memory while a test measures it)."""
    store.deliver([account], raw)  # the account's mailboxes exist before the rest go in
    done = threading.Semaphore(0)
    failures: list = []

    def settled(delivered, errors) -> None:
        failures.extend(errors)
        done.release()

    for _ in range(count - 1):
        store.start_delivery([account], raw, on_done=settled)
    deadline = time.monotonic() + timeout
    for _ in range(count - 1):
        assert done.acquire(timeout=max(0.0, deadline - time.monotonic())), "deliveries did not settle"
    assert not failures, failures[:3]
    store.build_index(account)


def test_pipelined_retr_to_a_client_that_does_not_read_keeps_memory_bounded(pop):
    count = 5000
    body = b"".join(b"line %04d of a message body that the client will not read\r\n" % i for i in range(64))
    _fill(pop.store, pop.alice, count, b"Subject: unread\r\n\r\n" + body)  # ~4 KiB each, ~20 MiB in all
    address = pop.listen("pop3.listen_tls")
    sock = tls_context(pop).wrap_socket(socket.create_connection((address.host, address.port), timeout=10),
                                        server_hostname=address.host)
    with sock:
        sock.sendall(f"USER {pop.alice}\r\nPASS {PASSWORD}\r\n".encode())
        replies = b""
        while b"maildrop has" not in replies:  # measured from here: argon2id takes 64 MiB for a login
            chunk = sock.recv(1000)
            assert chunk, replies
            replies += chunk
        before = _rss_kib(pop.child_pid("pop3d"))
        sock.sendall(b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1)))  # never read
        grown = 0
        for _ in range(10):
            time.sleep(0.5)
            grown = max(grown, _rss_kib(pop.child_pid("pop3d")) - before)
    # What the kernel's socket buffers take (a few MiB on loopback) is sent; the rest waits
    # for the client. Without that pacing the daemon holds every message: 20 MiB and more.
    assert grown < 4 * 1024, f"daemon grew {grown} KiB for a client that does not read {count} RETRs"
    client = login_when_free(pop)  # and the maildrop is free again once it is gone
    assert client.stat()[0] == count
    client.quit()


def test_a_client_that_does_not_log_in_in_time_is_dropped(write_config, tmp_path):
    daemon = start_daemon(write_config("login_timeout.toml", pop3={"login_timeout": "2s"}), tmp_path)
    try:
        address = daemon.listen("pop3.listen")
        with socket.create_connection((address.host, address.port), timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(200).startswith(b"+OK")
            for _ in range(3):  # trickling commands does not buy time before login
                time.sleep(0.5)
                sock.sendall(b"NOOP\r\n")
            received = b""
            while chunk := sock.recv(1000):
                received += chunk
            assert 1.5 < time.monotonic() - started < 5
            assert b"autologout" not in received  # RFC 1939: closed without a response
    finally:
        assert daemon.stop() == 0
