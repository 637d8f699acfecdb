"""Outbound delivery (mtad/outbound): routes against a DNS zone served on loopback
(tests/dnszone.py), one transaction against aiosmtpd receivers (tests/sinks.py), and the
runner in the running daemon, from the queue to the sinks and back to the sender's INBOX.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import io
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import uvloop

import conf
from conftest import Daemon, add_accounts, client_tls_context, free_port, start_daemon
from dnszone import DNSZone
from mtad.outbound.client import ClientSettings, ConnectionCache, Message, Recipient, deliver
from mtad.outbound.dotstuff import DotStuffer
from mtad.outbound.routes import Host, Route, RouteError, Router
from mtad.outbound.runner import LOCK_RETRY, Runner
from procs import processes
from sinks import Sink, certificate_for
from storage import Queue, QueuedMessage, QueuedRecipient, QueueEnvelope, QueueSet, RecipientState, open_data_dir
from waiting import wait_until

LOOPBACK = "127.0.0.1"
SHARDS = 4  # conftest's write_config


def _config(zone: DNSZone | None = None, **outbound) -> conf.Config:
    lines = ['[server]\nhostname = "mail.example.test"\n', "[queue]\nconnect_timeout = 3\ncommand_timeout = 10\n"]
    if zone is not None:
        lines.append(f'[dns]\nnameservers = ["{LOOPBACK}"]\nport = {zone.port}\ntimeout = 2\n')
    routes = outbound.pop("routes", {})
    if outbound:
        lines.append("[outbound]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in outbound.items()))
    if routes:
        lines.append("[outbound.routes]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in routes.items()))
    return conf.loads("".join(lines))


def _toml(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f'"{value}"'


def _route(config: conf.Config, domain: str, rng: random.Random | None = None) -> Route:
    return asyncio.run(Router(config.outbound, config.dns, rng=rng).route(domain))


# -- routes ------------------------------------------------------------------------------


def test_mx_hosts_in_preference_order_then_their_addresses():
    zone = {"example.net": {"MX": ["20 mx2.example.net.", "10 mx1.example.net."]},
            "mx1.example.net": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
            "mx2.example.net": {"A": ["127.0.0.12"]}}
    with DNSZone(zone) as dns:
        route = _route(_config(dns), "example.net")
    assert route.destination == "example.net"
    assert [(h.name, h.address) for h in route.hosts] == [
        ("mx1.example.net", "127.0.0.11"), ("mx1.example.net", "::1"), ("mx2.example.net", "127.0.0.12")]


def test_equal_preferences_are_shuffled():
    mx = ["10 a.example.net.", "10 b.example.net.", "10 c.example.net.", "5 first.example.net."]
    zone = {"example.net": {"MX": mx},
            **{f"{n}.example.net": {"A": [f"127.0.0.{i + 1}"]} for i, n in enumerate(("a", "b", "c", "first"))}}
    seen = Counter()
    with DNSZone(zone) as dns:
        config = _config(dns)
        rng = random.Random(1)
        for _ in range(30):
            hosts = [h.name for h in _route(config, "example.net", rng).hosts]
            assert hosts[0] == "first.example.net"
            assert sorted(hosts[1:]) == ["a.example.net", "b.example.net", "c.example.net"]
            seen[hosts[1]] += 1
    assert len(seen) == 3 and min(seen.values()) >= 4, seen


def test_no_mx_falls_back_to_the_domains_address():
    with DNSZone({"example.net": {"A": ["127.0.0.7"], "TXT": ['"v=spf1 -all"']}}) as dns:
        route = _route(_config(dns), "Example.NET")
    assert [(h.name, h.address, h.port) for h in route.hosts] == [("example.net", "127.0.0.7", 25)]


@pytest.mark.parametrize(("zone", "servfail", "code", "enhanced"), [
    ({"example.net": {"MX": ["0 ."]}}, set(), 556, "5.1.10"),  # RFC 7505 null MX
    ({}, set(), 550, "5.1.2"),  # NXDOMAIN
    ({"example.net": {"TXT": ['"x"']}}, set(), 550, "5.1.2"),  # no MX, no A/AAAA
    ({}, {"example.net"}, 451, "4.4.3"),  # SERVFAIL
    ({"example.net": {"MX": ["10 mx.example.net."]}}, {"mx.example.net"}, 451, "4.4.3"),
])
def test_route_failures(zone, servfail, code, enhanced):
    with DNSZone(zone, servfail=servfail) as dns:
        with pytest.raises(RouteError) as caught:
            _route(_config(dns), "example.net")
    assert (caught.value.code, caught.value.enhanced) == (code, enhanced)
    assert caught.value.permanent is (code >= 500)


def test_a_silent_nameserver_is_a_temporary_failure():
    with DNSZone({}, silent={"example.net"}) as dns:
        with pytest.raises(RouteError) as caught:
            _route(_config(dns), "example.net")
    assert caught.value.code == 451


def test_routes_come_before_the_relay_and_the_relay_before_mx():
    with DNSZone({}) as dns:  # any DNS lookup would be NXDOMAIN
        config = _config(dns, relay="127.0.0.1:2600", routes={"partner.example": "127.0.0.2:2700"})
        assert _route(config, "partner.example") == Route("127.0.0.2:2700", (Host("127.0.0.2", "127.0.0.2", 2700),))
        relay = _route(config, "elsewhere.example")
        assert relay.relay and relay.hosts == (Host("127.0.0.1", "127.0.0.1", 2600),)
        assert dns.queries == []


# -- dot-stuffing ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b".starts\r\nplain\r\n.dot\r\n..two\r\nend", b"a\nb\r.c\r\n.\r\n", b"", b"\r\n.\r\n", b"x\r"])
def test_dot_stuffing_is_the_same_whatever_the_chunks(raw):
    def whole(chunks):
        stuffer = DotStuffer()
        return b"".join(stuffer.feed(c) for c in chunks) + stuffer.end()

    expected = whole([raw])
    for size in range(1, 6):
        assert whole([raw[i:i + size] for i in range(0, len(raw), size)]) == expected
    body = expected[:-3]
    assert body.endswith(b"\r\n") or body == b""
    assert b"\r\n.\r\n" not in b"\r\n" + body  # the terminator never occurs inside
    lines = body.split(b"\r\n")
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")


# -- one transaction ---------------------------------------------------------------------


def _message(*recipients: str | Recipient, body: bytes = b"Subject: hi\r\n\r\nHello.\r\n", **kw) -> Message:
    rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
    return Message(kw.pop("sender", "alice@example.test"), rcpts, len(body), lambda: io.BytesIO(body), **kw)


def _deliver(config: conf.Config, route: Route, message: Message, domain: str = "example.net"):
    settings = ClientSettings.from_config(config)
    return asyncio.run(deliver(route, message, settings, verified=domain in settings.require_verified))


def _sink_route(*sinks: Sink, name: str = "localhost") -> Route:
    return Route("example.net", tuple(Host(name, LOOPBACK, s.port) for s in sinks))


def test_per_recipient_results_and_the_message_as_sent():
    body = b"Subject: dots\r\n\r\n.leading dot\r\nbare\nlf\r\n" + (b"x" * 98 + b"\r\n.\r\n") * 3000
    with Sink(replies={"bad@example.net": "550 5.1.1 no such user", "later@example.net": "451 4.3.0 later"},
              pipelining=True) as sink:
        outcome = _deliver(_config(), _sink_route(sink),
                           _message("ok@example.net", "bad@example.net", "later@example.net", body=body))
    states = {r.address: (r.state, r.reply) for r in outcome.results}
    assert states["ok@example.net"][0] == "delivered"
    assert states["bad@example.net"] == ("bounced", "550 5.1.1 no such user")
    assert states["later@example.net"] == ("deferred", "451 4.3.0 later")
    (got,) = sink.wait_for(1)
    assert got.recipients == ["ok@example.net"]
    assert got.data == body.replace(b"bare\nlf", b"bare\r\nlf")  # un-stuffed again by the sink
    assert got.helo == "mail.example.test"


def test_a_dead_host_is_skipped_for_the_next():
    with Sink() as dead:
        pass  # its port is closed again
    with Sink() as alive:
        outcome = _deliver(_config(), _sink_route(dead, alive), _message("ok@example.net"))
        assert [r.state for r in outcome.results] == ["delivered"]
        assert outcome.host.port == alive.port


def test_every_host_dead_defers():
    with Sink() as dead:
        pass
    outcome = _deliver(_config(), _sink_route(dead, dead), _message("a@example.net", "b@example.net"))
    assert [r.state for r in outcome.results] == ["deferred", "deferred"]
    assert outcome.results[0].reply.startswith("451 4.4.1")


def test_starttls_is_used_when_offered(tmp_path):
    cert = certificate_for(tmp_path, "mx.example.net")
    with Sink(tls=cert) as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message("ok@example.net"))
        assert outcome.tls and outcome.results[0].state == "delivered"
        assert sink.wait_for(1)[0].tls


def test_verified_tls_needs_a_valid_certificate(tmp_path):
    cert = certificate_for(tmp_path, "mx.example.net")
    with Sink(tls=cert) as sink, Sink() as plain:
        strict = _config(require_verified_tls=["example.net"])
        # Not signed by a CA we trust: the host is not used, the mail waits.
        outcome = _deliver(strict, _sink_route(sink, name="mx.example.net"), _message("a@example.net"))
        assert outcome.results[0].reply.startswith("451 4.7.5")
        # No STARTTLS at all: the same.
        outcome = _deliver(strict, _sink_route(plain, name="mx.example.net"), _message("a@example.net"))
        assert outcome.results[0].reply.startswith("451 4.7.5")
        trusting = _config(require_verified_tls=["example.net"], ca_file=str(cert[0]))
        outcome = _deliver(trusting, _sink_route(sink, name="mx.example.net"), _message("a@example.net"))
        assert outcome.tls and outcome.results[0].state == "delivered"
        # The certificate must name the host: another name is refused.
        outcome = _deliver(trusting, _sink_route(sink, name="other.example.net"), _message("a@example.net"))
        assert outcome.results[0].reply.startswith("451 4.7.5")
        # Another domain does not require it: opportunistic TLS takes any certificate.
        outcome = _deliver(strict, _sink_route(sink, name="other.example.net"), _message("a@example.org"),
                           domain="example.org")
        assert outcome.tls and outcome.results[0].state == "delivered"


def test_smtputf8_message_to_a_server_without_it_bounces_5_6_7():
    with Sink(smtputf8=False) as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message("jöran@example.net", smtputf8=True))
        assert outcome.results[0].state == "bounced" and " 5.6.7 " in outcome.results[0].reply
        assert sink.rcpt_attempts == []
    with Sink(smtputf8=True) as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message("jöran@example.net", smtputf8=True))
        assert outcome.results[0].state == "delivered"
        assert "SMTPUTF8" in sink.wait_for(1)[0].mail_options


def test_over_the_servers_size_bounces_before_sending():
    with Sink(size=1000) as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message("a@example.net", body=b"x" * 2000 + b"\r\n"))
        assert outcome.results[0].reply.startswith("552 5.3.4")
        assert sink.rcpt_attempts == []
        outcome = _deliver(_config(), _sink_route(sink), _message("a@example.net", body=b"small\r\n"))
        assert outcome.results[0].state == "delivered"
        assert "SIZE=7" in sink.wait_for(1)[0].mail_options


def test_dsn_parameters_go_to_a_next_hop_that_offers_dsn():
    recipient = Recipient("a@example.net", notify=("SUCCESS", "DELAY"), orcpt="rfc822;a+x@example.net")
    with Sink(dsn=True, pipelining=True) as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message(recipient, ret="HDRS", envid="ID+1 x"))
        assert outcome.dsn and outcome.results[0].state == "delivered"
        got = sink.wait_for(1)[0]
    assert sorted(got.dsn_mail) == ["ENVID=ID+2B1+20x", "RET=HDRS"]
    assert got.dsn_rcpt["a@example.net"] == ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;a+2Bx@example.net"]
    with Sink(dsn=False) as sink:  # parameters it does not offer are not sent (it would say 555)
        outcome = _deliver(_config(), _sink_route(sink), _message(recipient, ret="HDRS", envid="X"))
        assert not outcome.dsn and outcome.results[0].state == "delivered"


def test_a_connection_carries_several_messages_and_a_closed_one_is_replaced():
    settings = ClientSettings.from_config(_config())

    async def send(route, count):
        outcomes = []
        for i in range(count):
            outcomes.append(await deliver(route, _message(f"u{i}@example.net"), settings, cache=cache))
        return outcomes

    for pipelining in (True, False):
        cache = None
        with Sink(pipelining=pipelining, replies={"u1@example.net": "550 5.1.1 no such user"}) as sink:
            async def run():
                nonlocal cache
                cache = ConnectionCache()
                try:
                    return await send(_sink_route(sink), 3)
                finally:
                    cache.close()

            outcomes = asyncio.run(run())
            assert [o.results[0].state for o in outcomes] == ["delivered", "bounced", "delivered"]
            assert len(sink.wait_for(2)) == 2 and len(sink.sessions) == 1  # one EHLO: one connection
    # The server goes away while the connection waits: the next message opens a new one.
    port = free_port()
    first = Sink(port=port)

    async def across_a_restart():
        nonlocal cache
        cache = ConnectionCache()
        try:
            with first:
                done = await send(_sink_route(first), 1)
            with Sink(port=port) as second:
                done += await send(_sink_route(second), 1)
                return done, second
        finally:
            cache.close()

    outcomes, second = asyncio.run(across_a_restart())
    assert [o.results[0].state for o in outcomes] == ["delivered", "delivered"]
    assert len(second.received) == 1


def test_a_refused_data_bounces_or_defers_every_accepted_recipient():
    with Sink(data_reply="554 5.6.0 content refused") as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message("a@example.net", "b@example.net"))
    assert [r.reply for r in outcome.results] == ["554 5.6.0 content refused"] * 2


# -- the runner, in the running daemon ---------------------------------------------------
#
# Mail is put in the queue through its API (storage's Queue, as submission and forwarding
# do) before the daemon starts; the daemon's runner delivers it to sinks found through the
# test zone: each MX host is a loopback address (127.0.0.x) on one port, [outbound] port.

PASSWORD = "outbound-test-password"
SENDER = "alice@example.test"


@pytest.fixture
def mx_port() -> int:
    return free_port()


@pytest.fixture
def outbound(write_config, tmp_path, data_dir, cli, mx_port):
    """start(zone, **sections) -> the running daemon, with alice@example.test as a local user."""
    started: list[Daemon] = []

    def start(zone: DNSZone, **sections) -> Daemon:
        config = {"dns": {"nameservers": [LOOPBACK], "port": zone.port, "timeout": "2s"},
                  "queue": {"retry_schedule": ["1s"], "connect_timeout": "2s", "command_timeout": "10s"},
                  "outbound": {"port": mx_port}}
        for section, keys in sections.items():
            config.setdefault(section, {}).update(keys)
        path = write_config(**config)
        if not started:  # through the accounts API in this process: a CLI process costs each test a second
            add_accounts(path, PASSWORD, [SENDER])
        started.append(start_daemon(path, tmp_path))
        return started[-1]

    yield start
    for daemon in started:
        code = daemon.stop()
        assert code in (0, -9), f"postroom serve exited {code}:\n{daemon.stderr()}"
    if started:
        assert "runner_bug" not in started[-1].stderr(), started[-1].stderr()


def raw_message(subject: str = "hello", body: str = "Hello there.\r\n", to: str = "bob@example.net") -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4()}@example.test>\r\n"
            f"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\n\r\n{body}").encode()


def enqueue(data_dir: Path, raw: bytes, *recipients: str | QueuedRecipient, sender: str = SENDER, **fields) -> str:
    rcpts = tuple(r if isinstance(r, QueuedRecipient) else QueuedRecipient(r) for r in recipients)
    with Queue(open_data_dir(data_dir, SHARDS)) as queue:
        with queue.begin(QueueEnvelope(sender, rcpts, **fields)) as entry:
            entry.write(raw)
            return entry.commit()


def queued(data_dir: Path, qid: str):
    with Queue(open_data_dir(data_dir, SHARDS)) as queue:
        return queue.get(qid)




def inbox(daemon: Daemon, count: int, timeout: float = 30.0) -> list[email.message.Message]:
    """The sender's INBOX over IMAP, once it holds `count` messages."""
    address = daemon.listen("imap.listen_tls")
    client = imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config),
                               timeout=30)
    try:
        client.login(SENDER, PASSWORD)

        def enough():
            client.select("INBOX", readonly=True)
            _, data = client.search(None, "ALL")
            return data[0].split() if len(data[0].split()) >= count else None

        numbers = wait_until(enough, timeout, f"{count} message(s) in {SENDER}'s INBOX")
        messages = []
        for number in numbers:
            _, data = client.fetch(number, "(BODY.PEEK[])")
            messages.append(email.message_from_bytes(data[0][1], policy=email.policy.default))
        return messages
    finally:
        client.logout()


