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
- A hand-off with one recipient refused by its owner (its mailbox filled, or its account
  gone) stores nothing for the others, on that owner or on another: the sender is told 451
  and sends the message again to all. The owners used to store the others' copies at each
  try: a message with no Message-ID (no deduplication key) reached them once per try until
  the full mailbox had room (mtad/lmtp_client.py; for two owners, mtad/routing.py).
- An owner (or whatever answers at its LMTP address) that sends a line longer than the
  handing node's reader takes (8 KiB) made the reader raise LimitOverrunError, which is no
  ValueError: it escaped HandOffError, so the hand-off's retry at the shard's next owner was
  skipped and the sender's session logged a traceback (decision_failed) for its 451
  (mtad/lmtp_client.py).
- An owner whose mtad dies in the middle of a hand-off (SIGKILL while the data goes over):
  the reset closes the LMTP connection under the handing node, whose QUIT on it then raised
  RuntimeError in uvloop (mtad's loop) from the hand-off's `finally`. That replaced the
  HandOffError, so the hand-off was not tried at the shard's new owner (a node that died
  hands its shards on within its lease) and the sender got 451 4.3.0 with a traceback
  logged (decision_failed) where it should have got 451 4.4.0, or a 250 from the new owner
  (mtad/lmtp_client.py, Handing.close).
- A hand-off to a node for an account whose shard it does not hold (the handing node's
  table behind, as during a drain, or a stray peer), when that account has a quota: the
  quota's check opened the shard, NotOwnerError escaped, and the RCPT was answered 451
  4.3.0 with a traceback logged (decision_failed) in place of the owner's clean 451 4.4.0
  (mtad/lmtp.py).
- A message from a sender whose address is beyond ASCII (SMTPUTF8, RFC 6531) was stored
  when sent to its recipient's owner and answered 451 4.4.0 by every other node, every
  time: the hand-off's MAIL FROM went without SMTPUTF8 (mtad/routing.py does not pass the
  transaction's flag), and the owner refused it (553 5.6.7), a refusal the handing node
  took as its owner's failure. The LMTP client now adds SMTPUTF8 to an envelope that
  needs it (mtad/lmtp_client.py).
- A POP3 client that asks for a big message (RETR) and reads it slowly, or not at all,
  while its node hands the shard over (`postroom cluster drain`): the session put off its
  end until the RETR was answered, which the client decides, so pop3d kept the message file
  and the maildrop lock open on the volume for the agent's whole LET_GO_WAIT (10 s,
  let_go_timeout) and the detach ran with both open (a real umount fails then, and the next
  owner cannot attach the shard). A session whose command waits for its client to read is
  now cut off at once (wire/protocol.py end_released).
- Under a watchdog (the units' WatchdogSec=30s: serve gives each child that interval, and
  kills one silent past it) the cluster agent's process never said WATCHDOG=1: serve sent
  it SIGABRT every interval, and each new agent revoked the last one's lease and claimed
  every shard again (new fences), the node holding none meanwhile; a shard could move to
  another node and back (volumes detached and attached again). With a 10 s watchdog on two
  nodes: both agents killed at 12.4 s and again 11.1 s later, node-b's shards claimed by
  node-a then by node-b again within 1.2 s, one message in 160 deferred
  (postroom/cluster_agent.py).
- A node stopped gracefully (SIGTERM to `postroom serve`, as in a rolling restart): its
  mtad closes its LMTP listener at once, while its agent keeps its shards "leaving" for
  HANDOVER_GRACE and etcd still names it their owner. For about a second every hand-off to
  it was refused (connection refused), the owner unchanged, and the handing node answered
  451 4.4.0 at once: 40 of 40 messages in that second, where a drain defers none. Fixed in
  mtad/routing.py by its owner's change (an owner that cannot be reached is waited out).
