"""A shard released by a node (`postroom cluster drain`) is let go by every daemon process of
that node, not only by its agent (issue 18, item 3; cluster/follow.py): the IMAP and POP3
sessions it served for the shard's accounts are told (`* BYE [UNAVAILABLE]`, `-ERR
[SYS/TEMP]`) and closed, no daemon keeps a file of the shard open (its volume could not be
detached otherwise), and a new login through the drained node is proxied to the new owner.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import subprocess
import uuid
from pathlib import Path

import pytest
from cluster_nodes import start_nodes, stop_nodes, wait_owners
from conftest import POSTROOM, client_tls_context
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd
from cluster.local import open_node_table
from storage import Store, open_data_dir

SHARDS = 4
NODES = ("node-a", "node-b")
PASSWORD = "correct horse battery"
DAEMONS = ("mtad", "imapd", "pop3d")


@pytest.fixture
def nodes(tmp_path: Path, etcd_server):  # noqa: F811
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS,
                                   users=[f"user{i}@example.test" for i in range(40)], password=PASSWORD)
    try:
        yield running, configs, tmp_path / "var"
    finally:
        stop_nodes(running)


def _send(daemon, recipient: str, subject: str) -> None:
    address = daemon.listen("smtp.listen")
    message = f"From: someone@remote.example\r\nTo: {recipient}\r\nSubject: {subject}\r\n" \
              f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\n\r\nhello\r\n"
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("someone@remote.example", [recipient], message)  # raises unless 250


def _open_under(pid: int, root: Path) -> list[str]:
    """What process `pid` holds open under `root`: descriptors, and mappings (LMDB's)."""
    prefix = str(root) + "/"
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith(prefix):
            found.append(f"fd {fd}: {target}")
    with open(f"/proc/{pid}/maps") as maps:
        found += [f"map: {line.split(None, 5)[-1].strip()}" for line in maps if prefix in line]
    return found


def _imap(daemon) -> imaplib.IMAP4_SSL:
    address = daemon.listen("imap.listen_tls")
    return imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config), timeout=30)


def _pop3(daemon) -> poplib.POP3_SSL:
    address = daemon.listen("pop3.listen_tls")
    return poplib.POP3_SSL(address.host, address.port, context=client_tls_context(daemon.config), timeout=30)


def _log_in_imap(daemon, account: str) -> imaplib.IMAP4_SSL | None:
    """A session that sees the account's INBOX, or None while the shard is between owners."""
    client = _imap(daemon)
    try:
        client.login(account, PASSWORD)
    except imaplib.IMAP4.error as e:
        assert "UNAVAILABLE" in str(e), e
        client.logout()
        return None
    return client


def test_a_drained_node_lets_go_of_its_shards(nodes):
    running, configs, data_dir = nodes
    node_a, node_b = running["node-a"], running["node-b"]
    owners = wait_owners(Etcd(conf.load(configs["node-a"]).cluster), NODES, SHARDS, 20, every_node=True)
    store = Store(open_data_dir(data_dir, SHARDS))  # shard numbers only: nothing opened here
    account = next(f"user{i}@example.test" for i in range(40)
                   if owners[store.shard_number(f"user{i}@example.test")] == "node-a")
    shard = store.shard_number(account)
    table = open_node_table(conf.load(configs["node-a"]), open_data_dir(data_dir, SHARDS))
    try:
        wait_until(lambda: shard in table.claims(), 10, "node-a's table shows its claim")
    finally:
        table.close()
    _send(node_b, account, "before the drain")

    # Sessions on node-a itself, served from its store (not proxied).
    imap = _imap(node_a)
    imap.login(account, PASSWORD)
    assert imap.select("INBOX") == ("OK", [b"1"])
    pop3 = _pop3(node_a)
    pop3.user(account)
    assert pop3.pass_(PASSWORD).startswith(b"+OK")
    assert pop3.stat()[0] == 1
    logins = [line for line in node_a.stderr().splitlines() if "event=login " in line and account in line]
    assert len(logins) == 2 and not any("proxied_to" in line for line in logins), logins
    pids = {name: node_a.child_pid(name) for name in DAEMONS}
    shards_dir = data_dir / "shards"
    before = {name: _open_under(pid, shards_dir) for name, pid in pids.items()}
    assert all(before.values()), before  # each daemon had the shards open: the check below can fail

    drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-a"],
                             capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stderr

    # The IMAP session is told, unasked, and closed: RFC 5530's UNAVAILABLE.
    imap.sock.settimeout(15)
    bye = imap.readline()
    assert bye.startswith(b"* BYE [UNAVAILABLE]"), bye
    assert imap.readline() == b""
    imap.shutdown()
    # The POP3 session's -ERR is the answer to its next command; the connection is closed.
    pop3.sock.settimeout(15)
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        pop3.noop()
    pop3.close()
    assert "reason=shard_released" in node_a.stderr()

    # No daemon of node-a holds a file of any shard (all released by the drain) open.
    wait_until(lambda: not any(_open_under(pid, shards_dir) for pid in pids.values()), 15,
               "node-a's daemons close the shards it released")
    assert "event=shard_closed" in node_a.stderr()

    # A new login through node-a is proxied to node-b, which owns the shard now.
    client = wait_until(lambda: _log_in_imap(node_a, account), 20, "IMAP login through the drained node")
    try:
        assert client.select("INBOX") == ("OK", [b"1"])
        _, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"before the drain" in data[0][1]
    finally:
        client.logout()
    assert f"proxied_to=127.0.0.1:{node_b.listen('imap.listen').port}" in node_a.stderr()
    pop3 = _pop3(node_a)
    try:
        pop3.user(account)
        assert pop3.pass_(PASSWORD).startswith(b"+OK")
        assert pop3.stat()[0] == 1
    finally:
        pop3.quit()
    # Still none open: the proxied sessions used node-b's store.
    assert not any(_open_under(pid, shards_dir) for pid in pids.values())
    store.close()
