"""APPEND's literal streamed into the store as it arrives (imapd/append.py): the daemon does
not hold the message, a connection cut off halfway or a command refused after its literal
leaves nothing, and the literal's pieces are joined exactly (bare LFs made CRLF also across
pieces). The daemon tests talk to `postroom serve` over real sockets; the piece tests drive
AppendLiteral against a real store."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from conftest import client_tls_context
from imapd.append import AppendLiteral
from storage import FlagError, open_data_dir
from storage.store import Store
from test_imapd import PASSWORD, _read_until, login, raw, server, user  # noqa: F401 - fixtures

__all__ = ["server", "user"]


def part_files(server) -> list:
    return list((server.data_dir / "shards").glob("*/tmp/*/*"))


def imapd_pid(server) -> int:
    return server.child_pid("imapd")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field}")


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_appends_at_once_do_not_grow_imapd_by_their_size(server, user):
    """Four 8 MB APPENDs of one user at once: the framer held each literal whole, and the
    session a copy, before; now they go to the store's files as they arrive. (An attachment:
    a big text part costs its first 4 MB while the full-text index's words are taken out,
    storage/mime.py MAX_TEXT_CHARS, whatever the message's size.)"""
    message = (b"Subject: big\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + (b"eXl5" * 19 + b"\r\n") * 100_000)
    clients = [login(server, user) for _ in range(4)]  # logins first: argon2id takes 64 MiB each
    pid = imapd_pid(server)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from here
    before = status_kib(pid, "VmRSS")
    results: list = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.append("INBOX", None, None, message)[0]))
               for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    peak = status_kib(pid, "VmHWM")
    assert results == ["OK"] * len(clients)
    assert peak - before < 8_000, f"imapd grew from {before} KiB to a peak of {peak} KiB"
    infos = server.store.fetch(user, "INBOX", [(1, 2**32 - 1)])
    assert [i.size for i in infos] == [len(message)] * len(clients)
    assert server.store.read_message(infos[0]) == message
    for client in clients:
        client.logout()