- The same stop under CPU load: a hand-off whose LMTP connection node-b took just before
  the stop, its RCPT read once the agent had made the shard "leaving", waited in
  owners_known for the shard's next owner (OWNER_WAIT, 15 s). None could come sooner: the
  agent's release waits for the node's processes to let go of the shard, mtad holds it
  until its stop ends, and the stop waited for that session. node-b's hand-over took 14 s
  (shard_let_go waited=14.0), and the hand-offs node-a tried meanwhile (connection refused,
  or 421) waited out their own OWNER_WAIT for a new owner a few hundred ms too soon: 451
  4.4.0 for one to three messages, in 4 of 24 runs beside two or three CPU burners. A
  wait for an owner now ends at the stop (mtad/agent.py owners_known): the RCPT is
  answered, the hand-off told 421 and sent to the next owner within a second or two.

- An SMTP transaction at the owner, in the middle of its DATA while the node drains (a
  slow sender; [smtp] data_timeout lets one trickle for minutes): its delivery's file in
  the shard's tmp/ stayed open, so the agent waited its whole LET_GO_WAIT and detached the
  volume with the file open (nothing lost: the commit followed the shard to its new owner).
  Fixed in mtad/routing.py (Route.let_go: told by mtad's follower, the message reads back
  what it wrote, closes the delivery and keeps the copy to hand over).
- Any process on a node's address could hand mail over by LMTP (`is_peer` trusts the
  source address): from 127.0.0.1, MAIL FROM:<ceo@bank.example> XJUNK was stored with no
  check. A node now proves itself with the cluster's secret before MAIL (wire/node_proof.py;
  tests/test_cluster_handoff.py).
- The LMTP listener had no connection limit: 3,000 idle connections from a peer address
  took 30 MB and 3,000 descriptors. [smtp] lmtp_max_connections now (tests/test_lmtp.py).

Found and not fixed (an expected failure here, strict: it passes once fixed):
- A queued message being sent to a slow remote server while its node drains is sent twice.
  The delivery keeps the shard's spool file open (pinned, storage/queue.py: "a slow remote
  server"), the agent detaches after LET_GO_WAIT all the same, and the next owner's runner
  finds the message due (its attempt was never recorded) and sends it again while the first
  attempt is still waiting for the remote's reply to its data: the remote took both (250
  at 15.0 s on node-a, after the detach, and at 28.5 s on node-b); no line of node-a's log
  says that its result went unrecorded. Bounding the remote's wait does not help
  (the ambiguity is after the final dot); the queue needs an attempt "in flight until T"
  that a next owner honours, or the agent must wait for the delivery (cluster/agent.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import uvloop
from cluster_nodes import owner_of, start_nodes, stop_nodes, stored, wait_balanced, wait_owners
from cluster_nodes import owners as etcd_owners
from conftest import POSTROOM, client_tls_context, free_port
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from sinks import Sink
from waiting import wait_until

import conf
from cluster.etcd import Etcd
from mtad.lmtp_client import HandOffError, hand_over
from storage import Accounts, open_data_dir
from wire import node_proof as proof

SHARDS = 4
NODES = ("node-a", "node-b", "node-c")
USERS = [f"user{i}@example.test" for i in range(8)]
PASSWORD = "correct horse battery"
MAX_SIZE = 200_000  # [smtp] max_message_size: small, so that the test sends little
MAX_RECIPIENTS = 2  # [smtp] max_recipients: fewer than the alias's accounts on one node
ALIAS = "team@example.test"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, etcd_server):  # noqa: F811
    """One cluster for the module: each test names its messages by a Message-ID or subject
    of its own, and the quota it sets it lifts again."""
    tmp_path = tmp_path_factory.mktemp("attack")
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS, users=USERS,
                                   password=PASSWORD, aliases={ALIAS: USERS},
                                   smtp={"max_message_size": MAX_SIZE, "max_recipients": MAX_RECIPIENTS})
    try:
        yield running, Etcd(conf.load(configs["node-a"]).cluster), tmp_path / "var", configs
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
    running, etcd, data_dir, _ = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    user = next(u for u, node in owner_of(data_dir, SHARDS, owners, USERS).items() if node == "node-b")
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

    found = stored(data_dir, SHARDS, user)
    for node, message_id in sent.items():
        assert sum(message_id.encode() in raw for raw in found) == 1, node


