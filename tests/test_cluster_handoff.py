"""Two whole nodes (`postroom serve` with [cluster]) on a real etcd, sharing one data dir
as nodes share the shards' volumes: mail taken by either node for a user whose shard the
other owns is handed over by LMTP before the 250 and stored by the owner, and IMAP and POP3
clients on either node are served by the owner through it (issue 18, item 5). The policy
chain runs where the message came in (DNS answered by an empty zone on loopback), and its
Junk verdict goes with the hand-off.
"""

from __future__ import annotations

import base64
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
from wire import node_proof as proof

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


class _IMAPFrom(imaplib.IMAP4_SSL):
    """An IMAP client whose connection comes from `source` (a loopback address of its own:
    the nodes are all 127.0.0.1, so a client there would be a peer)."""

    def __init__(self, source: str, *args, **kwargs):
        self._source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class _POP3From(poplib.POP3_SSL):
    def __init__(self, source: str, *args, **kwargs):
        self._source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def _login_lines(daemon, ip: str) -> list[str]:
    return [line for line in daemon.stderr().splitlines() if "event=login " in line and f" ip={ip} " in line]


def test_the_owner_knows_a_proxied_client_by_its_address(nodes):
    """Item 5: the client's address goes along with a proxied session, for the owner's logs
    and login throttle (IMAP: ID's x-originating-ip; POP3: XCLIENT ADDR=), believed from a
    live node only. And a session a node proxied is served by the node it reached, never
    proxied on (two tables disagreeing for a moment could send it round between them)."""
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        on_b = next(f"user{i}@example.test" for i in range(40)
                    if owners[store.shard_number(f"user{i}@example.test")] == "node-b")
    node_a, node_b = running["node-a"], running["node-b"]
    imap, pop3 = node_a.listen("imap.listen_tls"), node_a.listen("pop3.listen_tls")
    context = client_tls_context(node_a.config)
    imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))

    # Through node-a to node-b's user, from clients node-a's peers are not.
    with _IMAPFrom("127.0.0.55", imap.host, imap.port, ssl_context=context, timeout=30) as client:
        client.login(on_b, PASSWORD)
        assert client.select("INBOX")[0] == "OK"
    client = _POP3From("127.0.0.56", pop3.host, pop3.port, context=context, timeout=30)
    client.user(on_b)
    assert client.pass_(PASSWORD).startswith(b"+OK")
    client.quit()
    wait_until(lambda: _login_lines(node_b, "127.0.0.55") and _login_lines(node_b, "127.0.0.56"), 10,
               "node-b's logins under the clients' addresses")
    # Taken as node-a's, with its proof of the cluster's secret: the password was checked
    # once, on node-a (wire/node_proof.py).
    assert all(" via=127.0.0.1" in line and " node=node-a" in line
               for line in _login_lines(node_b, "127.0.0.55") + _login_lines(node_b, "127.0.0.56"))

    # A client that is no node is not believed: XCLIENT refused, its ID's address ignored.
    client = _POP3From("127.0.0.57", pop3.host, pop3.port, context=context, timeout=30)
    with pytest.raises(poplib.error_proto, match="nodes of this cluster only"):
        client._shortcmd("XCLIENT ADDR=10.9.8.7")
    client.quit()
    with _IMAPFrom("127.0.0.57", imap.host, imap.port, ssl_context=context, timeout=30) as client:
        client._simple_command("ID", '("x-originating-ip" "10.9.8.7" "x-postroom-proxy" "1")')
        client.login(on_b, PASSWORD)  # proxied as any client's
    wait_until(lambda: _login_lines(node_b, "127.0.0.57"), 10, "node-b's login of 127.0.0.57")
    assert not _login_lines(node_b, "10.9.8.7") and not _login_lines(node_a, "10.9.8.7")

    # A live node's proxy (this test connects from 127.0.0.1, the nodes' address) that reached
    # a node whose table names another owner: refused for now, not proxied on.
    with imaplib.IMAP4_SSL(imap.host, imap.port, ssl_context=context, timeout=30) as client:
        client._simple_command("ID", '("x-originating-ip" "127.0.0.58" "x-postroom-proxy" "1")')
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            client.login(on_b, PASSWORD)
    client = poplib.POP3_SSL(pop3.host, pop3.port, context=context, timeout=30)
    assert client._shortcmd("XCLIENT ADDR=127.0.0.58").startswith(b"+OK")
    client.user(on_b)
    with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
        client.pass_(PASSWORD)
    client.quit()
    moving = [line for line in node_a.stderr().splitlines() if "event=login_moving" in line]
    assert sum(" ip=127.0.0.58 " in line and " via=127.0.0.1" in line for line in moving) == 2, moving


