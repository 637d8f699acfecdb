"""Queue runners in a cluster (issue 18, item 5): each shard has its own outbound queue on
its volume (<shard>/queue), written only by the node that holds the shard, and each node's
runner works the queues of the shards it holds. So mail queued on a node that stops (or
dies) is sent by the shard's next owner, once.

First without daemons: a real node table (cluster/local.py, published here as the agent
publishes it) and a fenced store (postroom.datadir.open_store) refuse a queue write for a
shard this node does not hold now. Then through two whole nodes (`postroom serve` on a real
etcd) and a real receiving SMTP server that refuses, then accepts.
"""

from __future__ import annotations

import functools
import json
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cluster_nodes import start_nodes, stop_nodes, wait_owners
from conftest import POSTROOM, client_tls_context, write_config_file
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from sinks import Sink

import conf
from cluster.etcd import Etcd
from cluster.local import open_node_table
from postroom.datadir import open_accounts, open_queues, open_store
from postroom.metrics import DataDirCollector
from storage import (
    DEFERRED,
    NoQueueError,
    NotOwnerError,
    Queue,
    QueuedRecipient,
    QueueEnvelope,
    Result,
    Store,
    open_data_dir,
)
from waiting import wait_until

SHARDS = 4
NODES = ("node-a", "node-b")
USERS = [f"user{i}@example.test" for i in range(40)]
PASSWORD = "correct horse battery"
REMOTE = "dest@remote.example"


# -- fencing, with a real node table ---------------------------------------------------------


def _enqueue(queues, user: str | None) -> str:
    envelope = QueueEnvelope(user or "", (QueuedRecipient(REMOTE),), user=user)
    with queues.begin(envelope) as entry:
        entry.write(f"X-Qid: {entry.id}\r\nSubject: fenced\r\n\r\nhello\r\n".encode())
        return entry.commit()