def test_an_alias_of_more_accounts_than_the_recipient_limit(nodes):
    running, etcd, data_dir, _ = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    owner = owner_of(data_dir, SHARDS, owners, USERS)
    on_each = [sum(owner[u] == node for u in USERS) for node in NODES]
    assert max(on_each) > MAX_RECIPIENTS, on_each  # the others hand that node more than the limit
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

    for user in USERS:
        found = stored(data_dir, SHARDS, user)
        for message_id in sent:
            assert sum(message_id.encode() in raw for raw in found) == 1, (user, message_id)


def test_one_recipient_refused_at_its_owner_stores_no_copy_anywhere(nodes):
    running, etcd, data_dir, configs = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    # `kept` and `filled` on two owners, the message sent to a third node: it hands one
    # copy to each owner, and one of them refuses.
    owner = owner_of(data_dir, SHARDS, owners, USERS)
    kept = USERS[0]
    filled = next(u for u in USERS if owner[u] != owner[kept])
    via = next(node for node in NODES if node not in (owner[kept], owner[filled]))
    wait_until(lambda: "event=ready" in running[via].stderr(), 10, f"{via}'s agent ready")
    subject = uuid.uuid4().hex
    message = (f"From: someone@remote.example\r\nTo: {kept}, {filled}\r\nSubject: {subject}\r\n\r\n"
               "no Message-ID, so no deduplication\r\n").encode()

    address = running[via].listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=60) as client:  # a quota of 1 byte fills it
        client.sendmail("someone@remote.example", [filled], b"Subject: first\r\n\r\nsome bytes\r\n")
    # Both taken at the RCPT; then `filled`'s mailbox is full before the commit.
    client = smtplib.SMTP(address.host, address.port, timeout=60)
    client.ehlo("sender.example")
    client.mail("someone@remote.example")
    assert client.rcpt(kept)[0] == 250 and client.rcpt(filled)[0] == 250
    quota = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "user", "quota", filled, "1"],
                           capture_output=True, text=True, timeout=60)
    assert quota.returncode == 0, quota.stderr
    with Accounts(open_data_dir(data_dir, SHARDS).accounts_path) as accounts:  # the nodes' copy
        wait_until(lambda: accounts.get_user(filled).quota == 1, 10, "the quota in the nodes' copy")
    code, _ = client.data(message)
    client.quit()
    assert code == 451

    def copies(user: str) -> int:
        return sum(subject.encode() in raw for raw in stored(data_dir, SHARDS, user))

    assert copies(kept) == 0, "a copy stored although the sender was told 451"
    # The sender tries again, as told: the same while the mailbox is full (a mailbox another
    # node owns is that node's to say full, mtad/agent.py), with never a copy for `kept`.
    with smtplib.SMTP(address.host, address.port, timeout=60) as client:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            client.sendmail("someone@remote.example", [kept, filled], message)
    assert deferred.value.smtp_code == 451
    assert copies(kept) == 0
    lifted = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "user", "quota", filled, "0"],
                            capture_output=True, text=True, timeout=60)
    assert lifted.returncode == 0, lifted.stderr
    with smtplib.SMTP(address.host, address.port, timeout=60) as client:
        assert client.sendmail("someone@remote.example", [kept, filled], message) == {}
    assert (copies(kept), copies(filled)) == (1, 1)


@pytest.mark.parametrize("where", ["greeting", "data"])
def test_an_owner_that_sends_an_endless_line_is_a_hand_off_failure(where):
    """A line over the reader's limit, at the greeting or in the replies to the data: the
    hand-off fails as any reply that makes no sense does (HandOffError, answered 451 4.4.0
    and tried at the shard's next owner), not with an exception nobody expects."""
    endless = b"250 " + b"x" * 20_000 + b"\r\n"

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if where == "greeting":
                writer.write(endless)
            else:
                await _owner_up_to_the_data(reader, writer)
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(endless)
            await writer.drain()
            await reader.read()  # until the hand-off hangs up
        finally:
            writer.close()

    async def hand_over_to_it() -> None:
        port = free_port()
        server = await asyncio.start_server(owner, "127.0.0.1", port)
        try:
            with pytest.raises(HandOffError):
                await hand_over("127.0.0.1", port, helo="node-a.example", sender="someone@remote.example",
                                recipients=["user0@example.test"], message=b"Subject: hi\r\n\r\nhello\r\n",
                                timeout=10)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(hand_over_to_it(), 30))


