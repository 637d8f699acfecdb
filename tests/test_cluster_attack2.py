"""A second red-team pass over the cluster (two whole nodes on a real etcd, as in
tests/test_cluster_drain.py), kept as regressions.

- A message the policy files as Junk, coming in over SMTP while its recipient's shard is
  drained away from the node (a slow sender; the copy let go of and kept to hand over,
  mtad/routing.py Route.let_go): the Junk verdict asked the released shard for the
  recipient's Junk mailbox (mtad/agent.py junk_mailboxes), which raised NotOwnerError, and
  the sender was told 451 4.3.0, every time the drain fell in its DATA. The Junk verdict
  travels with the hand-off (LMTP's XJUNK); a shard not held here is not asked.
"""

from __future__ import annotations

import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cluster_nodes import owner_of, start_nodes, stop_nodes, stored, wait_owners
from conftest import POSTROOM
from dnszone import DNSZone
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd

SHARDS = 4
NODES = ("node-a", "node-b")
USERS = [f"user{i}@example.test" for i in range(16)]
PASSWORD = "correct horse battery"


@pytest.fixture
def policy_nodes(tmp_path: Path, etcd_server):  # noqa: F811
    """Two nodes with the policy on (DNS: an empty zone on loopback); a message without a
    From: scores over the Junk threshold, under the reject one."""
    with DNSZone({}) as zone:
        running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS, users=USERS,
                                       password=PASSWORD,
                                       dns={"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 2},
                                       policy={"enabled": True}, **{"policy.weights": {"no_from": 10.0}})
        try:
            yield running, configs, Etcd(conf.load(configs["node-a"]).cluster), tmp_path / "var"
        finally:
            stop_nodes(running)


def _drain(configs, node: str) -> None:
    drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", node],
                             capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stdout + drained.stderr


def _open_data(daemon, recipients: list[str], head: bytes) -> smtplib.SMTP:
    address = daemon.listen("smtp.listen")
    client = smtplib.SMTP(address.host, address.port, timeout=60)
    client.ehlo("sender.example")
    assert client.mail("someone@remote.example")[0] == 250
    for recipient in recipients:
        assert client.rcpt(recipient)[0] == 250
    client.putcmd("data")
    assert client.getreply()[0] == 354
    client.send(head)
    return client


def test_a_junk_message_arriving_across_a_drain_is_taken(policy_nodes):
    running, configs, etcd, data_dir = policy_nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    wait_until(lambda: all("event=ready" in d.stderr() for d in running.values()), 10, "the agents ready")
    user = next(u for u, node in owner_of(data_dir, SHARDS, owners, USERS).items() if node == "node-b")
    message_id = f"<{uuid.uuid4().hex}@remote.example>"
    # No From: a Junk verdict. Past what a delivery keeps in memory: its file is open.
    client = _open_data(running["node-b"], [user], f"To: {user}\r\nSubject: spam across a drain\r\n"
                        f"Message-ID: {message_id}\r\n\r\n".encode() + (b"x" * 998 + b"\r\n") * 100)
    try:
        time.sleep(0.5)
        _drain(configs, "node-b")
        wait_until(lambda: running["node-b"].stderr().count("event=shard_released") >= 2, 30, "node-b's release")
        client.send(b"the end\r\n.\r\n")
        code, text = client.getreply()
    finally:
        client.close()
    assert code == 250, (code, text, running["node-b"].stderr()[-3000:])
    junk = stored(data_dir, SHARDS, user, "Junk")
    assert sum(message_id.encode() in raw for raw in junk) == 1
    assert not any(message_id.encode() in raw for raw in stored(data_dir, SHARDS, user))
