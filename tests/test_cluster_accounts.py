"""Shared accounts in cluster mode (issue 18 item 4): etcd holds domains, users and aliases;
each node's mirror keeps its local accounts LMDB current; the CLI's writes go to etcd with
compare-and-swap. Two "nodes" here are two data dirs, each with its own Accounts and mirror,
against a real etcd on loopback."""

from __future__ import annotations

import itertools
import socket
import subprocess
import threading
import time
from functools import partial

import argon2
import pytest
from conftest import POSTROOM, write_config_file
from etcd_peer import Etcd, etcd_server  # noqa: F401  (a fixture)

from cluster.accounts_etcd import (
    CompactedError,
    EtcdAccounts,
    EtcdRequestError,
    EtcdUnavailableError,
    b64,
    etcd_key,
)
from cluster.accounts_mirror import AccountsMirror
from cluster.accounts_seed import push_local
from cluster.accounts_writer import ClusterAccounts, NotJoinedError
from storage import Accounts, open_data_dir
from storage.errors import DomainNotEmptyError, ExistsError, NotLocalError, UnknownAddressError

CHEAP_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.ID)
PROPAGATION = 1.0  # seconds: a change made on one node is on the others within this
PASSWORD = "correct horse battery"
_prefixes = itertools.count()


class Node:
    """One node's accounts: its LMDB copy, its mirror, and the CLI's writer."""

    def __init__(self, root, name: str, endpoints: list[str], prefix: str, *, retry: float = 0.2,
                 idle: float = 30.0, page: int = 7):  # pages of 7 keys: loads and scans take several
        (root / name).mkdir(parents=True, exist_ok=True)
        self.name = name
        self.accounts = Accounts(root / name / "accounts.lmdb", hasher=CHEAP_HASHER)
        self.mirror = AccountsMirror(self.accounts, endpoints, prefix, retry=retry, idle=idle, page=page).start()
        self.writer = ClusterAccounts(self.accounts, endpoints, prefix, page=page)

    def close(self) -> None:
        self.mirror.stop()
        self.accounts.close()


@pytest.fixture
def cluster(tmp_path, etcd_server):  # noqa: F811
    prefix = f"/test{next(_prefixes)}-{time.monotonic_ns()}/"  # each test its own accounts
    nodes: list[Node] = []

    def node(name: str, endpoints: list[str] | None = None) -> Node:
        nodes.append(Node(tmp_path, name, endpoints or [etcd_server.endpoint], prefix))
        return nodes[-1]

    yield node
    for n in nodes:
        n.close()