def test_a_hand_off_to_a_node_that_does_not_hold_the_shard(nodes):
    running, etcd, data_dir, configs = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    owner = owner_of(data_dir, SHARDS, owners, USERS)
    user = next(u for u in USERS if owner[u] == "node-a")
    stray = next(node for node in NODES if node != "node-a")
    wait_until(lambda: "event=ready" in running[stray].stderr(), 10, f"{stray}'s agent ready")

    def quota(size: str) -> None:
        done = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "user", "quota", user, size],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    quota("100M")
    try:
        with Accounts(open_data_dir(data_dir, SHARDS).accounts_path) as accounts:  # the nodes' copy
            wait_until(lambda: accounts.get_user(user).quota, 10, "the quota in the nodes' copy")
        with socket.create_connection(("127.0.0.1", running[stray].config.cluster.lmtp_port), timeout=30) as lmtp:
            replies = lmtp.makefile("rb")
            greeting = replies.readline()
            assert greeting.startswith(b"220 ")
            lmtp.sendall(b"LHLO node-a.example\r\n")
            while replies.readline()[3:4] == b"-":
                pass
            # As node-a would (wire/node_proof.py): its proof of the secret for this greeting.
            secret = etcd.snapshot().keys["secret"].value
            answer = proof.proof(secret, proof.nonce_in(greeting.decode()), "node-a")
            lmtp.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0node-a\0{answer}".encode()) + b"\r\n")
            assert replies.readline().startswith(b"235 ")
            lmtp.sendall(f"MAIL FROM:<someone@remote.example>\r\nRCPT TO:<{user}>\r\nQUIT\r\n".encode())
            assert replies.readline().startswith(b"250 ")
            rcpt = replies.readline()
        assert rcpt.startswith(b"451 4.4.0 "), rcpt
        assert "event=decision_failed" not in running[stray].stderr()
    finally:
        quota("0")


def test_a_sender_beyond_ascii_is_taken_by_any_node(nodes):
    running, etcd, data_dir, _ = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    user = next(u for u, node in owner_of(data_dir, SHARDS, owners, USERS).items() if node == "node-b")
    wait_until(lambda: all("event=ready" in running[n].stderr() for n in NODES), 10, "the agents ready")
    sent = []
    for node in ("node-b", "node-a"):  # the owner itself, then a node that hands it over
        message_id = f"<{uuid.uuid4().hex}@remote.example>"
        address = running[node].listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=60) as client:
            client.ehlo("sender.example")
            assert client.mail("jos\u00e9@remote.example", ["SMTPUTF8"])[0] == 250
            assert client.rcpt(user)[0] == 250
            code, text = client.data(f"From: jos\u00e9@remote.example\r\nSubject: caf\u00e9\r\n"
                                     f"Message-ID: {message_id}\r\n\r\nhello\r\n".encode())
        assert code == 250, f"at {node}: {code} {text!r}"
        sent.append(message_id)
    found = stored(data_dir, SHARDS, user)
    for message_id in sent:
        assert sum(message_id.encode() in raw for raw in found) == 1


