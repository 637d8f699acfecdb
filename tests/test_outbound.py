"""Outbound delivery (mtad/outbound): routes against a DNS zone served on loopback
(tests/dnszone.py), one transaction against aiosmtpd receivers (tests/sinks.py), and the
runner in the running daemon, from the queue to the sinks and back to the sender's INBOX.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections import Counter
from pathlib import Path

import pytest

import conf
from dnszone import DNSZone
from mtad.outbound.client import ClientSettings, Message, Recipient, deliver
from mtad.outbound.dotstuff import DotStuffer
from mtad.outbound.routes import Host, Route, RouteError, Router
from sinks import Sink, certificate_for

LOOPBACK = "127.0.0.1"


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
    zone = {"example.net": {"MX": ["10 a.example.net.", "10 b.example.net.", "10 c.example.net.", "5 first.example.net."]},
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
        outcome = _deliver(_config(), _sink_route(sink), _message(recipient, ret="HDRS", envid="ID+2B1"))
        assert outcome.dsn and outcome.results[0].state == "delivered"
        got = sink.wait_for(1)[0]
    assert sorted(got.dsn_mail) == ["ENVID=ID+2B1", "RET=HDRS"]
    assert got.dsn_rcpt["a@example.net"] == ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;a+2Bx@example.net"]
    with Sink(dsn=False) as sink:  # parameters it does not offer are not sent (it would say 555)
        outcome = _deliver(_config(), _sink_route(sink), _message(recipient, ret="HDRS", envid="X"))
        assert not outcome.dsn and outcome.results[0].state == "delivered"


def test_a_refused_data_bounces_or_defers_every_accepted_recipient():
    with Sink(data_reply="554 5.6.0 content refused") as sink:
        outcome = _deliver(_config(), _sink_route(sink), _message("a@example.net", "b@example.net"))
    assert [r.reply for r in outcome.results] == ["554 5.6.0 content refused"] * 2
