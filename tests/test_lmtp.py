"""The cluster's LMTP hand-off (RFC 2033): `postroom serve` with [smtp] lmtp_listen on
loopback, driven by Python's smtplib.LMTP (an LMTP client that is not ours) and by the
handing node's own client (mtad/lmtp_client.py); what was stored is read back through the
storage API."""

from __future__ import annotations

import asyncio
import itertools
import smtplib

import pytest
from waiting import wait_until

from conftest import add_accounts, free_port, start_daemon, start_module_daemon, write_config_file
from mtad.lmtp import HEADROOM
from mtad.lmtp_client import HandOffError, hand_over
from storage import Accounts, open_data_dir
from storage.store import Store

_tests = itertools.count(1)
MESSAGE = (b"From: sender@remote.example\r\nTo: team@example.test\r\nSubject: handed over\r\n"
           b"Message-ID: <%d.lmtp@remote.example>\r\n\r\nfirst line\r\n.a line that starts with a dot\r\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A per-address limit of 5, below what one busy node hands over at once (the MX's own).
    daemon = start_module_daemon(tmp_path_factory.mktemp("lmtp"), smtp={"max_connections_per_ip": 5,
                                                                       "lmtp_listen": [f"127.0.0.1:{free_port()}"]})
    add_accounts(daemon.config_path)
    daemon.store = Store(open_data_dir(daemon.config.server.data_dir, 4))
    yield daemon
    daemon.store.close()
    assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture
def users(server):
    """Two users of this test alone."""
    n = next(_tests)
    alice, bob = f"alice{n}@example.test", f"bob{n}@example.test"
    config = server.config
    with Accounts(open_data_dir(config.server.data_dir, 4).accounts_path) as accounts:
        accounts.add_user(alice, "correct horse battery")
        accounts.add_user(bob, "correct horse battery")
    return alice, bob


def _stored(server, account: str) -> list[bytes]:
    store = server.store
    return [store.read_message(m) for m in store.fetch(account, "INBOX", [(1, 2**32 - 1)])]


def _lmtp(server) -> smtplib.LMTP:
    address = server.listen("smtp.lmtp_listen")
    return smtplib.LMTP(address.host, address.port, timeout=30)


def test_one_reply_per_recipient_after_the_data(server, users):
    alice, bob = users
    client = _lmtp(server)
    try:
        code, features = client.ehlo("node-a.cluster.test")  # smtplib's LMTP sends LHLO
        assert code == 250
        assert b"PIPELINING" in features and b"ENHANCEDSTATUSCODES" in features
        assert b"CHUNKING" not in features
        assert client.mail("sender@remote.example")[0] == 250
        assert client.rcpt(alice)[0] == 250
        assert client.rcpt("nobody@example.test")[0] == 550
        assert client.rcpt(bob)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(MESSAGE.replace(b"\r\n.a", b"\r\n..a") % 1 + b".\r\n")
        first, second = client.getreply(), client.getreply()  # one each for alice and bob
        assert first[0] == 250 and second[0] == 250, (first, second)
        assert client.noop()[0] == 250  # nothing more was said: the session goes on
    finally:
        client.quit()
    for account in (alice, bob):
        (stored,) = _stored(server, account)
        assert stored.startswith(b"Return-Path: <sender@remote.example>\r\nReceived: from node-a.cluster.test")
        assert b"with LMTP id " in stored
        assert stored.endswith(b"first line\r\n.a line that starts with a dot\r\n")


def test_ehlo_helo_and_bdat_are_not_lmtp(server):
    client = _lmtp(server)
    try:
        assert client.docmd("EHLO", "node-a.cluster.test")[0] == 500
        assert client.docmd("HELO", "node-a.cluster.test")[0] == 500
        assert client.docmd("LHLO", "node-a.cluster.test")[0] == 250
        assert client.docmd("MAIL", "FROM:<sender@remote.example>")[0] == 250
        assert client.docmd("BDAT", "10 LAST")[0] == 501
    finally:
        client.close()


def test_the_handing_nodes_client(server, users):
    alice, bob = users
    address = server.listen("smtp.lmtp_listen")
    # One refused: no data, no copy for the others (every copy or none, mtad/routing.py).
    outcomes = asyncio.run(hand_over(address.host, address.port, helo="node-b.cluster.test",
                                     sender="sender@remote.example",
                                     recipients=[alice, "nobody@example.test", bob], message=MESSAGE % 2))
    assert {r: o.code for r, o in outcomes.items()} == {alice: 451, "nobody@example.test": 550, bob: 451}
    assert not _stored(server, alice) and not _stored(server, bob)
    outcomes = asyncio.run(hand_over(address.host, address.port, helo="node-b.cluster.test",
                                     sender="sender@remote.example", recipients=[alice, bob], message=MESSAGE % 2))
    assert {r: o.code for r, o in outcomes.items()} == {alice: 250, bob: 250}
    for account in (alice, bob):
        (stored,) = _stored(server, account)
        assert stored.endswith(b"first line\r\n.a line that starts with a dot\r\n")  # dot-stuffed and back


def _lmtps_alone(server, keyword: str, bad: list[str], good: str) -> None:
    """A private MAIL parameter: offered at LHLO, each of `bad` refused 501 and `good` taken;
    the MX neither offers nor knows it (555)."""
    client = _lmtp(server)
    try:
        assert keyword.encode() in client.ehlo("node-a.cluster.test")[1]
        for param in bad:
            assert client.docmd("MAIL", f"FROM:<sender@remote.example> {param}")[0] == 501, param
        assert client.docmd("MAIL", f"FROM:<sender@remote.example> {good}")[0] == 250
    finally:
        client.close()
    address = server.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        assert keyword.encode() not in client.ehlo("sender.example")[1]
        assert client.docmd("MAIL", f"FROM:<sender@remote.example> {good}")[0] == 555


def test_xsent_is_lmtps_alone_and_checked(server):
    """XSENT (mtad/lmtp.py): a number no bigger than a handed-over message may be (the
    limit and the handing node's headers)."""
    too_big = str(server.config.smtp.max_message_size + HEADROOM + 1)
    _lmtps_alone(server, "XSENT", [f"XSENT={bad}" for bad in ("abc", "-1", "1" * 13, too_big)], "XSENT=120")


def test_a_junk_verdict_is_carried_and_xjunk_is_lmtps_alone(server, users):
    """XJUNK (mtad/lmtp.py): the handing node's policy judged the message spam, and each
    copy goes to its account's Junk mailbox here; a flag without a value, unknown to the MX."""
    alice, bob = users
    address = server.listen("smtp.lmtp_listen")
    outcomes = asyncio.run(hand_over(address.host, address.port, helo="node-b.cluster.test",
                                     sender="sender@remote.example", recipients=[alice, bob], message=MESSAGE % 4,
                                     junk=True))
    assert {r: o.code for r, o in outcomes.items()} == {alice: 250, bob: 250}
    store = server.store
    for account in (alice, bob):
        assert not _stored(server, account)
        (junk,) = [store.read_message(m) for m in store.fetch(account, "Junk", [(1, 2**32 - 1)])]
        assert junk.endswith(b"first line\r\n.a line that starts with a dot\r\n")
    _lmtps_alone(server, "XJUNK", ["XJUNK=yes"], "XJUNK")


def test_the_client_says_when_the_owner_cannot_be_reached():
    with pytest.raises(HandOffError, match="cannot connect"):
        asyncio.run(hand_over("127.0.0.1", free_port(), helo="node-b.cluster.test", sender="",
                              recipients=["alice@example.test"], message=MESSAGE % 3, timeout=5))


def test_an_mx_listener_is_not_lmtp(server):
    address = server.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        assert client.docmd("LHLO", "node-a.cluster.test")[0] == 500


def test_a_node_may_hand_over_more_at_once_than_a_client_may_connect(server):
    """The MX's per-address limit (5 here) is for strangers; another node of the cluster
    opens as many LMTP connections at once as its own clients send it messages."""
    clients = [_lmtp(server) for _ in range(12)]
    try:
        assert all(client.noop()[0] == 250 for client in clients)
    finally:
        for client in clients:
            client.close()


def test_the_lmtp_listener_has_a_connection_limit_of_its_own(tmp_path):
    """[smtp] lmtp_max_connections: what every node together may hold open (3 here); the
    next connection is told 421 4.7.0 and closed, and one is taken again once one closes."""
    config = write_config_file(tmp_path / "lmtp.toml", tmp_path / "var",
                               smtp={"lmtp_listen": [f"127.0.0.1:{free_port()}"], "lmtp_max_connections": 3})
    daemon = start_daemon(config, tmp_path)
    try:
        held = [_lmtp(daemon) for _ in range(3)]
        assert all(client.noop()[0] == 250 for client in held)
        with pytest.raises(smtplib.SMTPConnectError, match="421") as refused:
            _lmtp(daemon)
        assert b"4.7.0" in refused.value.smtp_error
        held.pop().close()
        wait_until(lambda: _lmtp_taken(daemon), 10, "a fourth connection once one closed")
        for client in held:
            client.close()
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    assert 'reason="too many LMTP connections"' in daemon.stderr(), daemon.stderr()[-2000:]


def _lmtp_taken(daemon) -> bool:
    try:
        client = _lmtp(daemon)
    except smtplib.SMTPConnectError:
        return False
    client.close()
    return True