def test_an_owner_that_dies_in_the_data_is_a_hand_off_failure():
    """The owner's connection reset in the middle of the data (its process killed): under
    uvloop, as in mtad, the hand-off fails with HandOffError (451 4.4.0, then tried at the
    shard's next owner), and its QUIT on the dead connection raises nothing of its own."""

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _owner_up_to_the_data(reader, writer)
        await writer.drain()
        await reader.read(1000)  # some of the data, then the process dies: a reset (RST)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def hand_over_to_it() -> None:
        port = free_port()
        server = await asyncio.start_server(owner, "127.0.0.1", port)
        try:
            with pytest.raises(HandOffError):
                await hand_over("127.0.0.1", port, helo="node-a.example", sender="someone@remote.example",
                                recipients=["user0@example.test"],
                                message=b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20_000, timeout=10)
        finally:
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(hand_over_to_it(), 30))


PROBE = Path(__file__).with_name("detach_probe.py")


@pytest.fixture
def probed_nodes(tmp_path, etcd_server):  # noqa: F811
    """Two nodes of their own (the test drains one), whose detach command records what is
    open under the shard's directory when it runs (tests/detach_probe.py)."""
    record = tmp_path / "detached.jsonl"
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES[:2], shards=SHARDS, users=USERS,
                                   password=PASSWORD, cluster={"detach": f"{sys.executable} {PROBE} {{shard}} {{path}} {record}"})
    try:
        yield running, configs, tmp_path / "var", record
    finally:
        stop_nodes(running)


def test_a_slow_pop3_reader_does_not_hold_a_drained_shard(probed_nodes):
    running, configs, data_dir, record = probed_nodes
    node_b, user = _a_user_of_node_b(running, configs, data_dir)
    address = node_b.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=60) as client:
        client.sendmail("someone@remote.example", [user], b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 4000)

    # A RETR of 4 MB on node-b itself, read no further than its first kilobyte: the
    # server's buffers fill, and its RETR waits for the client.
    address = node_b.listen("pop3.listen_tls")
    raw = socket.create_connection((address.host, address.port), timeout=30)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pop3 = client_tls_context(node_b.config).wrap_socket(raw, server_hostname=address.host)
    try:
        replies = pop3.makefile("rb")
        assert replies.readline().startswith(b"+OK")
        pop3.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\nRETR 1\r\n".encode())
        assert [replies.readline()[:3] for _ in range(3)] == [b"+OK"] * 3
        replies.read(1000)
        time.sleep(1)
        earlier = record.read_text().count("\n") if record.exists() else 0
        drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-b"],
                                 capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stderr
        wait_until(lambda: node_b.stderr().count("event=shard_released") >= 2, 30, "node-b releases its shards")
        detached = [json.loads(line) for line in record.read_text().splitlines()[earlier:]]
        assert len(detached) == 2 and [d for d in detached if d["open"]] == [], detached
        assert "event=let_go_timeout" not in node_b.stderr()
        assert "reason=shard_released" in node_b.stderr()
    finally:
        pop3.close()
    # Nothing was deleted: the message is there for the next session, at the new owner.
    assert len(stored(data_dir, SHARDS, user)) == 1


def test_an_smtp_message_arriving_during_a_drain_does_not_hold_the_shard(probed_nodes):
    running, configs, data_dir, record = probed_nodes
    node_b, user = _a_user_of_node_b(running, configs, data_dir)
    message_id = f"<{uuid.uuid4().hex}@remote.example>"
    address = node_b.listen("smtp.listen")
    client = smtplib.SMTP(address.host, address.port, timeout=60)
    try:
        client.ehlo("sender.example")
        assert client.mail("someone@remote.example")[0] == 250 and client.rcpt(user)[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(f"From: someone@remote.example\r\nMessage-ID: {message_id}\r\n\r\n".encode()
                    + (b"first half " + b"x" * 987 + b"\r\n") * 500)  # past what is kept in memory
        time.sleep(1)
        earlier = record.read_text().count("\n") if record.exists() else 0
        drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-b"],
                                 capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stderr
        wait_until(lambda: node_b.stderr().count("event=shard_released") >= 2, 30, "node-b releases its shards")
        client.send(b"second half\r\n.\r\n")
        assert client.getreply()[0] == 250
    finally:
        client.close()
    assert sum(message_id.encode() in raw for raw in stored(data_dir, SHARDS, user)) == 1
    detached = [json.loads(line) for line in record.read_text().splitlines()[earlier:]]
    assert [d for d in detached if d["open"]] == [], detached
    assert "event=let_go_timeout" not in node_b.stderr()


@pytest.fixture
def three_nodes(tmp_path, etcd_server):  # noqa: F811
    """Three nodes of their own (the test stops one)."""
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=6, users=USERS, password=PASSWORD)
    try:
        yield running, configs, tmp_path / "var"
    finally:
        stop_nodes(running)