def report_fields(report: email.message.Message) -> dict[str, str]:
    """The per-recipient fields of a multipart/report (RFC 3464), as one dict."""
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    (status,) = [p for p in report.walk() if p.get_content_type() in ("message/delivery-status",
                                                                       "message/global-delivery-status")]
    text = status.as_bytes().decode("utf-8", "replace")
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def _mx_zone(*hosts: tuple[int, str, str]) -> dict:
    zone = {"example.net": {"MX": [f"{pref} {name}." for pref, name, _ in hosts]}}
    for _, name, address in hosts:
        zone[name] = {"A": [address]}
    return zone


def test_mx_in_preference_order_and_a_dead_first_host_skipped(outbound, data_dir, mx_port):
    zone = _mx_zone((10, "mx1.example.net", "127.0.0.11"), (20, "mx2.example.net", "127.0.0.12"),
                    (30, "mx3.example.net", "127.0.0.13"))
    with DNSZone(zone) as dns, Sink(host="127.0.0.12", port=mx_port) as mx2, \
            Sink(host="127.0.0.13", port=mx_port) as mx3:
        qid = enqueue(data_dir, raw_message(), "bob@example.net")
        daemon = outbound(dns)
        (got,) = mx2.wait_for(1)  # mx1 has no server: the next by preference takes it
        assert got.sender == SENDER and got.recipients == ["bob@example.net"]
        wait_until(lambda: queued(data_dir, qid) is None, what="the message leaves the queue")
        assert mx3.received == []
        assert f"qid={qid}" in daemon.stderr() and "result=delivered" in daemon.stderr()


