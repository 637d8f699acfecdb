"""What a red-team pass over the cluster found (two whole nodes on a real etcd, as in
tests/test_cluster_drain.py), kept as regressions.

- A message the size limit allows is taken by whichever node the sender reaches: the
  owner's LMTP listener must leave room for the trace and verdict headers the handing node
  put in front (mtad/lmtp.py, HEADROOM). Without it, a message within a few hundred bytes
  of [smtp] max_message_size was stored when sent to the owner and answered 451 4.4.0 by
  every other node, every time (the owner said 552 to the hand-off): a sender that reached
  another node retried for days and bounced.
- An alias of more accounts on one node than [smtp] max_recipients: the handing node sends
  the owner one RCPT per account, and the owner refused those past the limit (452), so the
  message was answered 451 at every node, every time, with the first accounts' copies
  stored nonetheless (mtad/lmtp.py, MAX_ACCOUNTS).
"""

from __future__ import annotations

import smtplib
import uuid
from pathlib import Path

import pytest
from cluster_nodes import start_nodes, stop_nodes, wait_owners
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd
from storage import Store, open_data_dir

SHARDS = 4
NODES = ("node-a", "node-b")
USERS = [f"user{i}@example.test" for i in range(8)]
PASSWORD = "correct horse battery"
MAX_SIZE = 200_000  # [smtp] max_message_size: small, so that the test sends little
MAX_RECIPIENTS = 2  # [smtp] max_recipients: fewer than the alias's accounts on each node
ALIAS = "team@example.test"


@pytest.fixture
def nodes(tmp_path: Path, etcd_server):  # noqa: F811
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS, users=USERS,
                                   password=PASSWORD, aliases={ALIAS: USERS},
                                   smtp={"max_message_size": MAX_SIZE, "max_recipients": MAX_RECIPIENTS})
    try:
        yield running, Etcd(conf.load(configs["node-a"]).cluster), tmp_path / "var"
    finally:
        stop_nodes(running)


def _message(recipient: str, message_id: str, size: int) -> bytes:
    """A message of exactly `size` bytes as the SMTP server counts them (CRLF lines)."""
    head = (f"From: someone@remote.example\r\nTo: {recipient}\r\nSubject: near the limit\r\n"
            f"Message-ID: {message_id}\r\n\r\n").encode()
    body_size = size - len(head)
    lines = b"x" * 76 + b"\r\n"
    body = lines * (body_size // len(lines))
    return head + body + b"y" * (body_size - len(body) - 2) + b"\r\n"


def test_a_message_near_the_size_limit_is_taken_by_any_node(nodes):
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        user = next(u for u in USERS if owners[store.shard_number(u)] == "node-b")
    wait_until(lambda: "event=ready" in running["node-a"].stderr(), 10, "node-a's agent ready")

    sent = {}
    for node in ("node-b", "node-a"):  # the owner itself, then a node that hands it over
        message_id = f"<{uuid.uuid4().hex}@remote.example>"
        message = _message(user, message_id, MAX_SIZE - 10)
        assert len(message) == MAX_SIZE - 10
        address = running[node].listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=60) as client:
            code, text = client.ehlo("sender.example")
            assert code == 250
            client.mail("someone@remote.example")
            client.rcpt(user)
            code, text = client.data(message)
        assert code == 250, f"at {node}: {code} {text!r}"
        sent[node] = message_id

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        stored = [store.read_message(m) for m in store.fetch(user, "INBOX", [(1, 2**32 - 1)])]
    for node, message_id in sent.items():
        assert sum(message_id.encode() in raw for raw in stored) == 1, node


def test_an_alias_of_more_accounts_than_the_recipient_limit(nodes):
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        on_each = [sum(owners[store.shard_number(u)] == node for u in USERS) for node in NODES]
    assert min(on_each) > MAX_RECIPIENTS, on_each  # each node hands the other more than the limit
    wait_until(lambda: all("event=ready" in running[n].stderr() for n in NODES), 10, "the agents ready")

    sent = []
    for node in NODES:
        message_id = f"<{uuid.uuid4().hex}@remote.example>"
        address = running[node].listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=60) as client:
            client.ehlo("sender.example")
            client.mail("someone@remote.example")
            assert client.rcpt(ALIAS)[0] == 250
            code, text = client.data(f"From: someone@remote.example\r\nTo: {ALIAS}\r\nSubject: all of us\r\n"
                                     f"Message-ID: {message_id}\r\n\r\nhello\r\n".encode())
        assert code == 250, f"at {node}: {code} {text!r}"
        sent.append(message_id)

    with Store(open_data_dir(data_dir, SHARDS)) as store:
        for user in USERS:
            stored = [store.read_message(m) for m in store.fetch(user, "INBOX", [(1, 2**32 - 1)])]
            for message_id in sent:
                assert sum(message_id.encode() in raw for raw in stored) == 1, (user, message_id)