def test_a_node_stopped_gracefully_defers_no_hand_off(three_nodes):
    running, configs, data_dir = three_nodes
    etcd = Etcd(conf.load(configs["node-a"]).cluster)
    owners = wait_owners(etcd, NODES, 6, 20, every_node=True)
    wait_until(lambda: all("event=ready" in running[n].stderr() for n in NODES), 10, "the agents ready")
    on_b = [u for u, node in owner_of(data_dir, 6, owners, USERS).items() if node == "node-b"]
    outcomes: list[tuple[str, str, int]] = []  # (Message-ID, recipient, reply code)
    until = time.monotonic() + 8  # bounded: 4 senders, one message each 0.1 s at most

    def send(k: int) -> None:
        address = running["node-a"].listen("smtp.listen")
        for i in range(200):
            if time.monotonic() >= until:
                return
            recipient, message_id = on_b[(k + i) % len(on_b)], f"<{uuid.uuid4().hex}@remote.example>"
            try:
                with smtplib.SMTP(address.host, address.port, timeout=60) as client:
                    client.sendmail("someone@remote.example", [recipient],
                                    f"Subject: rolling\r\nMessage-ID: {message_id}\r\n\r\nhello\r\n")
                code = 250
            except smtplib.SMTPResponseException as e:
                code = e.smtp_code
            outcomes.append((message_id, recipient, code))
            time.sleep(0.1)

    senders = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for sender in senders:
        sender.start()
    time.sleep(2)
    running["node-b"].process.send_signal(signal.SIGTERM)
    for sender in senders:
        sender.join(120)
    # Never a 250 for a message not stored once (this holds); and, the point, no deferral.
    for message_id, recipient, code in outcomes:
        copies = sum(message_id.encode() in raw for raw in stored(data_dir, 6, recipient))
        assert copies == 1 if code == 250 else copies <= 1, (message_id, recipient, code, copies)
    assert [code for _, _, code in outcomes if code != 250] == []


def _node_b_and_its_user(three_nodes) -> tuple:
    """Three nodes owning shards and ready: (node-a's etcd, node-b's daemon, a user of one of
    node-b's shards, the data dir)."""
    running, configs, data_dir = three_nodes
    etcd = Etcd(conf.load(configs["node-a"]).cluster)
    owners = wait_owners(etcd, NODES, 6, 20, every_node=True)
    wait_until(lambda: all("event=ready" in running[n].stderr() for n in NODES), 10, "the agents ready")
    user = next(u for u, node in owner_of(data_dir, 6, owners, USERS).items() if node == "node-b")
    return etcd, running["node-b"], user, data_dir