def test_equal_preferences_share_the_load(outbound, data_dir, mx_port):
    zone = _mx_zone((10, "a.example.net", "127.0.0.21"), (10, "b.example.net", "127.0.0.22"))
    with DNSZone(zone) as dns, Sink(host="127.0.0.21", port=mx_port) as a, Sink(host="127.0.0.22", port=mx_port) as b:
        for i in range(16):
            enqueue(data_dir, raw_message(f"message {i}"), f"user{i}@example.net")
        outbound(dns)
        wait_until(lambda: len(a.received) + len(b.received) == 16, what="16 messages at the sinks")
        assert a.received and b.received, (len(a.received), len(b.received))


def test_a_domain_without_mx_gets_mail_at_its_address(outbound, data_dir, mx_port):
    with DNSZone({"example.net": {"A": ["127.0.0.31"]}}) as dns, Sink(host="127.0.0.31", port=mx_port) as sink:
        enqueue(data_dir, raw_message(), "bob@example.net")
        outbound(dns)
        assert sink.wait_for(1)[0].recipients == ["bob@example.net"]


def test_null_mx_bounces_at_once_into_the_senders_inbox(outbound, data_dir):
    with DNSZone({"example.net": {"MX": ["0 ."]}}) as dns:
        qid = enqueue(data_dir, raw_message("to nowhere"), "bob@example.net")
        daemon = outbound(dns)
        (report,) = inbox(daemon, 1)
    fields = report_fields(report)
    assert fields["action"] == "failed" and fields["status"] == "5.1.10"
    assert "bob@example.net" in fields["final-recipient"]
    assert queued(data_dir, qid) is None