def test_a_queue_write_for_a_shard_this_node_does_not_hold_is_refused(tmp_path: Path):
    config = conf.load(write_config_file(tmp_path / "node-a.toml", tmp_path / "var", storage={"shards": SHARDS},
                                         cluster={"etcd": ["http://127.0.0.1:9"], "node": "node-a"}))
    data_dir, accounts = open_accounts(config)
    table = open_node_table(config, data_dir, writer=True)  # this test plays the agent

    def publish(claims: dict[int, int], *, lease_left: float = 60.0) -> None:
        table.publish(deadline=time.monotonic() + lease_left, lease=1, claims=claims,
                      owners={n: ("node-a", r) for n, r in claims.items()}, nodes=[])

    try:
        with accounts, open_store(data_dir, accounts, config) as store:
            with open_queues(config, data_dir, store) as queues:
                on = {n: next(u for u in USERS if store.shard_number(u) == n) for n in range(SHARDS)}
                with pytest.raises(NoQueueError):  # no shard held: nothing can be queued durably here
                    _enqueue(queues, on[1])
                # Shards 1 and 2 taken: the claim published (this store, as a node's, opens only
                # the shards its node holds), and its revision recorded in the shard (its fence).
                publish({1: 11, 2: 12})
                store.take_shard(1, 11)
                store.take_shard(2, 12)
                in_1, in_2 = _enqueue(queues, on[1]), _enqueue(queues, on[2])
                by_hash = _enqueue(queues, on[3])  # the user's shard is not held here: one that is
                assert (data_dir.shard_path(1) / "queue" / "msg" / in_1).is_file()
                assert (data_dir.shard_path(2) / "queue" / "msg" / in_2).is_file()
                by_hash_shard = queues.find(by_hash).shard
                assert by_hash_shard in (1, 2)
                assert not (data_dir.path / "queue").exists()  # a cluster has no data dir queue

                # Shard 2 released as the agent releases it: the claim withdrawn, the fence cleared.
                publish({1: 11})
                store.release_shard(2)
                assert queues.find(in_2).shard == 2  # still open here (the runner closes it at its next look)
                for write in (lambda: queues.hold(in_2), lambda: queues.flush(in_2), lambda: queues.remove(in_2),
                              lambda: queues.record(in_2, [Result(REMOTE, DEFERRED, "451 4.3.0 later",
                                                                  next_attempt=time.time() + 60)])):
                    with pytest.raises(NotOwnerError):
                        write()
                message = queues.get(in_2)
                assert message is not None and not message.held and message.recipients[0].attempts == 0
                assert queues.hold(in_1)  # the shard still held: written
                queues.refresh()
                assert [q.shard for q in queues.queues()] == [1]  # let go of: its volume may detach

                # Another node's claim recorded in the shard (it took it over): refused too.
                store.take_shard(1, 99)
                with pytest.raises(NotOwnerError):
                    queues.release(in_1)
                store.take_shard(1, 11)
                # The lease lapsed (no keepalive answered): every write refused, nothing queued.
                publish({1: 11}, lease_left=-1.0)
                with pytest.raises(NotOwnerError):
                    queues.release(in_1)
                with pytest.raises(NoQueueError):
                    _enqueue(queues, on[1])
                publish({1: 11})
                assert queues.release(in_1) and queues.hold(in_1)

            # The CLI's view (every shard queue on disk) is fenced alike.
            with open_queues(config, data_dir, store, on_disk=True) as every:
                every.refresh()
                assert [q.shard for q in every.queues()] == [1, 2]
                assert {m.id for m in every.list()} == {in_1, in_2, by_hash}
                with pytest.raises(NotOwnerError):
                    every.release(in_2)
                # Every message not held, of the held shard's queue only (in_1 is held).
                assert every.flush() == (1 if by_hash_shard == 1 else 0)

            # The metrics' scrape counts every shard queue on disk, and holds none open after.
            collector = DataDirCollector(data_dir, store, None, functools.partial(open_queues, config, data_dir))
            for _ in range(2):
                gauges = {family.name: {tuple(sample.labels.values()): sample.value for sample in family.samples}
                          for family in collector.collect()}
                assert gauges["postroom_queue_messages"] == {("queued",): 2, ("deferred",): 0, ("held",): 1}
            with Queue(data_dir.shard_path(1) / "queue") as queue:  # not open in this process any more
                assert queue.get(in_1) is not None
            collector.close()

        # The CLI, `status` and `backup` of the node, over every shard queue on disk.
        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([POSTROOM, "--config", str(config.source), *args], capture_output=True,
                                  text=True, timeout=60)

        listed = cli("queue", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {m["id"]: m["held"] for m in json.loads(listed.stdout)["messages"]} == \
            {in_1: True, in_2: False, by_hash: False}
        refused = cli("queue", "hold", in_2)
        assert refused.returncode == 1 and "not served by this node now" in refused.stderr, refused
        assert cli("queue", "release", in_1).returncode == 0
        status = cli("status", "--no-dns")
        assert "queue     3 message(s): 3 queued, 0 deferred, 0 held in 2 shard queue(s)" in status.stdout, status
        backup = cli("backup", str(tmp_path / "backup"))
        assert backup.returncode == 0, backup.stderr
        for shard, qid in ((1, in_1), (2, in_2)):
            copy = tmp_path / "backup" / "data" / data_dir.shard_path(shard).relative_to(data_dir.path)
            assert (copy / "queue" / "msg" / qid).is_file()
            with Queue(copy / "queue") as queue:
                assert queue.get(qid) is not None
    finally:
        table.close()


# -- one runner over a node's shard queues, in this process -------------------------------


def test_one_runner_works_every_held_shards_queue_within_one_limit(tmp_path: Path):
    """[queue] concurrency = 1 holds across the queues of two shards (a runner per queue
    would send two at once); a shard released stops its mail from going from here, and its
    queue is let go of; taken back, its mail goes."""
    import asyncio

    from mtad.outbound.client import ClientSettings
    from mtad.outbound.reports import Reporter
    from mtad.outbound.runner import Runner

    with Sink(data_delay=0.3) as sink:
        config = conf.load(write_config_file(
            tmp_path / "node-a.toml", tmp_path / "var", storage={"shards": SHARDS},
            cluster={"etcd": ["http://127.0.0.1:9"], "node": "node-a"},
            queue={"concurrency": 1, "per_destination": 4, "retry_schedule": ["1s"], "connect_timeout": "2s"},
            **{"outbound.routes": {'"remote.example"': f"{sink.host}:{sink.port}"}}))
        data_dir, accounts = open_accounts(config)
        table = open_node_table(config, data_dir, writer=True)

        def publish(claims: dict[int, int]) -> None:
            table.publish(deadline=time.monotonic() + 60, lease=1, claims=claims,
                          owners={n: ("node-a", r) for n, r in claims.items()}, nodes=[])

        try:
            with accounts, open_store(data_dir, accounts, config) as store, \
                    open_queues(config, data_dir, store) as queues:
                on = {n: next(u for u in USERS if store.shard_number(u) == n) for n in range(SHARDS)}
                publish({1: 11, 2: 12})  # first: this store opens only the shards its node holds
                store.take_shard(1, 11)
                store.take_shard(2, 12)
                first = [_enqueue(queues, on[n]) for n in (1, 2, 1, 2)]

                async def run() -> None:
                    runner = Runner(config, queues, Reporter(config.server.hostname, queues, store, accounts),
                                    settings=ClientSettings.from_config(config))
                    task = asyncio.create_task(runner.run())
                    try:
                        await asyncio.to_thread(sink.wait_for, 4, 30)
                        assert sink.most_busy == 1, "one transaction at a time across both queues"
                        for _ in range(100):  # and recorded (a hand-over before that would send twice)
                            if not queues.list():
                                break
                            await asyncio.sleep(0.05)
                        assert queues.list() == []
                        # Shard 2 released (as the agent does): its mail stays where it is.
                        publish({1: 11})
                        store.release_shard(2)
                        late = await asyncio.to_thread(_enqueue, queues, on[1])
                        await asyncio.to_thread(sink.wait_for, 5, 30)
                        for _ in range(50):
                            if [q.shard for q in queues.queues()] == [1]:
                                break
                            await asyncio.sleep(0.1)
                        assert [q.shard for q in queues.queues()] == [1], "shard 2's queue let go of"
                        # Closed in this process (else this open would fail: one environment a process).
                        with Queue(data_dir.shard_path(2) / "queue", shard=2) as other:
                            assert other.list() == []
                        # Taken back: its queue opened again, and what waits there goes.
                        publish({1: 11, 2: 13})
                        store.take_shard(2, 13)
                        again = await asyncio.to_thread(_enqueue, queues, on[2])
                        await asyncio.to_thread(sink.wait_for, 6, 30)
                        assert {r.data.split(b"X-Qid: ")[1][:16].decode() for r in sink.received} == \
                            {*first, late, again}
                    finally:
                        await runner.stop(1.0)
                        await asyncio.wait({task}, timeout=5)
                        task.cancel()
                        await runner.close()

                asyncio.run(run())
                assert queues.list() == []
        finally:
            table.close()


# -- through two nodes -----------------------------------------------------------------------


@pytest.fixture
def receiver():
    """A real SMTP server on loopback that refuses REMOTE for now (451)."""
    with Sink(replies={REMOTE: "451 4.3.0 try again later"}) as sink:
        yield sink


@pytest.fixture
def nodes(tmp_path: Path, etcd_server, receiver):  # noqa: F811
    running, configs = start_nodes(
        tmp_path, etcd_server.endpoint, NODES, shards=SHARDS, users=USERS, password=PASSWORD,
        queue={"retry_schedule": ["1s"], "connect_timeout": "2s", "command_timeout": "10s"},
        **{"outbound.routes": {'"remote.example"': f"{receiver.host}:{receiver.port}"}})
    try:
        yield running, configs, Etcd(conf.load(configs["node-a"]).cluster), tmp_path / "var"
    finally:
        stop_nodes(running)


def _queue_list(config: Path) -> list[dict]:
    done = subprocess.run([POSTROOM, "--config", str(config), "queue", "list", "--json"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["messages"]




@pytest.mark.parametrize("leaves", ["stopped", "drained"])
def test_mail_queued_on_a_node_that_leaves_is_sent_by_the_shards_next_owner(nodes, receiver, leaves):
    """`stopped`: SIGTERM, the node's agent hands its shards over as it stops. `drained`:
    `postroom cluster drain`, the node runs on; its runner lets go of the shard's queue
    (and must not send from it) while the other node's runner takes it up."""
    running, configs, etcd, root = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    time.sleep(1)  # the node tables the daemons read follow the agents' claims
    config = conf.load(configs["node-a"])
    data_dir = open_data_dir(root, SHARDS)
    with Store(data_dir) as store:
        user = next(u for u in USERS if owners[store.shard_number(u)] == "node-a")
        shard = store.shard_number(user)
    node_a = running["node-a"]
    address = node_a.listen("submission.listen_tls")
    message = (f"From: <{user}>\r\nTo: <{REMOTE}>\r\nSubject: across a stop\r\n"
               f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nhello\r\n")
    with smtplib.SMTP_SSL(address.host, address.port, timeout=30, context=client_tls_context(config)) as client:
        client.login(user, PASSWORD)
        client.mail(user)
        assert client.rcpt(REMOTE)[0] == 250
        code, reply = client.data(message.encode())
    assert code == 250, reply
    qid = reply.decode().rsplit(" ", 1)[1]
    assert (data_dir.shard_path(shard) / "queue" / "msg" / qid).is_file()  # on the user's shard's volume

    # Node A's runner tried and was told 451: the message waits in the shard's queue.
    def deferred():
        listed = {m["id"]: m for m in _queue_list(configs["node-a"])}
        return qid in listed and listed[qid]["recipients"][0]["attempts"] >= 1
    wait_until(deferred, 30, "node A's runner tried the message")
    assert receiver.rcpt_attempts and not receiver.received
    assert f"event=queue_opened shard={shard}" in node_a.stderr()

    if leaves == "stopped":
        node_a.stop()  # SIGTERM: its agent hands its shards over
    else:
        drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-a"],
                                 capture_output=True, text=True, timeout=90)
        assert drained.returncode == 0, drained.stderr
    wait_owners(etcd, ("node-b",), SHARDS, 30)
    if leaves == "drained":  # node A's runner let go of the queue: the volume could detach
        wait_until(lambda: f"event=queue_closed shard={shard}" in node_a.stderr(), 10, "node A closed the queue")
        # Node A holds no shard now: it has no queue to keep remote mail in, and says 451 at
        # the RCPT, before the client sends the data for nothing.
        with smtplib.SMTP_SSL(address.host, address.port, timeout=30, context=client_tls_context(config)) as client:
            client.login(user, PASSWORD)
            client.mail(user)
            code, reply = client.rcpt(REMOTE)
        assert (code, reply.split()[0]) == (451, b"4.3.0"), (code, reply)
    tried_by_a = len(receiver.rcpt_attempts)
    receiver.replies[REMOTE] = ["250 2.1.5 OK"]  # the receiver takes it now

    received = receiver.wait_for(1, timeout=60)
    assert len(received) == 1 and received[0].recipients == [REMOTE]
    assert b"Subject: across a stop" in received[0].data
    node_b = running["node-b"]
    log = wait_until(lambda: (text := node_b.stderr()) and f"qid={qid}" in text and "result=delivered" in text and text,
                30, "node B logged the delivery")
    assert f"event=queue_opened shard={shard}" in log, log[-3000:]
    wait_until(lambda: qid not in {m["id"] for m in _queue_list(configs["node-b"])}, 30, "the message left the queue")
    assert not (data_dir.shard_path(shard) / "queue" / "msg" / qid).exists()
    time.sleep(3)  # long enough for a second copy to go, were one left anywhere
    assert len(receiver.received) == 1, "exactly one copy arrives"
    assert len(receiver.rcpt_attempts) > tried_by_a
    # Nothing for it in node A's own data: the data dir has no queue in a cluster.
    assert not (root / "queue").exists()
    with Queue(data_dir.shard_path(shard) / "queue") as queue:
        assert queue.get(qid) is None
