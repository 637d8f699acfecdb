"""A shard released by a node (`postroom cluster drain`) is let go by every daemon process of
that node, not only by its agent (issue 18, item 3; cluster/follow.py): the IMAP and POP3
sessions it served for the shard's accounts are told (`* BYE [UNAVAILABLE]`, `-ERR
[SYS/TEMP]`) and closed, no daemon keeps a file of the shard open (its volume could not be
detached otherwise), and a new login through the drained node is proxied to the new owner.

The agent runs the detach command only once every process of the node has let go
(cluster/pins.py): the nodes' detach command is tests/detach_probe.py, which records what
any process of the machine holds open under the shard's directory at that moment.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cluster_nodes import owners as etcd_owners
from cluster_nodes import start_nodes, stop_nodes, wait_balanced, wait_owners
from conftest import POSTROOM, client_tls_context
from detach_probe import open_under
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd
from cluster.local import open_node_table
from cluster.pins import let_go, process_pins
from storage import NotOwnerError, Store, open_data_dir

SHARDS = 4
NODES = ("node-a", "node-b")
PASSWORD = "correct horse battery"
DAEMONS = ("mtad", "imapd", "pop3d")


PROBE = Path(__file__).with_name("detach_probe.py")


@pytest.fixture
def nodes(tmp_path: Path, etcd_server):  # noqa: F811
    detach = f"{sys.executable} {PROBE} {{shard}} {{path}} {tmp_path / 'detached.jsonl'}"
    running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS,
                                   users=[f"user{i}@example.test" for i in range(40)], password=PASSWORD,
                                   cluster={"detach": detach})
    try:
        yield running, configs, tmp_path / "var"
    finally:
        stop_nodes(running)


def _detached(record: Path) -> list[dict]:
    """What the detach probe found at each detach so far (tests/detach_probe.py)."""
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _send(daemon, recipient: str, subject: str) -> None:
    address = daemon.listen("smtp.listen")
    message = f"From: someone@remote.example\r\nTo: {recipient}\r\nSubject: {subject}\r\n" \
              f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\n\r\nhello\r\n"
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("someone@remote.example", [recipient], message)  # raises unless 250


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
    etcd = Etcd(conf.load(configs["node-a"]).cluster)
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
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
    before = {name: open_under(pid, shards_dir) for name, pid in pids.items()}
    assert all(before.values()), before  # each daemon had the shards open: the check below can fail
    record = data_dir.parent / "detached.jsonl"
    earlier = len(_detached(record))  # node-a's balance at the start, when node-b joined
    mine = {number for number, node in etcd_owners(etcd).items() if node == "node-a"}

    drained = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "drain", "node-a"],
                             capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stderr

    # The agent detached each shard only once no process of the node had a file of it open:
    # the probe, run as the detach command, found none in any process of the machine (the
    # sessions above have not been read from or closed yet: theirs must be let go unasked).
    wait_until(lambda: mine <= {d["shard"] for d in _detached(record)[earlier:]}, 20, "node-a detaches its shards")
    assert [d for d in _detached(record) if d["open"]] == [], _detached(record)
    assert "event=shard_let_go" in node_a.stderr()

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
    wait_until(lambda: not any(open_under(pid, shards_dir) for pid in pids.values()), 15,
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
    assert not any(open_under(pid, shards_dir) for pid in pids.values())
    store.close()


def test_the_cli_opens_only_the_shards_its_node_holds(nodes):
    """`postroom status`, `store check` and the other commands that open the store touch
    only the node's own shards: another node's volume is not attached here, and opening its
    empty mount point would make an index there. Before, status listed every shard's usage."""
    running, configs, data_dir = nodes
    etcd = Etcd(conf.load(configs["node-a"]).cluster)
    owners = wait_balanced(etcd, NODES, SHARDS, 20)
    users = [f"user{i}@example.test" for i in range(40)]
    store = Store(open_data_dir(data_dir, SHARDS))  # shard numbers only: nothing opened here
    elsewhere = next(u for u in users if owners[store.shard_number(u)] == "node-b")
    here = next(u for u in users if owners[store.shard_number(u)] == "node-a")
    table = open_node_table(conf.load(configs["node-a"]), open_data_dir(data_dir, SHARDS))
    try:
        wait_until(lambda: set(table.claims()) == {s for s, n in owners.items() if n == "node-a"}, 10,
                   "node-a's table shows its claims")
    finally:
        table.close()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTROOM, "--config", str(configs["node-a"]), *args], capture_output=True, text=True,
                              timeout=60)

    status = cli("status")
    lines = {line.split()[1]: line for line in status.stdout.splitlines() if line.startswith("  shard ")}
    for shard, node in owners.items():
        held = "not held by this node" not in lines[str(shard)]
        assert held == (node == "node-a"), status.stdout
    assert f"({SHARDS // 2} held by this node)" in status.stdout, status.stdout

    checked = cli("store", "check", elsewhere)
    assert checked.returncode == 1 and "is not served by this node now" in checked.stderr, checked
    assert cli("store", "check", here).returncode == 0
    assert cli("store", "check").returncode == 0  # every account of the node's own shards


def test_a_pin_holds_the_detach_back_until_its_process_lets_go_or_dies(tmp_path: Path):
    """cluster/pins.py alone, with real processes: a process's pin keeps the agent waiting
    (which then names it), is refused while the agent holds the shard for its detach, and
    goes with its process, however that ends."""
    pins = tmp_path / "node-a.pins"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from cluster.pins import process_pins\n"
        f"process_pins(Path({str(pins)!r})).pin(3); print('pinned', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "pinned\n"
        with let_go(pins, 3, time.monotonic() + 0.3) as outcome:
            assert not outcome.all_let_go and outcome.waited >= 0.3
            assert outcome.holders == (holder.pid,)
        holder.kill()  # no release: its pin goes with it
        holder.wait(10)
        with let_go(pins, 3, time.monotonic() + 5) as outcome:
            assert outcome.all_let_go and outcome.waited < 1
            with pytest.raises(NotOwnerError):
                process_pins(pins).pin(3)  # nothing opens the shard under the detach
        release = process_pins(pins).pin(3)  # detached: a later take of the shard pins again
        release()
        release()  # once only: a second call does nothing
        with let_go(pins, 3, time.monotonic()) as outcome:
            assert outcome.all_let_go
    finally:
        holder.kill()
        holder.wait(10)