def test_a_4xx_is_tried_again_and_delivered_once(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.41"))) as dns, \
            Sink(host="127.0.0.41", port=mx_port,
                 replies={"bob@example.net": ["451 4.3.0 later", "250 2.1.5 OK"]}) as sink:
        qid = enqueue(data_dir, raw_message(), "bob@example.net")
        started = time.monotonic()
        daemon = outbound(dns)
        sink.wait_for(1)
        assert time.monotonic() - started >= 1.0  # the retry schedule's 1 s wait
        wait_until(lambda: queued(data_dir, qid) is None, what="the message leaves the queue")
        time.sleep(1.5)
        assert len(sink.received) == 1 and sink.rcpt_attempts == ["bob@example.net"] * 2
        log = daemon.stderr()
        assert "result=deferred" in log and "result=delivered" in log


def test_a_5xx_bounces_with_a_report_in_the_senders_inbox(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.51"))) as dns, \
            Sink(host="127.0.0.51", port=mx_port, replies={"nobody@example.net": "550 5.1.1 no such user"}) as sink:
        qid = enqueue(data_dir, raw_message("bounce me", body="The body.\r\n"), "nobody@example.net",
                      "bob@example.net")
        daemon = outbound(dns)
        (report,) = inbox(daemon, 1)
        assert sink.wait_for(1)[0].recipients == ["bob@example.net"]
    fields = report_fields(report)
    assert fields["action"] == "failed" and fields["status"] == "5.1.1"
    assert "nobody@example.net" in fields["final-recipient"] and "550 5.1.1" in fields["diagnostic-code"]
    assert "Subject: bounce me" in report.as_string()
    assert report["From"].addresses[0].username.upper() == "MAILER-DAEMON"
    assert queued(data_dir, qid) is None


def test_success_and_delay_reports_and_ret_hdrs(outbound, data_dir, mx_port):
    notify = ("SUCCESS", "DELAY")
    zone = {**_mx_zone((10, "mx.example.net", "127.0.0.61")), "example.com": {"A": ["127.0.0.62"]}}
    with DNSZone(zone) as dns, \
            Sink(host="127.0.0.61", port=mx_port, replies={"slow@example.net": "451 4.2.0 mailbox busy"}) as sink, \
            Sink(host="127.0.0.62", port=mx_port, dsn=True) as dsn_sink:
        qid = enqueue(data_dir, raw_message("reports", body="Secret body.\r\n"),
                      QueuedRecipient("fast@example.net", notify=notify),
                      QueuedRecipient("slow@example.net", notify=notify),
                      QueuedRecipient("dsn@example.com", notify=("SUCCESS",)), ret="HDRS", envid="ENV-61")
        daemon = outbound(dns, queue={"delay_warning": "1s", "retry_schedule": ["1s"]})
        sink.wait_for(1)
        # A next hop that offers DSN is told NOTIFY and reports itself: no report from us.
        assert dsn_sink.wait_for(1)[0].dsn_rcpt["dsn@example.com"] == ["NOTIFY=SUCCESS"]
        reports = inbox(daemon, 2)
        time.sleep(3)  # more attempts for slow@: still one delay report
        assert len(inbox(daemon, 2)) == 2
    by_action = {report_fields(r)["action"]: r for r in reports}
    assert set(by_action) == {"relayed", "delayed"}  # the sink does not offer DSN: we report success
    assert "fast@example.net" in report_fields(by_action["relayed"])["final-recipient"]
    assert "slow@example.net" in report_fields(by_action["delayed"])["final-recipient"]
    assert all("dsn@example.com" not in report.as_string() for report in reports)
    for report in reports:
        assert report_fields(report)["original-envelope-id"] == "ENV-61"
        text = report.as_string()
        assert "Subject: reports" in text and "Secret body." not in text  # RET=HDRS: headers only
    assert queued(data_dir, qid) is not None  # slow@ is still deferred


def test_sigkill_with_a_deferred_message_then_one_delivery_after_restart(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.71"))) as dns, \
            Sink(host="127.0.0.71", port=mx_port, replies={"bob@example.net": "451 4.3.0 not now"}) as sink:
        qid = enqueue(data_dir, raw_message(), "bob@example.net")
        daemon = outbound(dns, queue={"retry_schedule": ["2s"]})
        wait_until(lambda: sink.rcpt_attempts, what="a first attempt")
        wait_until(lambda: (m := queued(data_dir, qid)) is not None and m.recipients[0].attempts == 1,
                   what="the deferral recorded")
        daemon.stop(signal.SIGKILL)
        wait_until(lambda: not [p for p, proc in processes().items() if proc.parent == daemon.process.pid],
                   what="serve's children gone")
        sink.replies["bob@example.net"] = ["250 2.1.5 OK"]
        outbound(dns, queue={"retry_schedule": ["2s"]})
        sink.wait_for(1)
        wait_until(lambda: queued(data_dir, qid) is None, what="the message leaves the queue")
        time.sleep(3)
        assert len(sink.received) == 1


def test_a_stop_lets_a_delivery_under_way_finish_and_record_it(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.75"))) as dns, \
            Sink(host="127.0.0.75", port=mx_port, data_delay=2.0) as sink:
        qid = enqueue(data_dir, raw_message(), "bob@example.net")
        daemon = outbound(dns)
        wait_until(lambda: sink.rcpt_attempts, what="the delivery under way")
        assert daemon.stop() == 0  # SIGTERM while the sink holds the data phase
        assert len(sink.wait_for(1)) == 1
        assert queued(data_dir, qid) is None  # recorded before the process ended
        outbound(dns)
        time.sleep(2)
        assert len(sink.received) == 1


def test_the_runner_uses_starttls_when_offered(outbound, data_dir, mx_port, tmp_path):
    cert = certificate_for(tmp_path, "mx.example.net")
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.81"))) as dns, \
            Sink(host="127.0.0.81", port=mx_port, tls=cert) as sink:
        enqueue(data_dir, raw_message(), "bob@example.net")
        daemon = outbound(dns)
        assert sink.wait_for(1)[0].tls
        assert "tls=true" in wait_until(lambda: "result=delivered" in daemon.stderr() and daemon.stderr())


def test_smtputf8_to_a_server_without_it_bounces_5_6_7(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.91"))) as dns, \
            Sink(host="127.0.0.91", port=mx_port, smtputf8=False) as sink:
        enqueue(data_dir, raw_message("utf8"), "jöran@example.net", smtputf8=True)
        daemon = outbound(dns)
        (report,) = inbox(daemon, 1)
        assert sink.rcpt_attempts == []
    assert report_fields(report)["status"] == "5.6.7"


def test_a_report_to_a_remote_sender_goes_from_the_null_sender_never_to_it_nor_about_one(outbound, data_dir,
                                                                                          mx_port):
    zone = {**_mx_zone((10, "mx.example.net", "127.0.0.101")), "example.org": {"A": ["127.0.0.102"]}}
    with DNSZone(zone) as dns, \
            Sink(host="127.0.0.101", port=mx_port, replies={"nobody@example.net": "550 5.1.1 no such user"}) as net, \
            Sink(host="127.0.0.102", port=mx_port) as org:
        enqueue(data_dir, raw_message(), "nobody@example.net", sender="carol@example.org")
        enqueue(data_dir, raw_message("already a bounce"), "nobody@example.net", sender="")
        relayed_report = raw_message("a report relayed with a sender").replace(
            b"\r\n\r\n", b"\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n", 1)
        enqueue(data_dir, relayed_report, "nobody@example.net", sender="carol@example.org")
        daemon = outbound(dns)
        (report,) = org.wait_for(1)
        assert report.sender == "<>" and report.recipients == ["carol@example.org"]  # aiosmtpd says <> for it
        assert b"multipart/report" in report.data
        wait_until(lambda: daemon.stderr().count("dsn_suppressed") == 2,
                   what="no report to <>, none about a report")
        time.sleep(1)
        assert len(org.received) == 1 and net.received == []


def test_the_report_about_a_forward_goes_straight_to_the_original_sender(outbound, data_dir, mx_port):
    """A forwarded message's sender is our SRS address: its report is unwrapped and sent to
    the original sender, not out through DNS to our own name (found by an attack: such
    reports waited on an MX lookup of our hostname until max_lifetime)."""
    from mtad.srs import SRS

    zone = {**_mx_zone((10, "mx.example.net", "127.0.0.101")), "example.org": {"A": ["127.0.0.102"]}}
    srs_sender = SRS(b"a test secret", "mail.example.test").forward("carol@example.org")
    with DNSZone(zone) as dns, \
            Sink(host="127.0.0.101", port=mx_port, replies={"nobody@example.net": "550 5.1.1 no such user"}), \
            Sink(host="127.0.0.102", port=mx_port) as org:
        enqueue(data_dir, raw_message(), "nobody@example.net", sender=srs_sender, origin="forward")
        outbound(dns, srs={"secret": "a test secret", "domain": "mail.example.test"})
        (report,) = org.wait_for(1)
        assert report.sender == "<>" and report.recipients == ["carol@example.org"]
        assert b"To: <carol@example.org>" in report.data and b"Action: failed" in report.data


def test_the_relay_is_logged_in_to(tmp_path):
    password_file = tmp_path / "relay-password"
    password_file.write_text("s3cret\n")
    with Sink(auth=("relayuser", "s3cret")) as relay:
        config = _config(relay=f"127.0.0.1:{relay.port}", relay_user="relayuser",
                         relay_password_file=str(password_file))
        route = _route(config, "anywhere.example")
        outcome = _deliver(config, route, _message("a@anywhere.example"))
        assert outcome.results[0].state == "delivered"
        assert relay.wait_for(1)[0].login == "relayuser"
        password_file.write_text("wrong\n")
        outcome = _deliver(_config(relay=f"127.0.0.1:{relay.port}", relay_user="relayuser",
                                   relay_password_file=str(password_file)), route, _message("a@anywhere.example"))
        # A relay that refuses us: our mistake, mail waits, with the relay's answer as why.
        assert outcome.results[0].state == "deferred" and " 535 " in outcome.results[0].reply, outcome.results[0]


# -- retries and expiry (the runner's arithmetic, with a clock of the test's) -------------


def _queued(created: float, attempts: int) -> tuple[QueuedMessage, RecipientState]:
    recipient = RecipientState("b@example.net", None, (), "deferred", attempts, created, None, None, created)
    return QueuedMessage("Q1", created, QueueEnvelope(SENDER, (QueuedRecipient("b@example.net"),)), 10, False,
                         False, (recipient,)), recipient


def test_retry_waits_follow_the_schedule_with_jitter_and_stop_at_max_lifetime():
    config = conf.loads('[server]\nhostname = "mail.example.test"\n'
                        '[queue]\nretry_schedule = ["1m", "10m"]\nmax_lifetime = "1h"\n')
    runner = Runner(config, None, None, rng=random.Random(7))
    created = 1_000_000.0
    waits = []
    for attempts in (0, 1, 2, 5):
        message, recipient = _queued(created, attempts)
        result = runner._result(message, recipient, "deferred", "451 4.3.0 later", "mx", created + 10)
        assert result.state == "deferred"
        waits.append(result.next_attempt - (created + 10))
    assert 60 <= waits[0] <= 66 and all(600 <= w <= 660 for w in waits[1:]), waits
    assert len(set(waits)) == len(waits)  # jitter: not all at once
    message, recipient = _queued(created, 3)
    near_the_end = runner._result(message, recipient, "deferred", "451 4.3.0 later", "mx", created + 3500)
    assert near_the_end.next_attempt == created + 3600  # the last try is at max_lifetime, not past it
    expired = runner._result(message, recipient, "deferred", "451 4.3.0 later", "mx", created + 3600)
    assert expired.state == "bounced" and expired.reply.startswith("554 5.4.7") and "451 4.3.0 later" in expired.reply


def test_a_queue_that_cannot_be_read_costs_the_runner_a_log_line_not_its_loop(data_dir):
    """The loop's look at the change counter reads the index too: when that fails (here the
    queue closed under it; in life a reader table full, a volume gone), the runner logs and
    waits, as for a failed look at the due mail, rather than end: a process whose runner
    task died still holds the runner lock, and nothing would be sent again."""
    config = conf.loads('[server]\nhostname = "mail.example.test"\n')
    queues = QueueSet(open_data_dir(data_dir, SHARDS))
    runner = Runner(config, queues, None)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.2)
        queues.close()
        await asyncio.sleep(0.3)
        assert not task.done(), task.exception()
        await runner.stop(1.0)
        await asyncio.wait_for(task, 5)
        await runner.close()

    asyncio.run(main())


def _run_on_uvloop(coroutine) -> None:
    """As mtad runs its runner: on uvloop (its add_reader and timers, not asyncio's)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)


def _enqueue_quietly(queues: QueueSet, raw: bytes, recipient: str) -> str:
    """Enqueued without waking the runner, as another process's submission is."""
    with queues.begin(QueueEnvelope(SENDER, (QueuedRecipient(recipient),))) as entry:
        entry.write(raw)
        return entry.commit()


class _CountedQueues(QueueSet):
    """A node's queues that count the runner's looks at their change counter, and at the
    due mail."""

    looks = dues = 0

    def changed(self) -> int:
        self.looks += 1
        return super().changed()

    def due(self, *args, **kwargs):
        self.dues += 1
        return super().due(*args, **kwargs)


def test_an_idle_runner_looks_at_the_queue_twice_a_second_and_wakes_for_mail(data_dir):
    """A runner starts quiet: it looks at the change counter every IDLE_POLL (an idle mtad
    took 1.9% of a core looking 50 times a second). Mail enqueued without a ring (as where
    the doorbell cannot be bound) is seen within IDLE_POLL; while mail moves the looks are
    POLL (20 ms) apart, and IDLE_POLL again once the counter has been still for IDLE_AFTER."""
    from mtad.outbound.runner import IDLE_AFTER, IDLE_POLL

    config = conf.loads('[server]\nhostname = "mail.example.test"\n[queue]\nretry_schedule = ["1h"]\n')
    queues = _CountedQueues(open_data_dir(data_dir, SHARDS))
    skew = [0.0]
    runner = Runner(config, queues, None, clock=lambda: time.time() + skew[0])

    async def looks_in(seconds: float) -> int:
        before = queues.looks
        await asyncio.sleep(seconds)
        return queues.looks - before

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.sleep(0.3)  # its first look
            at_start = await looks_in(1.0)
            qid = await asyncio.to_thread(_enqueue_quietly, queues, raw_message("after a while"), "nobody@[127.0.0.1]")
            seen = time.monotonic()
            while (message := queues.get(qid)) and message.recipients[0].attempts == 0:
                assert time.monotonic() - seen < IDLE_POLL + 2, "the runner did not see the new mail"
                await asyncio.sleep(0.02)
            busy = await looks_in(0.5)
            skew[0] = IDLE_AFTER + 1  # still that long
            await asyncio.sleep(IDLE_POLL)
            idle = await looks_in(1.0)
            assert at_start <= 3 and busy >= 10 and idle <= 3, (at_start, busy, idle)
            assert not task.done(), task.exception()
        finally:
            await runner.stop(1.0)
            await asyncio.wait_for(task, 5)
            await runner.close()

    _run_on_uvloop(main())


def test_a_slow_delivery_under_way_is_not_looked_for_at_every_poll(data_dir):
    """A delivery under way is due until its results are recorded. While a slow remote
    took its time the loop asked the queue for due mail at every poll (30 times a second,
    each look decoding the due messages); now at most every IDLE_POLL, its end waking the
    loop."""
    from mtad.outbound.runner import IDLE_AFTER, IDLE_POLL

    with Sink(data_delay=4.0) as sink:
        config = conf.loads('[server]\nhostname = "mail.example.test"\n[queue]\nretry_schedule = ["1h"]\n'
                            f'[outbound]\nrelay = "127.0.0.1:{sink.port}"\n')
        queues = _CountedQueues(open_data_dir(data_dir, SHARDS))
        skew = [0.0]
        runner = Runner(config, queues, None, clock=lambda: time.time() + skew[0])

        async def main() -> None:
            task = asyncio.create_task(runner.run())
            try:
                await asyncio.to_thread(_enqueue_quietly, queues, raw_message("slow"), "bob@example.net")
                deadline = time.monotonic() + 10
                while not sink.busy:
                    assert time.monotonic() < deadline, "the delivery did not start"
                    await asyncio.sleep(0.02)
                skew[0] = IDLE_AFTER + 1
                before = queues.dues
                await asyncio.sleep(1.5)
                assert sink.busy, "the delivery ended early: the test proves nothing"
                assert queues.dues - before <= 1.5 / IDLE_POLL + 2, queues.dues - before
                await asyncio.to_thread(sink.wait_for, 1, 10)
            finally:
                await runner.stop(1.0)
                await asyncio.wait_for(task, 5)
                await runner.close()

        _run_on_uvloop(main())
        queues.close()


ENQUEUER = """
import sys
sys.path.insert(0, sys.argv[1])
from storage import QueueEnvelope, QueuedRecipient, QueueSet, open_data_dir
queues = QueueSet(open_data_dir(sys.argv[2], int(sys.argv[3])))
with queues.begin(QueueEnvelope("sender@example.test", (QueuedRecipient("nobody@[127.0.0.1]"),))) as entry:
    entry.write(b"Subject: rung\\r\\n\\r\\nbody\\r\\n")
    print(entry.commit())
queues.close()
"""


def test_mail_enqueued_by_another_process_rings_an_idle_runner(data_dir, monkeypatch):
    """The runner binds its doorbell beside its lock (storage/doorbell.py); a process that
    enqueues rings it after the commit: an idle runner looks at once, not at its next poll
    (here made 30 s long, so only the ring can explain a prompt attempt). Stopped, the
    runner leaves no socket file behind."""
    from mtad.outbound import runner as runner_module
    from storage import Doorbell

    monkeypatch.setattr(runner_module, "IDLE_POLL", 30.0)
    config = conf.loads('[server]\nhostname = "mail.example.test"\n[queue]\nretry_schedule = ["1h"]\n')
    queues = QueueSet(open_data_dir(data_dir, SHARDS))
    lock = queues.runner_lock()
    assert lock.acquire()
    doorbell = Doorbell(lock.path)
    skew = [0.0]
    runner = Runner(config, queues, None, clock=lambda: time.time() + skew[0], doorbell=doorbell)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.sleep(0.3)  # its first look done
            skew[0] = runner_module.IDLE_AFTER + 1  # still that long: its next wait is 30 s
            await asyncio.sleep(0.3)
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", ENQUEUER, str(Path(__file__).resolve().parent.parent), str(data_dir),
                str(SHARDS), stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(child.communicate(), 30)
            qid = out.decode().strip()
            committed = time.monotonic()
            while (message := queues.get(qid)) and message.recipients[0].attempts == 0:
                assert time.monotonic() - committed < 10, "the ring was not heard"
                await asyncio.sleep(0.02)
            assert not task.done(), task.exception()
        finally:
            await runner.stop(1.0)
            await asyncio.wait_for(task, 5)
            await runner.close()

    try:
        _run_on_uvloop(main())
    finally:
        doorbell.close()
        lock.release()
        queues.close()
    assert not doorbell.path.exists()


def test_a_flush_is_acted_on_within_a_second_and_a_hold_keeps_mail_back(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.111"))) as dns, \
            Sink(host="127.0.0.111", port=mx_port,
                 replies={"bob@example.net": ["451 4.3.0 later", "250 2.1.5 OK"],
                          "carol@example.net": ["451 4.3.0 later", "250 2.1.5 OK"]}) as sink:
        first = enqueue(data_dir, raw_message("one"), "bob@example.net")
        second = enqueue(data_dir, raw_message("two"), "carol@example.net")
        outbound(dns, queue={"retry_schedule": ["1h"]})
        wait_until(lambda: all((m := queued(data_dir, q)) and m.recipients[0].attempts == 1 for q in (first, second)),
                   what="both deferred")
        with Queue(open_data_dir(data_dir, SHARDS)) as queue:
            assert queue.hold(second)
            flushed = time.monotonic()
            assert queue.flush() == 1  # the held one stays
        sink.wait_for(1, timeout=5)
        assert time.monotonic() - flushed < 1.5
        assert [m.recipients for m in sink.received] == [["bob@example.net"]]
        time.sleep(1.5)
        assert len(sink.received) == 1
        with Queue(open_data_dir(data_dir, SHARDS)) as queue:
            released = time.monotonic()
            assert queue.release(second)
        sink.wait_for(2, timeout=5)
        assert time.monotonic() - released < 1.5


def test_per_destination_limit_holds(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.121"))) as dns, \
            Sink(host="127.0.0.121", port=mx_port, data_delay=0.5) as sink:
        for i in range(8):
            enqueue(data_dir, raw_message(f"m{i}"), f"user{i}@example.net")
        outbound(dns, queue={"per_destination": 2, "concurrency": 10})
        sink.wait_for(8, timeout=30)
        assert sink.most_busy == 2


def test_one_runner_among_mtad_processes_and_another_takes_over(outbound, data_dir, mx_port):
    with DNSZone(_mx_zone((10, "mx.example.net", "127.0.0.131"))) as dns, \
            Sink(host="127.0.0.131", port=mx_port) as sink:
        daemon = outbound(dns, smtp={"workers": 2})
        started = wait_until(lambda: _runner_pids(daemon), what="a runner")
        time.sleep(LOCK_RETRY * 2)
        assert len(_runner_pids(daemon)) == 1, daemon.stderr()  # the other process only tries the lock
        (holder,) = started
        os.kill(holder, signal.SIGKILL)
        wait_until(lambda: _runner_pids(daemon) - {holder}, timeout=30, what="another runner")
        enqueue(data_dir, raw_message(), "bob@example.net")
        sink.wait_for(1)


def _runner_pids(daemon: Daemon) -> set[int]:
    return {int(line.split(" pid=")[1].split()[0]) for line in daemon.stderr().splitlines()
            if "event=runner_started" in line}
