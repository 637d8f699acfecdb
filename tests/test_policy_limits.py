"""Limits on what a hostile client or a hostile sender's DNS can make the policy chain do,
found by attacking the running MX: per-address rates per IPv6 /64, DNS answers cached within a
byte budget, a message over clamd's stream limit refused for good."""

from __future__ import annotations

import asyncio

import pytest

from clamd_peer import Clamd
from conf.schema import ClamAVConfig, DNSConfig, PolicyConfig
from dnszone import DNSZone
from policy import resolver as resolver_module
from policy.antivirus import Scanner
from policy.chain import client_key
from policy.decide import REJECT, decide
from policy.evidence import Evidence
from policy.resolver import Resolver


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("not an address", "not an address"),
])
def test_rates_count_an_ipv6_client_by_its_64(ip, key):
    assert client_key(ip) == key


def test_big_answers_are_used_but_not_cached_and_the_cache_has_a_byte_budget(monkeypatch):
    big = " ".join(f'"{"x" * 250}"' for _ in range(40))  # a 10 KB TXT record
    zone = {f"n{i}.example": {"TXT": ['"v=spf1 -all"']} for i in range(50)}
    zone["big.example"] = {"TXT": [big]}
    monkeypatch.setattr(resolver_module, "CACHE_BYTES", 2000)

    async def run(port: int) -> Resolver:
        resolver = Resolver(DNSConfig(nameservers=("127.0.0.1",), port=port, timeout=2))
        for _ in range(2):
            answer = await resolver.txt("big.example")
            assert answer.found and len(answer.records[0]) == 10_000
        assert resolver.lookups == 2  # not kept
        for i in range(50):
            await resolver.txt(f"n{i}.example")
        assert resolver._cache_bytes <= 2000 and len(resolver._cache) < 50
        before = resolver.lookups
        await resolver.txt("n49.example")  # the newest is kept
        assert resolver.lookups == before
        await resolver.txt("n0.example")  # the oldest went
        assert resolver.lookups == before + 1
        return resolver

    with DNSZone(zone, ttl=300) as dns:
        asyncio.run(run(dns.port))


def test_a_message_over_clamds_stream_limit_is_refused_552_for_good():
    with Clamd(stream_max="1M") as clamd:
        result = asyncio.run(Scanner(ClamAVConfig(enabled=True, address=clamd.address, timeout=10)).scan(
            [b"Subject: big\r\n\r\n"] + [b"a" * 65536] * 32))
    assert result.result == "too_big"
    for on_failure in ("tempfail", "accept"):
        decision = decide(Evidence(virus=result), PolicyConfig(), ClamAVConfig(on_failure=on_failure))
        assert (decision.action, decision.code, decision.enhanced) == (REJECT, 552, "5.3.4")