def eventually(check, timeout: float = PROPAGATION):
    """The value of `check()` once it is truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.01)


def test_a_user_added_on_one_node_logs_in_on_another(cluster):
    a, b = cluster("a"), cluster("b")
    a.writer.add_domain("example.org")
    a.writer.add_user("alice@example.org", PASSWORD, quota=5000)
    assert [u.address.local for u in a.accounts.users()] == ["alice"]  # at once, on the writer's node
    user = eventually(lambda: b.accounts.get_user("alice@example.org"))
    assert user.quota == 5000
    assert str(b.accounts.resolve("alice+tag@example.org").local[0]) == "alice@example.org"
    assert b.accounts.authenticate("alice@example.org", PASSWORD) is not None
    assert b.accounts.authenticate("alice@example.org", "wrong password!") is None
    with pytest.raises(NotLocalError):
        b.accounts.resolve("alice@example.net")


def test_quota_alias_password_and_removal_propagate(cluster):
    a, b = cluster("a"), cluster("b")
    a.writer.add_domain("example.org")
    a.writer.add_user("alice@example.org", PASSWORD)
    eventually(lambda: b.accounts.get_user("alice@example.org"))

    b.writer.set_quota("alice@example.org", 10_000, 50)  # either node writes
    eventually(lambda: (u := a.accounts.get_user("alice@example.org")) and u.quota == 10_000)
    assert a.accounts.get_user("alice@example.org").message_quota == 50

    a.writer.add_alias("sales@example.org", ["alice@example.org", "boss@elsewhere.example"])
    resolution = eventually(lambda: _resolve(b.accounts, "sales@example.org"))
    assert [str(x) for x in resolution.local] == ["alice@example.org"]
    assert resolution.remote == ("boss@elsewhere.example",)
    with pytest.raises(UnknownAddressError):  # the same checks as one node: targets must exist
        a.writer.add_alias("info@example.org", ["nobody@example.org"])

    a.writer.set_password("alice@example.org", "a new passphrase")
    eventually(lambda: b.accounts.authenticate("alice@example.org", "a new passphrase"))

    b.writer.remove_alias("sales@example.org")
    eventually(lambda: _resolve(a.accounts, "sales@example.org") is None)
    a.writer.remove_user("alice@example.org")
    eventually(lambda: b.accounts.get_user("alice@example.org") is None)
    assert b.accounts.authenticate("alice@example.org", "a new passphrase") is None


def test_domain_removal_keeps_single_node_rules(cluster):
    a, b = cluster("a"), cluster("b")
    for domain in ("example.org", "example.net"):
        a.writer.add_domain(domain)
    for i in range(150):  # more than etcd's 128 operations per transaction
        a.writer.add_user(f"u{i}@example.org", PASSWORD)
    a.writer.add_alias("team@example.net", ["u1@example.org", "ext@elsewhere.example"])
    eventually(lambda: b.accounts.get_user("u149@example.org"))
    with pytest.raises(DomainNotEmptyError, match="150 user"):
        b.writer.remove_domain("example.org")
    assert b.writer.remove_domain("example.org", force=True) == (150, 1)
    eventually(lambda: not a.accounts.is_local_domain("example.org"))
    assert a.accounts.users() == []
    assert [alias.targets for alias in a.accounts.aliases()] == [("ext@elsewhere.example",)]


class SilentLink:
    """A TCP relay to etcd whose open connections can be made to go silent, no data and no
    reset, as a partition or a lost NAT entry does to them; new connections still work.
    A fake at the network, the one boundary here we do not own."""

    def __init__(self, port: int):
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            silent = threading.Event()
            self._open.append((client, upstream, silent))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, silent), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, silent: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if not silent.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def silence_open_connections(self) -> None:
        for _, _, silent in self._open:
            silent.set()

    def close(self) -> None:
        self._listener.close()
        for client, upstream, _ in self._open:
            client.close()
            upstream.close()


def test_a_watch_gone_silent_is_made_again(tmp_path, etcd_server):  # noqa: F811
    link = SilentLink(etcd_server.port)
    prefix = f"/silent{time.monotonic_ns()}/"
    a = Node(tmp_path, "a", [etcd_server.endpoint], prefix)
    b = Node(tmp_path, "b", [link.endpoint], prefix, idle=1.0)
    try:
        a.writer.add_domain("example.org")
        a.writer.add_user("alice@example.org", PASSWORD)
        eventually(lambda: b.accounts.get_user("alice@example.org"))
        link.silence_open_connections()  # b's watch hears nothing more, and no error either
        a.writer.add_user("bob@example.org", PASSWORD)
        eventually(lambda: b.accounts.get_user("bob@example.org"), timeout=4)  # idle 1 s, then anew
    finally:
        a.close()
        b.close()
        link.close()


def test_a_node_started_later_gets_the_whole_set(cluster):
    a = cluster("a")
    a.writer.add_domain("example.org")
    names = [f"user{i:02d}" for i in range(20)]  # with the domain and the alias: 22 rows, 4 pages
    for name in names:
        a.writer.add_user(f"{name}@example.org", PASSWORD)
    a.writer.add_alias("@example.org", ["user00@example.org"])  # the catch-all
    late = cluster("late")
    assert late.mirror.wait_revision(a.mirror.revision, PROPAGATION)
    assert [u.address.local for u in late.accounts.users()] == names
    assert str(late.accounts.resolve("anyone@example.org").local[0]) == "user00@example.org"


def test_two_writers_adding_one_user_at_once_one_wins(cluster):
    a, b = cluster("a"), cluster("b")
    a.writer.add_domain("example.org")
    eventually(lambda: b.accounts.is_local_domain("example.org"))
    for round_ in range(5):
        address = f"race{round_}@example.org"
        outcomes = _race_to_add(a, b, address)
        assert sorted(outcomes.values()) == ["added", "exists"]
        winner, loser = sorted(outcomes, key=lambda name: outcomes[name])
        # Both nodes end with one record: the winner's password, whichever node won.
        for node in (a, b):
            eventually(partial(node.accounts.authenticate, address, f"{winner} password"))
            assert node.accounts.authenticate(address, f"{loser} password") is None


def _race_to_add(a: Node, b: Node, address: str) -> dict[str, str]:
    start = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def add(node: Node) -> None:
        start.wait(5)
        try:
            node.writer.add_user(address, f"{node.name} password")
            outcomes[node.name] = "added"
        except ExistsError:
            outcomes[node.name] = "exists"

    threads = [threading.Thread(target=add, args=(n,)) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return outcomes


def test_etcd_down_lookups_answer_writes_fail_then_catch_up(tmp_path, caplog):
    caplog.set_level("INFO", logger="cluster.accounts")
    with Etcd() as etcd:
        a = Node(tmp_path, "a", [etcd.endpoint], "/postroom/")
        b = Node(tmp_path, "b", [etcd.endpoint], "/postroom/", retry=3.0)  # back after what follows
        try:
            a.writer.add_domain("example.org")
            a.writer.add_user("alice@example.org", PASSWORD)
            eventually(lambda: b.accounts.get_user("alice@example.org"))

            etcd.kill()
            for node in (a, b):  # RCPT and LOGIN answer from the node's copy
                assert node.accounts.resolve("alice@example.org").local
                assert node.accounts.authenticate("alice@example.org", PASSWORD) is not None
            began = time.monotonic()
            with pytest.raises(EtcdUnavailableError, match="etcd unreachable"):
                a.writer.add_user("bob@example.org", PASSWORD)
            assert time.monotonic() - began < 5
            assert a.accounts.get_user("bob@example.org") is None  # nothing half-written

            etcd.start()  # the same data dir and port: the cluster's coordinator is back
            a.writer.add_user("bob@example.org", PASSWORD)
            a.writer.set_quota("bob@example.org", 777)
            revision, _ = a.writer._etcd.load()
            # Revisions before the quota's are gone: b cannot resume where it stopped; it reloads.
            a.writer._etcd.post("/kv/compaction", {"revision": revision})
            eventually(lambda: (u := b.accounts.get_user("bob@example.org")) and u.quota == 777, timeout=8)
            assert b.accounts.authenticate("alice@example.org", PASSWORD) is not None
            events = [r.getMessage() for r in caplog.records if r.name == "cluster.accounts"]
            assert "accounts.mirror.etcd_down" in events and "accounts.mirror.reload" in events
        finally:
            a.close()
            b.close()


def test_a_single_node_joining_keeps_its_accounts_until_pushed(tmp_path, cluster):
    a = cluster("a")
    a.writer.add_domain("example.org")
    a.writer.add_user("alice@example.org", PASSWORD)
    (tmp_path / "old").mkdir()
    with Accounts(tmp_path / "old" / "accounts.lmdb", hasher=CHEAP_HASHER) as before:  # a node of its own
        before.add_domain("old.example")
        before.add_user("olga@old.example", PASSWORD)
    old = cluster("old")
    time.sleep(0.5)  # its mirror met etcd's set and refused to drop olga
    assert old.mirror.revision == 0
    assert old.accounts.authenticate("olga@old.example", PASSWORD) is not None
    with pytest.raises(NotJoinedError, match="push them first"):  # nor may a change hide them
        old.writer.add_user("oscar@old.example", PASSWORD)
    assert push_local(old.accounts, [old.writer.endpoints[0]], old.writer.prefix) == (2, 0)
    eventually(lambda: a.accounts.authenticate("olga@old.example", PASSWORD))
    eventually(lambda: old.accounts.get_user("alice@example.org"), timeout=5)  # its next try loads
    assert old.accounts.get_user("olga@old.example") is not None
    assert push_local(old.accounts, [old.writer.endpoints[0]], old.writer.prefix) == (0, 4)


def test_a_watch_from_a_compacted_revision_says_so(etcd_server):  # noqa: F811
    etcd = EtcdAccounts([etcd_server.endpoint], f"/compact{time.monotonic_ns()}/")
    first, _ = etcd.load()
    key = etcd_key(etcd.prefix, "domains", b"example.org")
    etcd.txn([], [{"request_put": {"key": b64(key), "value": b64(b"{}")}}])
    revision, _ = etcd.load()
    etcd.post("/kv/compaction", {"revision": revision})
    with pytest.raises(CompactedError):  # the mirror then loads the whole set again
        next(etcd.watch(first))


def test_an_endpoint_that_does_not_answer_is_skipped(tmp_path, etcd_server):  # noqa: F811
    nobody = socket.create_server(("127.0.0.1", 0))  # a port of ours where no etcd listens
    dead = f"http://127.0.0.1:{nobody.getsockname()[1]}"
    nobody.close()
    prefix = f"/endpoints{time.monotonic_ns()}/"
    a = Node(tmp_path, "a", [dead, etcd_server.endpoint], prefix)
    b = Node(tmp_path, "b", [dead, etcd_server.endpoint], prefix)
    try:
        a.writer.add_domain("example.org")
        a.writer.add_user("alice@example.org", PASSWORD)
        eventually(lambda: b.accounts.get_user("alice@example.org"))
    finally:
        a.close()
        b.close()
    with pytest.raises(EtcdUnavailableError, match=f"{dead}.*ConnectionFailedError"):
        EtcdAccounts([dead]).load()


def test_a_request_etcd_refuses_is_one_clear_error(etcd_server):  # noqa: F811
    etcd = EtcdAccounts([etcd_server.endpoint], f"/refused{time.monotonic_ns()}/")
    puts = [{"request_put": {"key": b64(etcd_key(etcd.prefix, "domains", f"d{i}.example".encode())),
                             "value": b64(b"{}")}} for i in range(200)]
    with pytest.raises(EtcdRequestError, match="too many operations"):  # etcd's cap: 128
        etcd.txn([], puts)


def test_the_cli_writes_to_etcd_in_cluster_mode(tmp_path, etcd_server):  # noqa: F811
    """`postroom user add` on node a, seen by `postroom user list` on node b (whose mirror
    runs here, as `postroom serve` runs it), through real config files and processes."""
    cluster = {"etcd": [etcd_server.endpoint], "prefix": f"/cli{time.monotonic_ns()}/"}
    configs = {name: write_config_file(tmp_path / f"{name}.toml", tmp_path / name,
                                       cluster={**cluster, "node": name}) for name in ("a", "b")}

    def postroom(node: str, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([POSTROOM, "--config", str(configs[node]), *args], input=password,
                              capture_output=True, text=True, timeout=60)

    assert postroom("a", "domain", "add", "example.org").returncode == 0
    added = postroom("a", "user", "add", "alice@example.org", "--password-stdin", password=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert postroom("a", "user", "list").stdout.startswith("alice@example.org")  # at once, on a
    again = postroom("b", "user", "add", "alice@example.org", "--password-stdin", password=PASSWORD + "\n")
    assert (again.returncode, again.stderr.strip()) == (1, "postroom: user alice@example.org already exists")

    b = Accounts(open_data_dir(tmp_path / "b", 4).accounts_path)
    mirror = AccountsMirror(b, [etcd_server.endpoint], cluster["prefix"]).start()
    try:
        eventually(lambda: postroom("b", "user", "list").stdout.startswith("alice@example.org"), timeout=15)
    finally:
        mirror.stop()
        b.close()
    _, rows = EtcdAccounts([etcd_server.endpoint], cluster["prefix"]).load()
    assert [(table, key) for table, key, _ in rows] == [("domains", b"example.org"), ("users", b"example.org\0alice")]


def _resolve(accounts: Accounts, address: str):
    try:
        return accounts.resolve(address)
    except UnknownAddressError:
        return None
