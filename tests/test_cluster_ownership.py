"""Shard ownership through etcd (cluster/): three node agents, each a real process
(`postroom cluster agent`), against a real etcd on loopback, sharing one data dir as
nodes share volumes. A 2 s lease keeps it quick.

Balance across three nodes; a node frozen (SIGSTOP: its keepalive stops, its node table
stays) is fenced before its shards are claimed by the others, within TTL + 5 s; its
processes then cannot commit to the shards it had (NotOwnerError), the new owner's can;
a drain moves every shard of a node to the others and an undrain lets it take its share
again; a stop hands the shards over at once; `cluster status` prints the table.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import POSTROOM, add_accounts, start_module_daemon, write_config_file
from etcd_peer import Etcd as EtcdPeer
from etcd_peer import etcd_server  # noqa: F401 (fixture)

import conf
from cluster.balance import plan, share
from cluster.etcd import Etcd
from cluster.local import NodeTable
from cluster.view import open_view
from storage import NotOwnerError, Store, open_data_dir

TTL = 2
SHARDS = 6
NODES = ("node-a", "node-b", "node-c")
SETTLE = 15.0  # seconds for the nodes to agree on a balance


class Cluster:
    """Configs for NODES on one data dir and one etcd prefix; agents as processes."""

    def __init__(self, root: Path, endpoint: str):
        self.root = root
        self.data_dir = root / "var"
        self.prefix = f"/t-{uuid.uuid4().hex[:8]}/"
        self.configs = {
            node: write_config_file(root / f"{node}.toml", self.data_dir, storage={"shards": SHARDS},
                                    cluster={"etcd": [endpoint], "node": node, "address": "127.0.0.1",
                                             "lease_ttl": TTL, "prefix": self.prefix})
            for node in NODES}
        self.config = conf.load(self.configs[NODES[0]])
        self.etcd = Etcd(self.config.cluster)
        self.agents: dict[str, subprocess.Popen] = {}

    def start(self, node: str) -> None:
        log = open(self.root / f"{node}.log", "ab")
        self.agents[node] = subprocess.Popen([POSTROOM, "--config", str(self.configs[node]), "cluster", "agent"],
                                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def log(self, node: str) -> str:
        return (self.root / f"{node}.log").read_text()

    def owners(self) -> dict[int, str]:
        return {int(name): json.loads(kv.value)["node"]
                for name, kv in self.etcd.snapshot().under("owners/").items()}

    def wait_for(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition(self.owners())
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"not within {timeout} s: {what}; owners {self.owners()}")

    def balanced(self, nodes: tuple[str, ...]) -> dict[int, str]:
        """Every shard owned, by `nodes` only, none with more than its share."""
        def check(owners: dict[int, str]) -> dict[int, str] | None:
            counts = [sum(1 for o in owners.values() if o == n) for n in nodes]
            ok = len(owners) == SHARDS and set(owners.values()) <= set(nodes) \
                and max(counts) <= share(SHARDS, len(nodes))
            return owners if ok else None
        return self.wait_for(check, SETTLE, f"{SHARDS} shards balanced over {nodes}")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTROOM, "--config", str(self.configs[NODES[0]]), *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        for process in self.agents.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(10)


@pytest.fixture
def cluster(tmp_path: Path, etcd_server):  # noqa: F811
    c = Cluster(tmp_path, etcd_server.endpoint)
    yield c
    c.close()


def account_in(store: Store, shard: int) -> str:
    return next(a for i in range(10_000) if store.shard_number(a := f"user{i}@example.test") == shard)


def test_balance_lapse_and_fencing(cluster: Cluster):
    for node in NODES:
        cluster.start(node)
    owners = cluster.balanced(NODES)
    assert sorted(owners.values()) == sorted(NODES * (SHARDS // len(NODES)))

    status = cluster.cli("cluster", "status")
    assert status.returncode == 0, status.stderr
    assert f"3 node(s), {SHARDS}/{SHARDS} shard(s) owned" in status.stdout
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[3:6]}
    for node in NODES:
        # name, address, ports (lmtp=24 and the node's IMAP and POP3 ports), TTL, shards, state
        assert [rows[node][1], rows[node][3], *rows[node][6:]] == ["127.0.0.1", "lmtp=24", "s", "2", "live"]
        assert 0 <= int(rows[node][5]) <= TTL
    for shard, node in owners.items():
        assert f"{shard:>5}  {node}  " in status.stdout

    # Each node's processes see the same owners, through their node table alone.
    data_dir = open_data_dir(cluster.data_dir, SHARDS)
    config_a = conf.load(cluster.configs["node-a"])
    view = open_view(config_a, data_dir)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            (o := view.owner_of(s)) is None or o.node.name != owners[s] for s in range(SHARDS)):
        time.sleep(0.05)
    assert {s: view.owner_of(s).node.name for s in range(SHARDS)} == owners
    lost = sorted(s for s, node in owners.items() if node == "node-a")
    assert all(view.owns(s) for s in lost) and not any(view.owns(s) for s in set(owners) - set(lost))
    assert view.owner_of(lost[0]).node.endpoint("lmtp") == ("127.0.0.1", 24)
    assert {n.name for n in view.live_nodes()} == set(NODES)

    # node-a freezes: no keepalive. Its own processes must stop writing before anyone
    # else may claim its shards.
    table_a = NodeTable(data_dir.cluster_table_path("node-a"))
    revision = table_a.claim(lost[0])
    cluster.agents["node-a"].send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    fenced_at = claimed_at = None
    while time.monotonic() - frozen < TTL + 5 and claimed_at is None:
        if fenced_at is None and not table_a.holds(lost[0], revision):
            fenced_at = time.monotonic()
        current = cluster.owners()
        if all(current.get(s) in ("node-b", "node-c") for s in lost):
            claimed_at = time.monotonic()
        time.sleep(0.02)
    assert claimed_at is not None, f"node-a's shards {lost} not claimed within TTL + 5 s: {cluster.owners()}"
    assert fenced_at is not None and fenced_at < claimed_at, (fenced_at, claimed_at)
    owners = cluster.balanced(("node-b", "node-c"))
    assert not view.owns(lost[0])

    # node-a's processes (a delivery, say) cannot commit to the shard it had; the new
    # owner's can.
    with Store(data_dir, fence=table_a.holds) as store_a:
        with pytest.raises(NotOwnerError):
            store_a.ensure_account(account_in(store_a, lost[0]))
    new_owner = owners[lost[0]]
    table_new = NodeTable(data_dir.cluster_table_path(new_owner))
    with Store(data_dir, fence=table_new.holds) as store_new:
        account = account_in(store_new, lost[0])
        store_new.ensure_account(account)
        assert store_new.fence_revision(lost[0]) == table_new.claim(lost[0]) > revision
        assert "INBOX" in [m.name for m in store_new.mailboxes(account)]
    table_new.close()
    table_a.close()
    view.close()


def test_drain_undrain_and_stop(cluster: Cluster):
    for node in NODES:
        cluster.start(node)
    cluster.balanced(NODES)

    drained = cluster.cli("cluster", "drain", "node-a", "--timeout", "15")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout == "drained node-a: it owns no shard\n"
    owners = cluster.balanced(("node-b", "node-c"))
    assert sorted(owners.values()) == ["node-b"] * 3 + ["node-c"] * 3
    status = cluster.cli("cluster", "status").stdout
    assert status.splitlines()[3].startswith("node-a ") and status.splitlines()[3].endswith("  0  draining")
    # Still drained a round later: it claims nothing while drained.
    time.sleep(TTL)
    assert "node-a" not in cluster.owners().values()

    assert cluster.cli("cluster", "undrain", "node-a").returncode == 0
    cluster.wait_for(lambda owners: list(owners.values()).count("node-a") == SHARDS // len(NODES), SETTLE,
                     "node-a takes its share again")
    cluster.balanced(NODES)

    # A stop hands the shards over at once, not at the lease's expiry.
    cluster.agents["node-b"].terminate()
    assert cluster.agents["node-b"].wait(15) == 0
    assert "event=shard_released" in cluster.log("node-b") and "reason=stop" in cluster.log("node-b")
    cluster.balanced(("node-a", "node-c"))

    # The last live node cannot be drained: nobody would take its shards.
    cluster.cli("cluster", "drain", "node-c", "--no-wait")
    refused = cluster.cli("cluster", "drain", "node-a")
    assert refused.returncode == 1 and "no other live node" in refused.stderr


def test_serve_runs_the_agent_and_its_daemons_commit_only_while_it_holds(tmp_path: Path, etcd_server):  # noqa: F811
    """Under `postroom serve` the agent is a supervised child; mtad's deliveries pass while
    the node holds the shard, are answered 4xx once its lease lapsed (the agent frozen),
    and pass again once it has claimed the shards anew."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    volumes = tmp_path / "volumes.log"  # what the attach and detach commands did, in order
    # Retried on new ports should another test suite on this machine hold one.
    daemon = start_module_daemon(tmp_path, cluster={
        "etcd": [etcd_server.endpoint], "node": "solo", "address": "127.0.0.1", "lease_ttl": TTL, "prefix": prefix,
        "attach": f"sh -c 'echo attach {{shard}} {{path}} >> {volumes}'",
        "detach": f"sh -c 'echo detach {{shard}} {{path}} >> {volumes}'"})
    add_accounts(daemon.config_path, "correct horse", users=("alice@example.test",))
    # The cluster's accounts are etcd's (the agent's process mirrors them into the node's
    # copy, and would drop a row made only here): pushed, as a node's own before it joins.
    pushed = subprocess.run([POSTROOM, "--config", str(daemon.config_path), "cluster", "push-accounts"],
                            capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    config = daemon.config
    etcd = Etcd(config.cluster)

    def owners() -> dict[int, str]:
        return {int(k): json.loads(kv.value)["node"] for k, kv in etcd.snapshot().under("owners/").items()}

    def wait_owned(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and owners() != {n: "solo" for n in range(config.storage.shards)}:
            time.sleep(0.05)
        assert owners() == {n: "solo" for n in range(config.storage.shards)}

    def send() -> int:
        smtp = config.smtp.listen[0]
        with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
            try:
                client.sendmail("bob@example.net", ["alice@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
            except smtplib.SMTPResponseException as e:
                return e.smtp_code
            return 250

    try:
        wait_owned(SETTLE)
        agent = daemon.child_pid("cluster-agent")
        assert send() == 250
        os.kill(agent, signal.SIGSTOP)
        time.sleep(TTL)  # past the node's deadline (last keepalive + TTL - margin)
        code = send()
        assert 400 <= code < 500, code
        # Refused at the commit: the shard's claim is not held (its owner is looked for
        # again, mtad/routing.py, and none is found while the agent is frozen).
        log = daemon.stderr()
        assert "event=store_failed" in log and ("error=NotOwnerError" in log or "error=HandOffFailed" in log), log
        os.kill(agent, signal.SIGCONT)
        time.sleep(TTL / 2)
        wait_owned(TTL + 5)
        assert send() == 250
        # The agent killed: serve starts it again, and it revokes the lease its previous
        # life left, so its shards are free at once rather than at that lease's expiry.
        view = open_view(config, open_data_dir(config.server.data_dir, config.storage.shards))
        old_lease = view.table.lease_id()
        os.kill(agent, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
                view.table.lease_id() not in (0, old_lease) and all(view.owns(n) for n in range(4))):
            time.sleep(0.05)
        assert view.table.lease_id() not in (0, old_lease) and all(view.owns(n) for n in range(4))
        # revoked; or gone, should the restart have taken longer than the TTL on a busy machine
        assert f"event=previous_lease node=solo lease={old_lease:x} outcome=" in daemon.stderr()
        view.close()
        wait_owned(TTL + 5)
        assert send() == 250
    finally:
        try:
            os.kill(agent, signal.SIGCONT)
        except ProcessLookupError:
            pass
        assert daemon.stop() == 0, daemon.stderr()
    assert owners() == {}  # every shard handed over at the stop
    assert "event=shard_released" in daemon.stderr()
    # Each shard's volume attached before it was taken and detached after it was let go:
    # at start, at the lapse, at the new claims, after the kill, at the stop.
    shard_dir = str(tmp_path / "var" / "shards" / "00")
    for_shard_0 = [line.split()[0] for line in volumes.read_text().splitlines() if line.split()[1:] == ["0", shard_dir]]
    # (A killed agent detaches nothing: its successor attaches what it claims again.)
    assert for_shard_0 == ["attach", "detach", "attach", "attach", "detach"]


def test_etcd_outage_fences_the_node_and_it_claims_again(tmp_path: Path):
    """etcd unreachable: the node stops writing within the TTL; etcd back: it owns its
    shards again (the agent in this process, on an etcd of its own to freeze)."""
    from cluster.agent import Agent

    with EtcdPeer() as etcd:
        config = conf.load(write_config_file(tmp_path / "solo.toml", tmp_path / "var", storage={"shards": 2}, cluster={
            "etcd": [etcd.endpoint], "node": "solo", "address": "127.0.0.1", "lease_ttl": TTL}))
        data_dir = open_data_dir(config.server.data_dir, 2)
        view = open_view(config, data_dir)

        def wait(condition, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert condition()

        with Store(data_dir) as store:
            agent = Agent(config, data_dir, store)
            thread = agent.start()
            try:
                wait(lambda: view.owns(0) and view.owns(1), SETTLE)
                # Frozen rather than killed: its port stays ours (other suites on this
                # machine take ports from the same range), and its requests hang, as a
                # partitioned etcd's do.
                etcd.process.send_signal(signal.SIGSTOP)
                wait(lambda: not view.owns(0) and not view.owns(1), TTL)
                etcd.process.send_signal(signal.SIGCONT)
                wait(lambda: view.owns(0) and view.owns(1), TTL + 10)
                # Under its old lease (etcd restored it, so nobody could have claimed the
                # shards meanwhile) or a new one: the shard records the claim it is written under.
                assert store.fence_revision(0) == view.owner_of(0).revision == view.table.claim(0)
            finally:
                agent.stop()
                thread.join(15)
            assert not thread.is_alive()
            assert Etcd(config.cluster).snapshot().under("owners/") == {}
        view.close()


def test_volume_commands(tmp_path: Path):
    from cluster.volumes import VolumeError, run

    run("", 3, tmp_path)  # empty: nothing to do
    run(f"sh -c 'echo {{shard}} {{path}} > {tmp_path}/out'", 3, tmp_path / "shards" / "03")
    assert (tmp_path / "out").read_text() == f"3 {tmp_path}/shards/03\n"
    with pytest.raises(VolumeError, match="exited with status 1: no such volume"):
        run("sh -c 'echo no such volume >&2; exit 1'", 3, tmp_path)
    with pytest.raises(conf.ConfigError, match="unknown placeholder"):
        conf.loads('[cluster]\netcd = ["http://127.0.0.1:2379"]\nattach = "map {volume}"\n')


def test_cluster_commands_need_a_cluster(tmp_path: Path):
    config = write_config_file(tmp_path / "single.toml", tmp_path / "var")
    result = subprocess.run([POSTROOM, "--config", str(config), "cluster", "status"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "not in a cluster" in result.stderr
    # A single node's store is not fenced: it owns every shard.
    assert open_view(conf.load(config), open_data_dir(tmp_path / "var", 4)) is None
    with Store(open_data_dir(tmp_path / "var", 4)) as store:
        store.ensure_account("alice@example.test")
        assert store.fence_revision(store.shard_number("alice@example.test")) == 0


@pytest.mark.parametrize("live, owners, me, claim, release", [
    ({"a"}, {}, "a", 6, 0),  # alone: every shard
    ({"a", "b"}, {n: "a" for n in range(6)}, "a", 0, 3),  # b joined: a releases its extras
    ({"a", "b"}, {n: "a" for n in range(3)}, "b", 3, 0),  # b takes the free ones
    ({"b", "c"}, {0: "a", 1: "a", 2: "b", 3: "c"}, "a", 0, 2),  # a draining (not live): releases all
    ({"a", "b", "c"}, {0: "a", 1: "a"}, "a", 0, 0),  # at its share: nothing to do
    # 6 on 4: a and b (first by name) 2 each, c and d 1 each; never a node left idle.
    ({"a", "b", "c", "d"}, {0: "c", 1: "c"}, "c", 0, 1),
    ({"a", "b", "c", "d"}, {0: "a", 1: "a", 2: "b", 3: "b", 4: "c"}, "d", 1, 0),
    ({"a", "b", "c", "d"}, {0: "a", 1: "a", 2: "b", 3: "b"}, "a", 0, 0),
])
def test_plan(live, owners, me, claim, release):
    decided = plan(SHARDS, me, live, owners)
    assert (len(decided.claim), len(decided.release)) == (claim, release)
    assert not set(decided.claim) & set(owners)
    assert set(decided.release) <= {s for s, o in owners.items() if o == me}


def test_nodes_try_free_shards_in_orders_of_their_own():
    orders = {node: plan(16, node, {"a", "b", "c"}, {}).claim for node in ("a", "b", "c")}
    assert len({tuple(order) for order in orders.values()}) == 3
    assert [len(orders[node]) for node in ("a", "b", "c")] == [6, 5, 5]