def test_a_peer_address_alone_does_not_hand_over(nodes):
    """Anything on a node's machine shares its address: the LMTP listener takes MAIL only from
    a node that proved itself, AUTH PLAIN with its proof of the cluster's secret (etcd's) for
    the nonce in this session's greeting (wire/node_proof.py)."""
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        on_b = next(f"user{i}@example.test" for i in range(40)
                    if owners[store.shard_number(f"user{i}@example.test")] == "node-b")
    port = conf.load(running["node-b"].config_path).cluster.lmtp_port

    def session() -> tuple[smtplib.LMTP, str]:
        client = smtplib.LMTP(timeout=30)
        code, greeting = client.connect("127.0.0.1", port)  # the nodes' own address: a peer's
        assert code == 220
        client.ehlo("intruder.example")
        return client, proof.nonce_in(greeting.decode()) or ""

    client, nonce = session()
    assert nonce and client.has_extn("auth")
    assert client.mail("ceo@bank.example")[0] == 530  # no MAIL before the proof
    wrong = proof.proof(b"not the secret", nonce, "node-a")
    assert client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0node-a\0{wrong}".encode()).decode())[0] == 535
    client.close()
    assert "event=lmtp_auth_failed" in running["node-b"].stderr()

    # With the secret (what every node's agent reads from etcd), the same session is a hand-off.
    secret = etcd.snapshot().keys["secret"].value
    client, nonce = session()
    right = proof.proof(secret, nonce, "node-a")
    assert client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0node-a\0{right}".encode()).decode())[0] == 235
    subject = f"proven {uuid.uuid4().hex}"
    assert client.sendmail("someone@remote.example", [on_b], f"Subject: {subject}\r\n\r\nhi\r\n") == {}
    client.quit()
    # A proof is good for its own session only: the same answer to another nonce is wrong.
    client, other = session()
    assert other != nonce
    assert client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0node-a\0{right}".encode()).decode())[0] == 535
    client.close()
    assert any(subject.encode() in raw for raw in _stored(data_dir, on_b))


def _stored(data_dir, user: str) -> list[bytes]:
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        return [store.read_message(m) for m in store.fetch(user, "INBOX", [(1, 2**32 - 1)])]


def test_a_proxys_login_needs_a_nodes_address_and_proof(nodes):
    """The owner takes a login as a user without the password only from a live node's
    proxy: its address, and its proof of the cluster's secret for this session's nonce."""
    running, etcd, data_dir = nodes
    owners = wait_owners(etcd, NODES, SHARDS, 20, every_node=True)
    with Store(open_data_dir(data_dir, SHARDS)) as store:
        on_b = next(f"user{i}@example.test" for i in range(40)
                    if owners[store.shard_number(f"user{i}@example.test")] == "node-b")
    node_b = running["node-b"]
    imap, pop3 = node_b.listen("imap.listen_tls"), node_b.listen("pop3.listen_tls")
    context = client_tls_context(node_b.config)
    secret = etcd.snapshot().keys["secret"].value

    def plain(authzid: str, authcid: str, password: str) -> str:
        return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()

    def imap_try(client: imaplib.IMAP4, answer: str | None = None) -> str:
        nonce = proof.nonce_in(client.welcome.decode())
        assert nonce
        response = plain(on_b, "node-a", answer or proof.proof(secret, nonce, "node-a"))
        try:
            return client.authenticate("PLAIN", lambda _: response.encode() and base64.b64decode(response))[0]
        except imaplib.IMAP4.error as e:
            return str(e)

    # Not from a node's address (the nodes are 127.0.0.1): refused, whatever the proof.
    with _IMAPFrom("127.0.0.59", imap.host, imap.port, ssl_context=context, timeout=30) as client:
        assert "AUTHORIZATIONFAILED" in imap_try(client)
    # From a node's address with a wrong proof: refused, and said in the owner's log.
    with imaplib.IMAP4_SSL(imap.host, imap.port, ssl_context=context, timeout=30) as client:
        assert "AUTHORIZATIONFAILED" in imap_try(client, answer="0" * 64)
    assert "event=proxy_auth_failed" in node_b.stderr()
    # From a node's address with the proof: in, as the user.
    with imaplib.IMAP4_SSL(imap.host, imap.port, ssl_context=context, timeout=30) as client:
        assert imap_try(client) == "OK"
        assert client.select("INBOX")[0] == "OK"

    # POP3 likewise.
    client = _POP3From("127.0.0.59", pop3.host, pop3.port, context=context, timeout=30)
    nonce = proof.nonce_in(client.getwelcome().decode())
    with pytest.raises(poplib.error_proto):
        client._shortcmd("AUTH PLAIN " + plain(on_b, "node-a", proof.proof(secret, nonce, "node-a")))
    client.quit()
    client = poplib.POP3_SSL(pop3.host, pop3.port, context=context, timeout=30)
    nonce = proof.nonce_in(client.getwelcome().decode())
    with pytest.raises(poplib.error_proto):
        client._shortcmd("AUTH PLAIN " + plain(on_b, "node-a", "0" * 64))
    client.quit()
    client = poplib.POP3_SSL(pop3.host, pop3.port, context=context, timeout=30)
    nonce = proof.nonce_in(client.getwelcome().decode())
    assert client._shortcmd("AUTH PLAIN " + plain(on_b, "node-a", proof.proof(secret, nonce, "node-a"))) \
        .startswith(b"+OK")
    client.quit()
