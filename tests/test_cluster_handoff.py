"""Two whole nodes (`postroom serve` with [cluster]) on a real etcd, sharing one data dir
as nodes share the shards' volumes: mail taken by either node for a user whose shard the
other owns is handed over by LMTP before the 250 and stored by the owner, and IMAP and POP3
clients on either node are served by the owner through it (issue 18, item 5). The policy
chain runs where the message came in (DNS answered by an empty zone on loopback), and its
Junk verdict goes with the hand-off.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import time
import uuid

import pytest
from cluster_nodes import start_nodes, stop_nodes, wait_owners
from conftest import client_tls_context
from dnszone import DNSZone
from etcd_peer import etcd_server  # noqa: F401 (fixture)
from waiting import wait_until

import conf
from cluster.etcd import Etcd
from storage import Store, open_data_dir

SHARDS = 4
NODES = ("node-a", "node-b")
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, etcd_server):  # noqa: F811
    """One pair of nodes for the module: each test's messages have subjects or users of its own."""
    tmp_path = tmp_path_factory.mktemp("handoff")
    with DNSZone({}) as zone:
        # A message without a From: scores over the Junk threshold (and under the reject one).
        running, configs = start_nodes(tmp_path, etcd_server.endpoint, NODES, shards=SHARDS,
                                       users=[f"user{i}@example.test" for i in range(40)], password=PASSWORD,
                                       dns={"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 2},
                                       policy={"enabled": True}, **{"policy.weights": {"no_from": 10.0}})
        try:
            yield running, Etcd(conf.load(configs["node-a"]).cluster), tmp_path / "var"
        finally:
            stop_nodes(running)


def _send(daemon, recipient: str, subject: str, *, spam: bool = False) -> None:
    address = daemon.listen("smtp.listen")
    message = ("" if spam else "From: someone@remote.example\r\n") + f"To: {recipient}\r\nSubject: {subject}\r\n" \
              f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\n\r\nhello\r\n"
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("someone@remote.example", [recipient], message)  # raises unless 250


def test_mail_for_the_other_nodes_shard_is_handed_over(nodes):
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    time.sleep(1)  # the node tables the daemons read follow the agents' claims
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        by_node = {node: next(f"user{i}@example.test" for i in range(40)
                              if owners[store.shard_number(f"user{i}@example.test")] == node) for node in NODES}
        for taker in NODES:
            for owner, account in by_node.items():
                _send(running[taker], account, f"via {taker} for {owner}")
                _send(running[taker], account, f"spam via {taker} for {owner}", spam=True)
        for owner, account in by_node.items():
            for mailbox, prefix in (("INBOX", ""), ("Junk", "spam ")):
                subjects = sorted(store.read_message(m).split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                                  for m in store.fetch(account, mailbox, [(1, 2**32 - 1)]))
                assert subjects == [f"{prefix}via {taker} for {owner}" for taker in NODES], mailbox
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
                client.login(account, PASSWORD)
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
                assert client.pass_(PASSWORD).startswith(b"+OK")
                assert client.stat()[0] == 2
                assert b"Subject: via node-a for" in b"\r\n".join(client.retr(1)[1])
                other_node = poplib.POP3_SSL(address.host, address.port, context=client_tls_context(daemon.config),
                                             timeout=30)
                other_node.user(account)
                with pytest.raises(poplib.error_proto, match="IN-USE"):  # the owner's lock, through a proxy too
                    other_node.pass_(PASSWORD)
                other_node.quit()
            finally:
                client.quit()


def test_a_message_sent_again_by_any_route_is_stored_once(nodes):
    """A sender that lost the 250 sends the message again, maybe to another node: the
    copy handed over by LMTP and the copy taken by the owner itself have one deduplication
    key (LMTP's XSENT tells the owner where the sender's bytes start)."""
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    wait_until(lambda: all("event=ready" in d.stderr() for d in running.values()), 10, "the agents ready")
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        # The last of node-b's users: the first is the other test's.
        account = next(u for i in reversed(range(40))
                       if owners[store.shard_number(u := f"user{i}@example.test")] == "node-b")
    message = (f"From: someone@remote.example\r\nTo: {account}\r\nSubject: once\r\n"
               f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\n\r\nhello\r\n")
    for node in ("node-a", "node-b", "node-a"):  # handed over, taken by the owner, handed over
        address = running[node].listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=30) as client:
            client.sendmail("someone@remote.example", [account], message)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        assert len(list(store.fetch(account, "INBOX", [(1, 2**32 - 1)]))) == 1
    assert running["node-b"].stderr().count("event=message_duplicate") == 2


def test_the_lmtp_listener_takes_only_the_cluster_nodes(nodes):
    """LMTP runs no checks (the handing node ran them): only the live nodes' addresses may
    connect. Another loopback address (127.0.0.2) stands for a stranger on the network."""
    running, etcd, _ = nodes
    wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    wait_until(lambda: all("event=ready" in d.stderr() for d in running.values()), 10, "the agents ready")
    port = running["node-b"].config.cluster.lmtp_port
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as stranger:
        assert stranger.makefile("rb").readline().startswith(b"421 4.7.1 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as node:
        assert node.makefile("rb").readline().startswith(b"220 ")
    wait_until(lambda: 'client=127.0.0.2 reason="not a node of the cluster"' in running["node-b"].stderr(), 10,
               "the refusal logged")