def test_multiappend_and_catenate_stream_their_literals_too(server, user):
    """MULTIAPPEND's messages and CATENATE's TEXT parts go to the store as they arrive,
    also a TEXT part after a URL (spooled to a file until the URL is read), and a URL to a
    whole message is read a chunk at a time: one command of three 8 MB messages, one
    CATENATE with an 8 MB TEXT part after a URL and one of an 8 MB message's URL leave
    imapd's peak where it was. Before, the framer held every literal but the largest of a command
    and refused a second big one (its command limit)."""
    big = (b"Subject: big\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + (b"eXl5" * 19 + b"\r\n") * 100_000)  # an attachment: no full-text words (see above)
    head = big.index(b"\r\n\r\n") + 4
    pid = imapd_pid(server)
    address = server.listen("imap.listen_tls")
    sock = client_tls_context(server.config).wrap_socket(
        socket.create_connection((address.host, address.port), timeout=60), server_hostname=address.host)
    with sock:
        _read_until(sock, b"\r\n")
        sock.sendall(f'L1 LOGIN "{user}" "{PASSWORD}"\r\n'.encode())
        _read_until(sock, b"L1 OK")
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        before = status_kib(pid, "VmRSS")
        sock.sendall(b"A1 APPEND INBOX")
        for _ in range(3):
            sock.sendall(b" {%d+}\r\n" % len(big))
            sock.sendall(big)
        sock.sendall(b"\r\n")
        assert re.search(rb"A1 OK \[APPENDUID \d+ 1,2,3\]", _read_until(sock, b"A1 ", b""))
        sock.sendall(b'A2 APPEND INBOX CATENATE (URL "/INBOX/;UID=1/;SECTION=HEADER" TEXT {%d+}\r\n'
                     % (len(big) - head) + big[head:] + b")\r\n")
        assert b"A2 OK [APPENDUID" in _read_until(sock, b"A2 ", b"")
        sock.sendall(b'A3 APPEND INBOX CATENATE (URL "/INBOX/;UID=1" TEXT {7+}\r\nthe end)\r\n')
        assert b"A3 OK [APPENDUID" in _read_until(sock, b"A3 ", b"")  # a whole message read a chunk at a time
        peak = status_kib(pid, "VmHWM")
    assert peak - before < 8_000, f"imapd grew from {before} KiB to a peak of {peak} KiB"
    infos = server.store.fetch(user, "INBOX", [(1, 2**32 - 1)])
    assert [i.size for i in infos] == [len(big)] * 4 + [len(big) + 7]
    assert server.store.read_message(infos[3]) == big
    assert server.store.read_message(infos[4]) == big + b"the end"


def test_an_append_cut_off_halfway_leaves_nothing(server, user):
    address = server.listen("imap.listen_tls")
    sock = client_tls_context(server.config).wrap_socket(
        socket.create_connection((address.host, address.port), timeout=10), server_hostname=address.host)
    with sock:
        _read_until(sock, b"\r\n")
        sock.sendall(f'L LOGIN "{user}" "{PASSWORD}"\r\n'.encode())
        _read_until(sock, b"L OK")
        sock.sendall(b"A APPEND INBOX {5000000}\r\n")
        assert b"+ " in _read_until(sock, b"\r\n")
        sock.sendall(b"Subject: half\r\n\r\n" + b"z" * 2_000_000)
        assert wait_for(lambda: any(p.stat().st_size > 1_000_000 for p in part_files(server))), \
            "the literal does not reach the store as it arrives"
    assert wait_for(lambda: not part_files(server)), f"left behind: {part_files(server)}"
    assert server.store.mailbox(user, "INBOX").exists == 0


def test_an_append_refused_after_its_literal_stores_nothing(server, user):
    """The head parses, so the literal streams in; the line after it does not (a second
    message's flags, then no message): BAD, and the streamed message is dropped."""
    reply = raw(server, [b"a1 APPEND INBOX {5+}\r\nhello (\\Seen)\r\na2 NOOP\r\n"],
                until=b"a2 OK", login_as=user)
    assert b"a1 BAD" in reply
    assert server.store.mailbox(user, "INBOX").exists == 0
    assert wait_for(lambda: not part_files(server)), f"left behind: {part_files(server)}"


def test_append_of_a_missing_mailbox_is_trycreate_and_leaves_nothing(server, user):
    reply = raw(server, [b"a1 APPEND Nowhere {11+}\r\nSubject: x\r\n\r\n"], until=b"a1 ", login_as=user)
    assert b"a1 NO [TRYCREATE]" in reply
    assert wait_for(lambda: not part_files(server))


@pytest.fixture
def store(tmp_path):
    with Store(open_data_dir(tmp_path / "var", 2)) as s:
        s.ensure_account("a@example.test")
        yield s


def literal(store: Store, **kwargs) -> AppendLiteral:
    options = {"flags": (), "internal_date": None, "limit": 1000} | kwargs
    return AppendLiteral(store, "a@example.test", "INBOX", **options)


def stored(store: Store) -> list[bytes]:
    return [store.read_message(i) for i in store.fetch("a@example.test", "INBOX", [(1, 2**32 - 1)])]


@pytest.mark.parametrize("pieces", [
    [b"Subject: s\r", b"\n\r\nline\n", b"\nend\r", b"\n"],  # CRLF split: kept; bare LFs: CRLF
    [b"Subject: s\n", b"\n", b"line\r\n\n", b"end\n"],
    [b"Subject: s\r\n\r\nline\r\n\r\nend\r\n"],
])
def test_the_pieces_of_a_literal_become_one_message_with_crlf(store, pieces):
    sink = literal(store)
    for piece in pieces:
        sink.write(piece)
    assert len(sink) == sum(map(len, pieces))
    sink.commit()
    (message,) = stored(store)
    assert message.replace(b"\r\n", b"") .count(b"\n") == 0 and message.count(b"\r") == message.count(b"\r\n")
    assert message.startswith(b"Subject: s\r\n\r\nline\r\n") and message.endswith(b"end\r\n")


def test_a_literal_over_the_limit_once_its_lfs_are_crlf_is_dropped(store):
    sink = literal(store, limit=100)
    sink.write(b"Subject: s\n\n" + b"\n" * 80)  # 92 octets sent, 174 stored
    assert sink.too_big and len(sink) == 92
    sink.close()
    assert stored(store) == [] and not list(store.shard("a@example.test").tmp_root.glob("*/*"))


def test_a_bad_flag_is_answered_at_the_end_and_nothing_is_kept(store):
    sink = literal(store, flags=("\\Bogus",))
    sink.write(b"Subject: s\r\n\r\nx\r\n")
    with pytest.raises(FlagError):
        sink.commit()
    sink.close()
    assert stored(store) == []
