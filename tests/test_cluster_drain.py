"""A drain in the middle of transactions (issue 18, item 6: "a drain moves shards with no
refused delivery"): two whole nodes on a real etcd; SMTP transactions whose recipient's
shard node-b owns are left open in their DATA while node-b is drained, then finished. The
shard changed hands between their RCPT and their commit: each is still answered 250 and
stored once, by the new owner (cluster/agent.py hands over gracefully; mtad/routing.py
follows the owner at the commit).
"""

from __future__ import annotations

import smtplib
import subprocess
import uuid
from pathlib import Path

import pytest
from cluster_nodes import owner_of, start_nodes, stop_nodes, stored, wait_owners
from conftest import POSTROOM
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd

SHARDS = 4
NODES = ("node-a", "node-b")
USERS = [f"user{i}@example.test" for i in range(16)]
PASSWORD = "correct horse battery"


@pytest.fixture
def nodes(tmp_path: Path, etcd_server):  # noqa: F811
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS, users=USERS,
                                   password=PASSWORD)
    try:
        yield running, configs, Etcd(conf.load(configs["node-a"]).cluster), tmp_path / "var"
    finally:
        stop_nodes(running)


class OpenTransaction:
    """An SMTP transaction left in the middle of its DATA: the recipient taken, half the
    message sent."""

    def __init__(self, daemon, recipient: str, subject: str):
        address = daemon.listen("smtp.listen")
        self.message_id = f"<{uuid.uuid4().hex}@remote.example>"
        self.client = smtplib.SMTP(address.host, address.port, timeout=30)
        self.client.ehlo("sender.example")
        assert self.client.mail("someone@remote.example")[0] == 250
        assert self.client.rcpt(recipient)[0] == 250
        self.client.putcmd("data")
        assert self.client.getreply()[0] == 354
        self.client.send(f"From: someone@remote.example\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
                         f"Message-ID: {self.message_id}\r\n\r\nfirst half\r\n".encode())

    def finish(self) -> tuple[int, bytes]:
        self.client.send(b"second half\r\n.\r\n")
        reply = self.client.getreply()
        self.client.quit()
        return reply


def test_transactions_open_across_a_drain_are_delivered(nodes):
    running, configs, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    user = next(u for u, node in owner_of(data_dir, SHARDS, owners, USERS).items() if node == "node-b")
    # The daemons' node tables follow the agents' claims.
    wait_until(lambda: "event=ready" in running["node-b"].stderr(), 10, "node-b's agent ready")

    # At node-b, which owns the user: stored here, once its commit comes. At node-a: handed
    # to node-b over LMTP at the commit.
    at_owner = OpenTransaction(running["node-b"], user, "taken by the owner")
    at_other = OpenTransaction(running["node-a"], user, "taken by the other node")

    drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-b"],
                             capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert set(wait_owners(etcd, ("node-a",), SHARDS, 20).values()) == {"node-a"}
    wait_until(lambda: "event=shard_released" in running["node-b"].stderr(), 10, "node-b's release")

    for transaction in (at_owner, at_other):
        code, text = transaction.finish()
        assert code == 250, text

    found = stored(data_dir, SHARDS, user)
    ids = sorted(raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode() for raw in found)
    assert ids == sorted([at_owner.message_id, at_other.message_id])
    assert all(b"first half\r\nsecond half\r\n" in raw for raw in found)
    # The owner's copy was followed to node-a at the commit, with one Return-Path: (node-a's).
    assert all(raw.count(b"Return-Path:") == 1 for raw in found), found
    assert "event=owners_changed" in running["node-b"].stderr() + running["node-a"].stderr()