def test_a_hand_off_in_progress_at_a_stopping_owner_holds_up_neither_its_stop_nor_its_shards(three_nodes):
    etcd, node_b, user, _ = _node_b_and_its_user(three_nodes)
    mtad = node_b.child_pid("mtad")
    with socket.create_connection(("127.0.0.1", node_b.config.cluster.lmtp_port), timeout=60) as lmtp:
        replies = lmtp.makefile("rb")
        greeting = replies.readline()
        lmtp.sendall(b"LHLO node-a.example\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        answer = proof.proof(etcd.snapshot().keys["secret"].value, proof.nonce_in(greeting.decode()), "node-a")
        lmtp.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0node-a\0{answer}".encode()) + b"\r\n")
        assert replies.readline().startswith(b"235 ")
        # node-a's MAIL and RCPT reach node-b's mtad as node-b stops: mtad is paused while
        # they arrive and its agent makes the shards "leaving", then goes on.
        os.kill(mtad, signal.SIGSTOP)
        try:
            lmtp.sendall(f"MAIL FROM:<someone@remote.example>\r\nRCPT TO:<{user}>\r\n".encode())
            node_b.process.send_signal(signal.SIGTERM)
            wait_until(lambda: "event=shards_leaving" in node_b.stderr(), 10, "node-b's shards leaving")
        finally:
            os.kill(mtad, signal.SIGCONT)
        resumed = time.monotonic()
        answered = []  # (seconds after mtad went on, the reply)
        while line := replies.readline():
            answered.append((round(time.monotonic() - resumed, 1), line[:3].decode()))
    assert node_b.process.wait(60) == 0
    stopped = round(time.monotonic() - resumed, 1)
    # Told at once (421 4.3.2, or the RCPT's answer then 421), not after OWNER_WAIT; and the
    # node's stop, its shards' hand-over with it, not held up by it.
    assert answered and answered[-1][1] == "421" and all(at < 5 for at, _ in answered), answered
    assert stopped < 10, (stopped, answered)


def test_a_message_whose_data_ends_during_its_nodes_stop_holds_up_neither(three_nodes):
    # A sender still in its DATA at node-b when node-b stops (mtad gives it stop_grace to
    # finish): its copy's shard is "leaving", and its next owner can claim it only once
    # every process of node-b has let go of it. mtad let go of it only at the end of its
    # stop (its follower and the runner's queue stopped first), and that stop waited for
    # this session, whose end of DATA waited OWNER_WAIT (15 s) for a next owner that node-b,
    # leaving the cluster, would never see: the shard, and other nodes' mail for it, waited
    # 15 s. Now the shard is let go of at once and the end of DATA answered at once: stored
    # (250) or not (4xx, the sender tries again), never a copy without a 250.
    _, node_b, user, data_dir = _node_b_and_its_user(three_nodes)
    address = node_b.listen("smtp.listen")
    message_id = f"<{uuid.uuid4().hex}@remote.example>"
    client = smtplib.SMTP(address.host, address.port, timeout=60)
    try:  # no QUIT at the end: a stopping server answers it 421
        client.ehlo("sender.example")
        client.mail("someone@remote.example")
        assert client.rcpt(user)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(f"Subject: across a stop\r\nMessage-ID: {message_id}\r\n\r\nfirst half\r\n".encode())
        node_b.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "event=shards_leaving" in node_b.stderr(), 10, "node-b's shards leaving")
        time.sleep(1.5)  # past mtad's first look at the claims
        client.send(b"second half\r\n.\r\n")
        started = time.monotonic()
        code, text = client.getreply()
        took = time.monotonic() - started
    finally:
        client.close()
    assert node_b.process.wait(60) == 0
    copies = sum(message_id.encode() in raw for raw in stored(data_dir, 6, user))
    assert (code == 250 and copies == 1) or (400 <= code < 500 and copies == 0), (code, text, copies)
    assert took < 5, (took, code, text)
    waits = [float(w) for w in re.findall(r"event=shard_let_go node=node-b shard=\d+ waited=([\d.]+)", node_b.stderr())]
    assert waits and max(waits) < 5, waits


@pytest.fixture
def watched_nodes(tmp_path, etcd_server, monkeypatch):  # noqa: F811
    """Two nodes whose serve watches its children as under the units' WatchdogSec=, with a
    short interval."""
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG * 1_000_000))
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES[:2], shards=SHARDS, users=USERS,
                                   password=PASSWORD)
    try:
        yield running, configs
    finally:
        stop_nodes(running)


WATCHDOG = 4  # seconds


