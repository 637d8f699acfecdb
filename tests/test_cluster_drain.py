"""A drain in the middle of transactions (issue 18, item 6: "a drain moves shards with no
refused delivery"): two whole nodes on a real etcd; SMTP transactions whose recipient's
shard node-b owns are left open in their DATA while node-b is drained, then finished. The
shard changed hands between their RCPT and their commit: each is still answered 250 and
stored once, by the new owner (cluster/agent.py hands over gracefully; mtad/routing.py
follows the owner at the commit).
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cluster_nodes import owner_of, start_nodes, stop_nodes, stored, wait_balanced, wait_owners
from conftest import POSTROOM
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd
from storage import Store, open_data_dir

PROBE = Path(__file__).with_name("detach_probe.py")

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


HOLD = 4.0  # seconds each volume's detach takes in the test below, as an RBD unmap may


def test_a_slow_detach_keeps_recipients_waiting_not_refused(tmp_path: Path, etcd_server):  # noqa: F811
    """Each volume's detach takes seconds: a drained node's shards are without an owner for
    the grace, the detach and the next owner's claim, longer than a RCPT used to wait for
    one (5 s: they were answered 451 4.4.0). Mail for their users sent meanwhile, to either
    node, waits and is taken; and the node's volumes are detached at once, not one after
    another (a node holds hundreds)."""
    record = tmp_path / "detached.jsonl"
    detach = f"{sys.executable} {PROBE} {{shard}} {{path}} {record} {HOLD}"
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS, users=USERS,
                                   password=PASSWORD, cluster={"detach": detach})
    try:
        etcd = Etcd(conf.load(configs["node-a"]).cluster)
        data_dir = tmp_path / "var"
        owners = wait_balanced(etcd, NODES, SHARDS, 20)
        with Store(open_data_dir(data_dir, SHARDS)) as store:
            users_b = {}  # one user in each of node-b's shards
            for user in USERS:
                users_b.setdefault(store.shard_number(user), user)
            users_b = {shard: user for shard, user in users_b.items() if owners[shard] == "node-b"}
        assert len(users_b) == SHARDS // 2
        wait_until(lambda: all("event=ready" in d.stderr() for d in running.values()), 10, "the agents ready")

        drain = subprocess.Popen([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-b"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: "event=shards_leaving" in running["node-b"].stderr(), 20, "node-b's shards leaving")
        results: dict[tuple[str, str], tuple[object, float]] = {}

        def send(node: str, user: str) -> None:
            started = time.monotonic()
            address = running[node].listen("smtp.listen")
            message = (f"From: someone@remote.example\r\nTo: {user}\r\nSubject: during the detach\r\n"
                       f"Message-ID: <{node}.{uuid.uuid4().hex}@remote.example>\r\n\r\nhello\r\n")
            try:
                with smtplib.SMTP(address.host, address.port, timeout=60) as client:
                    client.sendmail("someone@remote.example", [user], message)
                outcome: object = 250
            except smtplib.SMTPException as e:
                outcome = e
            results[(node, user)] = (outcome, time.monotonic() - started)

        senders = [threading.Thread(target=send, args=(node, user)) for node in NODES for user in users_b.values()]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(90)
        output, _ = drain.communicate(timeout=60)
        assert drain.returncode == 0, output

        assert all(outcome == 250 for outcome, _ in results.values()), results
        # They did wait: the shards had no owner for at least a detach.
        assert max(took for _, took in results.values()) >= HOLD - 1, results
        for user in users_b.values():
            assert len(stored(data_dir, SHARDS, user)) == len(NODES), user
        # node-b's detaches ran at the same time: each began before any ended. (The record
        # begins with node-a's, as node-b joined: the drain's are the last of these shards.)
        detaches = [json.loads(line) for line in record.read_text().splitlines()]
        drained = [d for d in detaches if d["shard"] in users_b][-len(users_b):]
        assert sorted(d["shard"] for d in drained) == sorted(users_b), detaches
        assert max(d["started"] for d in drained) < min(d["ended"] for d in drained), drained
    finally:
        stop_nodes(running)
