"""Two whole nodes (`postroom serve` with [cluster]) on a real etcd, sharing one data dir
as nodes share the shards' volumes: mail taken by either node for a user whose shard the
other owns is handed over by LMTP before the 250 and stored by the owner, and IMAP and POP3
clients on either node are served by the owner through it (issue 18, item 5).
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import POSTROOM, add_accounts, client_tls_context, free_port, start_daemon, write_config_file
from etcd_peer import etcd_server  # noqa: F401 (fixture)

import conf
from cluster.etcd import Etcd
from storage import Store, open_data_dir

SHARDS = 4
TTL = 2
NODES = ("node-a", "node-b")


@pytest.fixture
def nodes(tmp_path: Path, etcd_server):  # noqa: F811
    data_dir = tmp_path / "var"
    prefix = f"/h-{uuid.uuid4().hex[:8]}/"
    running = {}
    try:
        for attempt in range(3):  # another checkout's suite may take a port first (conftest.py)
            configs = {node: write_config_file(tmp_path / f"{node}.toml", data_dir, storage={"shards": SHARDS},
                                               cluster={"etcd": [etcd_server.endpoint], "node": node,
                                                        "address": "127.0.0.1", "lmtp_port": free_port(),
                                                        "lease_ttl": TTL, "prefix": prefix})
                       for node in NODES}
            if attempt == 0:
                add_accounts(configs["node-a"], "correct horse battery",
                             users=[f"user{i}@example.test" for i in range(40)])
                # Made locally, as on a node before it joined: into etcd, the cluster's.
                pushed = subprocess.run([POSTROOM, "--config", str(configs["node-a"]), "cluster", "push-accounts"],
                                        capture_output=True, text=True, timeout=60)
                assert pushed.returncode == 0, pushed.stderr
            try:
                for node in NODES:
                    (tmp_path / node).mkdir(exist_ok=True)
                    running[node] = start_daemon(configs[node], tmp_path / node)
                break
            except AssertionError as e:
                for daemon in running.values():
                    daemon.stop()
                running.clear()
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
        yield running, Etcd(conf.load(configs["node-a"]).cluster), data_dir
    finally:
        for daemon in running.values():
            daemon.stop()


def _owners(etcd: Etcd) -> dict[int, str]:
    return {int(name): json.loads(kv.value)["node"] for name, kv in etcd.snapshot().under("owners/").items()}


def _balanced(etcd: Etcd, seconds: float = 20) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        owners = _owners(etcd)
        if len(owners) == SHARDS and set(owners.values()) == set(NODES):
            return owners
        time.sleep(0.1)
    raise AssertionError(f"shards not shared by both nodes within {seconds} s: {_owners(etcd)}")


def _send(daemon, recipient: str, subject: str) -> None:
    address = daemon.listen("smtp.listen")
    message = f"From: someone@remote.example\r\nTo: {recipient}\r\nSubject: {subject}\r\n" \
              f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\n\r\nhello\r\n"
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("someone@remote.example", [recipient], message)  # raises unless 250


def test_mail_for_the_other_nodes_shard_is_handed_over(nodes):
    running, etcd, data_dir = nodes
    owners = _balanced(etcd)
    time.sleep(1)  # the node tables the daemons read follow the agents' claims
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        by_node = {node: next(f"user{i}@example.test" for i in range(40)
                              if owners[store.shard_number(f"user{i}@example.test")] == node) for node in NODES}
        for taker in NODES:
            for owner, account in by_node.items():
                _send(running[taker], account, f"via {taker} for {owner}")
        for owner, account in by_node.items():
            subjects = sorted(store.read_message(m).split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                              for m in store.fetch(account, "INBOX", [(1, 2**32 - 1)]))
            assert subjects == [f"via {taker} for {owner}" for taker in NODES]
    for taker in NODES:
        other = next(n for n in NODES if n != taker)
        log = running[taker].stderr()
        assert "event=handed_over" in log and by_node[other] in log, log[-3000:]
    # IMAP on either node, for either user: the owner's mailbox, through the node asked.
    for node in NODES:
        daemon = running[node]
        for owner, account in by_node.items():
            address = daemon.listen("imap.listen_tls")
            with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config),
                                   timeout=30) as client:
                client.login(account, "correct horse battery")
                assert client.select("INBOX") == ("OK", [b"2"])
                _, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                subjects = sorted(part[1].decode().strip() for part in data if isinstance(part, tuple))
                assert subjects == [f"Subject: via {taker} for {owner}" for taker in NODES]
                assert client.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
        other = next(n for n in NODES if n != node)
        assert f"proxied_to=127.0.0.1:{running[other].listen('imap.listen').port}" in daemon.stderr()
    # POP3 likewise (over TLS, port 995): the owner's maildrop, and its lock, through either node.
    for node in NODES:
        daemon = running[node]
        for account in by_node.values():
            address = daemon.listen("pop3.listen_tls")
            client = poplib.POP3_SSL(address.host, address.port, context=client_tls_context(daemon.config),
                                     timeout=30)
            try:
                client.user(account)
                assert client.pass_(b"correct horse battery".decode()).startswith(b"+OK")
                assert client.stat()[0] == 2
                assert b"Subject: via node-a for" in b"\r\n".join(client.retr(1)[1])
                other_node = poplib.POP3_SSL(address.host, address.port, context=client_tls_context(daemon.config),
                                             timeout=30)
                other_node.user(account)
                with pytest.raises(poplib.error_proto, match="IN-USE"):  # the owner's lock, through a proxy too
                    other_node.pass_("correct horse battery")
                other_node.quit()
            finally:
                client.quit()