def test_the_cluster_agent_keeps_its_watchdog_fed(watched_nodes):
    running, configs = watched_nodes
    etcd = Etcd(conf.load(configs["node-a"]).cluster)
    wait_owners(etcd, NODES[:2], SHARDS, 20, every_node=True)
    # Balanced (the first node to start claims every shard, then gives the other its half).
    wait_until(lambda: sorted(etcd_owners(etcd).values()) == ["node-a"] * 2 + ["node-b"] * 2, 20, "balanced")
    claims = {name: kv.mod_revision for name, kv in etcd.snapshot().under("owners/").items()}
    time.sleep(WATCHDOG * 2.5)
    for node, daemon in running.items():
        assert "event=worker_watchdog" not in daemon.stderr(), (node, daemon.stderr()[-2000:])
        assert "event=worker_restarted" not in daemon.stderr(), node
    # The same claims: no shard was claimed again meanwhile.
    assert {name: kv.mod_revision for name, kv in etcd.snapshot().under("owners/").items()} == claims


@pytest.fixture
def slow_remote(tmp_path, etcd_server):  # noqa: F811
    """Two nodes whose mail for remote.example goes to a server that holds each message's
    data phase 10 s before its 250, longer than the nodes' let-go wait (2 s) and the drain
    command's start even under load (at 5 s, CI's load once let the first attempt finish
    before the release, and the known fault did not show: an XPASS)."""
    with Sink(data_delay=10) as sink:
        running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES[:2], shards=SHARDS, users=USERS,
                                       password=PASSWORD, cluster={"let_go_wait": "2s"},
                                       queue={"retry_schedule": ["1s"], "connect_timeout": "2s", "command_timeout": "40s"},
                                       **{"outbound.routes": {'"remote.example"': f"{sink.host}:{sink.port}"}})
        try:
            yield running, configs, tmp_path / "var", sink
        finally:
            stop_nodes(running)


@pytest.mark.xfail(strict=True, reason="a delivery in flight across a drain is sent again by the next owner")
def test_a_message_sent_to_a_slow_remote_across_a_drain_arrives_once(slow_remote):
    running, configs, data_dir, sink = slow_remote
    etcd = Etcd(conf.load(configs["node-a"]).cluster)
    owners = wait_owners(etcd, NODES[:2], SHARDS, 20, every_node=True)
    time.sleep(1)  # the node tables the daemons read follow the agents' claims
    user = next(u for u, node in owner_of(data_dir, SHARDS, owners, USERS).items() if node == "node-a")
    address = running["node-a"].listen("submission.listen_tls")
    with smtplib.SMTP_SSL(address.host, address.port, timeout=30,
                          context=client_tls_context(running["node-a"].config)) as client:
        client.login(user, PASSWORD)
        client.sendmail(user, ["someone@remote.example"],
                        f"From: <{user}>\r\nSubject: once\r\nMessage-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nhi\r\n")
    wait_until(lambda: sink.busy, 10, "node-a's runner in the data phase")
    drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-a"],
                             capture_output=True, text=True, timeout=90)
    assert drained.returncode == 0, drained.stderr
    wait_until(lambda: "event=queue_finished" in running["node-a"].stderr() + running["node-b"].stderr(), 60,
               "the message delivered")
    time.sleep(3)  # long enough for the first attempt's reply, were it still coming
    assert len(sink.received) == 1


async def _owner_up_to_the_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A scripted LMTP owner's greeting and its answers to LHLO, MAIL, one RCPT and DATA."""
    writer.write(b"220 owner LMTP\r\n")
    await reader.readline()  # LHLO
    writer.write(b"250 owner\r\n")
    await reader.readline()  # MAIL
    await reader.readline()  # RCPT
    writer.write(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    await reader.readline()  # DATA
    writer.write(b"354 go on\r\n")


def _a_user_of_node_b(running: dict, configs: dict, data_dir: Path) -> tuple:
    """Two nodes balanced and ready: node-b's daemon, and a user of one of its shards."""
    owners = wait_balanced(Etcd(conf.load(configs["node-a"]).cluster), NODES[:2], SHARDS, 20)
    wait_until(lambda: all("event=ready" in running[n].stderr() for n in NODES[:2]), 10, "the agents ready")
    return running["node-b"], next(u for u, node in owner_of(data_dir, SHARDS, owners, USERS).items()
                                   if node == "node-b")
