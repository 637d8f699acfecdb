"""The policy checks that ask DNS, against a zone served on loopback (tests/dnszone.py):
the shared Resolver (policy/resolver.py), SPF (policy/spf.py) and DNS blocklists
(policy/dnsbl.py). Client addresses are 127.0.0.0/8 ones, as the MX sees them in tests.

Every resolver has a short [dns] timeout (TIMEOUT), so a silent server costs that long.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conf.schema import DNSConfig
from conf.values import Duration
from dnszone import DNSZone
from policy.dnsbl import check_dnsbl
from policy.evidence import DNSBLHit
from policy.resolver import NODATA, NXDOMAIN, OK, TEMPERROR, DNSAnswer, Resolver
from policy.spf import check_spf
from waiting import ticking

TIMEOUT = 0.5


def _resolver(zone: DNSZone, *, timeout: float = TIMEOUT, **kwargs) -> Resolver:
    return Resolver(DNSConfig(nameservers=("127.0.0.1",), port=zone.port, timeout=Duration(timeout)), **kwargs)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the resolver ------------------------------------------------------------------------


def test_answers_by_type_and_status():
    zone = {"example.net": {"A": ["127.0.0.5"], "MX": ["10 mx.example.net."], "AAAA": ["::1"],
                            "TXT": ['"v=spf1 " "-all"', '"other"']}}
    with DNSZone(zone, servfail={"broken.example"}) as dns:
        async def main():
            r = _resolver(dns)
            return [await r.query("example.net", "A"), await r.query("Example.NET.", "MX"),
                    await r.query("example.net", "AAAA"), await r.txt("example.net"),
                    await r.query("example.net", "PTR"), await r.query("nothing.example.net", "A"),
                    await r.query("broken.example", "A")]
        a, mx, aaaa, txt, ptr, nx, servfail = asyncio.run(main())
    assert a == DNSAnswer(OK, ("127.0.0.5",))
    assert mx == DNSAnswer(OK, ("10 mx.example.net.",))
    assert aaaa == DNSAnswer(OK, ("::1",))
    # A TXT record of several strings is one record, its strings joined (RFC 7208 §3.3).
    assert sorted(txt.records) == [b"other", b"v=spf1 -all"]
    assert ptr.status == NODATA and nx.status == NXDOMAIN and servfail.status == TEMPERROR


def test_silent_server_is_temperror_within_the_timeout():
    with DNSZone({}, silent={"example.net"}) as dns:
        async def main():
            r = _resolver(dns)
            started = time.monotonic()
            answer = await r.query("example.net", "TXT")
            return answer, time.monotonic() - started
        answer, took = asyncio.run(main())
    assert answer.status == TEMPERROR
    assert TIMEOUT * 0.9 < took < TIMEOUT + 0.5


def test_a_slow_answer_within_the_timeout_is_an_answer():
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}, slow={"example.net": TIMEOUT / 2}) as dns:
        answer = asyncio.run(_resolver(dns).query("example.net", "A"))
    assert answer == DNSAnswer(OK, ("127.0.0.5",))


def test_answers_kept_for_their_ttl_and_no_longer():
    clock = FakeClock()
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}, ttl=30) as dns:
        async def main():
            r = _resolver(dns, clock=clock)
            first = await r.query("example.net", "A")
            dns.update({"example.net": {"A": ["127.0.0.6"]}})
            clock.now += 29
            kept = await r.query("EXAMPLE.net.", "A")
            clock.now += 2
            fresh = await r.query("example.net", "A")
            return first, kept, fresh, r.lookups
        first, kept, fresh, lookups = asyncio.run(main())
        assert dns.queries == [("example.net", "A")] * 2
    assert first.records == kept.records == ("127.0.0.5",)
    assert fresh.records == ("127.0.0.6",)
    assert lookups == 2


def test_ttl_zero_is_not_kept():
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}) as dns:
        async def main():
            r = _resolver(dns)
            first = await r.query("example.net", "A")
            dns.update({"example.net": {"A": ["127.0.0.6"]}})
            return first, await r.query("example.net", "A")
        first, second = asyncio.run(main())
        assert len(dns.queries) == 2
    assert first.records == ("127.0.0.5",) and second.records == ("127.0.0.6",)


def test_negative_answers_kept_for_the_soa_minimum_only():
    # RFC 2308 §5: the SOA in a negative answer says how long to keep it; without one, a
    # resolver should not keep it (a zone published a minute later is seen at once).
    clock = FakeClock()

    async def ask_twice(dns: DNSZone, rdtype: str) -> list[DNSAnswer]:
        r = _resolver(dns, clock=clock)
        first = await r.query("new.example.net", rdtype)
        dns.update({"new.example.net": {"A": ["127.0.0.7"]}})
        return [first, await r.query("new.example.net", rdtype)]

    with DNSZone({}) as dns:  # no SOA: not kept
        first, second = asyncio.run(ask_twice(dns, "A"))
    assert first.status == NXDOMAIN and second.records == ("127.0.0.7",)
    with DNSZone({}, ttl=20) as dns:  # SOA minimum 20: kept 20 s
        first, second = asyncio.run(ask_twice(dns, "A"))
        clock.now += 21
        third = asyncio.run(_resolver(dns, clock=clock).query("new.example.net", "A"))
    assert first.status == second.status == NXDOMAIN and third.status == OK
    with DNSZone({"new.example.net": {"TXT": ['"x"']}}, ttl=20) as dns:  # NODATA likewise
        first, second = asyncio.run(ask_twice(dns, "A"))
    assert first.status == second.status == NODATA


def test_temperror_is_not_kept():
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}, servfail={"example.net"}, ttl=60) as dns:
        async def main():
            r = _resolver(dns)
            first = await r.query("example.net", "A")
            dns.servfail = set()
            return first, await r.query("example.net", "A")
        first, second = asyncio.run(main())
    assert first.status == TEMPERROR and second.records == ("127.0.0.5",)


def test_concurrent_queries_for_one_name_share_one_lookup():
    with DNSZone({"example.net": {"TXT": ['"v=spf1 -all"']}, "other.net": {"A": ["127.0.0.9"]}},
                 slow={"example.net": 0.2}) as dns:
        async def main():
            r = _resolver(dns)
            answers = await asyncio.gather(*(r.query("example.net", "TXT") for _ in range(20)),
                                           r.query("other.net", "A"), r.query("example.net", "A"))
            return answers, r.lookups
        answers, lookups = asyncio.run(main())
        assert sorted(dns.queries) == [("example.net", "A"), ("example.net", "TXT"), ("other.net", "A")]
    assert all(a.records == (b"v=spf1 -all",) for a in answers[:20])
    assert answers[20].records == ("127.0.0.9",) and answers[21].status == NODATA
    assert lookups == 3


def test_a_cancelled_query_does_not_cancel_those_sharing_its_lookup():
    # The first asker's session ends (its task is cancelled) while a second session waits on
    # the same lookup: the second still gets its answer.
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}, slow={"example.net": 0.2}) as dns:
        async def main():
            r = _resolver(dns)
            first = asyncio.create_task(r.query("example.net", "A"))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(r.query("example.net", "A"))
            await asyncio.sleep(0.05)
            first.cancel()
            answer = await asyncio.wait_for(second, 2)
            return first.cancelled(), answer
        first_cancelled, answer = asyncio.run(main())
    assert first_cancelled
    assert answer == DNSAnswer(OK, ("127.0.0.5",))


def test_cache_keeps_at_most_cache_size_entries_least_recently_used_first():
    zone = {f"n{i}.example.net": {"A": [f"127.0.0.{i}"]} for i in range(1, 5)}
    with DNSZone(zone, ttl=60) as dns:
        async def main():
            r = _resolver(dns, cache_size=2)
            await r.query("n1.example.net", "A")
            await r.query("n2.example.net", "A")
            await r.query("n1.example.net", "A")  # n1 used last: n2 goes first
            await r.query("n3.example.net", "A")
            await r.query("n1.example.net", "A")
            await r.query("n2.example.net", "A")
            return r.lookups
        lookups = asyncio.run(main())
        assert [q[0] for q in dns.queries] == ["n1.example.net", "n2.example.net", "n3.example.net",
                                               "n2.example.net"]
    assert lookups == 4


def test_blocking_queries_from_a_thread_through_the_loop():
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}, silent={"silent.example"}) as dns:
        async def main():
            r = _resolver(dns)
            ask = r.blocking(asyncio.get_running_loop())
            with ThreadPoolExecutor(2) as pool:
                loop = asyncio.get_running_loop()
                started = time.monotonic()
                found, silent = await asyncio.gather(loop.run_in_executor(pool, ask, "example.net", "A"),
                                                     loop.run_in_executor(pool, ask, "silent.example", "A"))
                return found, silent, time.monotonic() - started
        found, silent, took = asyncio.run(main())
    assert found == DNSAnswer(OK, ("127.0.0.5",))
    assert silent.status == TEMPERROR and took < TIMEOUT + 0.5


# The lookup queued on the stopped loop never runs: Python says so when the loop closes.
@pytest.mark.filterwarnings("ignore:coroutine 'Resolver.query' was never awaited")
def test_blocking_after_the_loop_stopped_or_closed_is_temperror():
    # The daemon stops while pyspf's thread is still evaluating: its next lookups get
    # temperror, within the timeout, instead of an exception or a wait without end.
    import threading
    with DNSZone({"example.net": {"A": ["127.0.0.5"]}}) as dns:
        loop = asyncio.new_event_loop()
        r = _resolver(dns)
        ask = r.blocking(loop)
        thread = threading.Thread(target=loop.run_forever)
        thread.start()
        try:
            assert ask("example.net", "A").records == ("127.0.0.5",)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        started = time.monotonic()
        stopped = ask("example.net", "A")
        took = time.monotonic() - started
        loop.close()
        closed = ask("example.net", "A")
    assert stopped.status == TEMPERROR and took < TIMEOUT + 1.5
    assert closed.status == TEMPERROR


def test_blocking_on_the_loops_own_thread_is_refused_not_a_stall():
    with DNSZone({}) as dns:
        async def main():
            ask = _resolver(dns).blocking(asyncio.get_running_loop())
            with pytest.raises(RuntimeError):
                ask("example.net", "A")
        started = time.monotonic()
        asyncio.run(main())
    assert time.monotonic() - started < 0.5


def test_bad_names_are_temperror_not_exceptions():
    with DNSZone({}) as dns:
        async def main():
            r = _resolver(dns)
            return [await r.query(name, "A") for name in ("a..b.example", "x" * 64 + ".example", "")]
        answers = asyncio.run(main())
        assert dns.queries == []
    assert all(a.status == TEMPERROR for a in answers)


# -- SPF ---------------------------------------------------------------------------------

SPF_ZONE = {
    "pass.example": {"TXT": ['"v=spf1 ip4:127.0.0.0/24 -all"', '"some other text"']},
    "soft.example": {"TXT": ['"v=spf1 ip4:127.0.0.10 ~all"']},
    "neutral.example": {"TXT": ['"v=spf1 ?all"']},
    "norecord.example": {"A": ["127.0.0.1"], "TXT": ['"google-site-verification=abc"']},
    "bad.example": {"TXT": ['"v=spf1 ip4:127.0.0.0/24 moo -all"']},
    "two.example": {"TXT": ['"v=spf1 -all"', '"v=spf1 +all"']},
    "include.example": {"TXT": ['"v=spf1 include:pass.example include:soft.example -all"']},
    "redirect.example": {"TXT": ['"v=spf1 ip4:127.0.3.0/24 redirect=soft.example"']},
    "mx.example": {"TXT": ['"v=spf1 mx a:host.mx.example -all"'], "MX": ["10 mail.mx.example."]},
    "mail.mx.example": {"A": ["127.0.0.20"]},
    "host.mx.example": {"A": ["127.0.0.21"]},
    "ptr.example": {"TXT": ['"v=spf1 ptr -all"']},
    "5.0.0.127.in-addr.arpa": {"PTR": ["host.ptr.example."]},
    "7.0.0.127.in-addr.arpa": {"PTR": ["host.ptr.example."]},  # forward lookup says otherwise
    "host.ptr.example": {"A": ["127.0.0.5"]},
    "exists.example": {"TXT": ['"v=spf1 exists:%{i}._spf.%{d} -all"']},
    "127.0.0.5._spf.exists.example": {"A": ["127.0.0.2"]},
    "six.example": {"TXT": ['"v=spf1 ip6:::1 ip6:2001:db8::/32 -all"']},
    "split.example": {"TXT": ['"v=spf1 ip4:127.0.0.40 " "ip4:127.0.0.41 -all"']},
    "mail.helo.example": {"TXT": ['"v=spf1 ip4:127.0.0.30 -all"']},
    "void.example": {"TXT": ['"v=spf1 a:v1.void.example a:v2.void.example a:v3.void.example -all"']},
    "exp.example": {"TXT": ['"v=spf1 -all exp=why.exp.example"']},
    # \013\010: CR LF in the domain's explanation, which must not reach a reply or header.
    "why.exp.example": {"TXT": ['"%{i} may not send\\013\\010X-Injected: yes"']},
    "slow.example": {"TXT": ['"v=spf1 include:a.s.example include:b.s.example include:c.s.example '
                             'include:d.s.example -all"']},
    **{f"{c}.s.example": {"TXT": ['"v=spf1 ip4:127.9.9.9 -all"']} for c in "abcd"},
    # Eleven includes in a chain: one more DNS-querying term than RFC 7208 §4.6.4 allows.
    **{f"l{i}.limit.example": {"TXT": [f'"v=spf1 include:l{i + 1}.limit.example -all"']} for i in range(11)},
    "l11.limit.example": {"TXT": ['"v=spf1 +all"']},
}


def _spf(zone: DNSZone, *, ip: str, sender: str, helo: str = "client.example", **kwargs):
    return asyncio.run(check_spf(_resolver(zone), ip=ip, sender=sender, helo=helo, **kwargs))


@pytest.fixture(scope="module")
def spf_zone():
    with DNSZone(SPF_ZONE, servfail={"broken.example"}, silent={"silent.example"},
                 slow={"s.example": 0.3, "late.example": 2.0}) as zone:
        yield zone


@pytest.mark.parametrize("ip, sender, result", [
    ("127.0.0.5", "a@pass.example", "pass"),
    ("127.0.1.5", "a@pass.example", "fail"),
    ("127.0.0.10", "a@soft.example", "pass"),
    ("127.0.0.11", "a@soft.example", "softfail"),
    ("127.0.0.11", "a@neutral.example", "neutral"),
    ("127.0.0.5", "a@norecord.example", "none"),  # TXT records, none of them SPF
    ("127.0.0.5", "a@nowhere.example", "none"),  # NXDOMAIN
    ("127.0.0.5", "a@bad.example", "permerror"),  # unknown mechanism
    ("127.0.0.5", "a@two.example", "permerror"),  # two SPF records (RFC 7208 §4.5)
    ("127.0.0.5", "a@broken.example", "temperror"),  # SERVFAIL
    ("127.0.0.6", "a@include.example", "pass"),  # through include:pass.example
    ("127.0.0.10", "a@include.example", "pass"),  # through include:soft.example
    ("127.0.2.1", "a@include.example", "fail"),  # neither include passes: -all
    ("127.0.3.9", "a@redirect.example", "pass"),  # its own ip4: before the redirect
    ("127.0.0.10", "a@redirect.example", "pass"),  # soft.example's record
    ("127.0.0.12", "a@redirect.example", "softfail"),  # soft.example's ~all
    ("127.0.0.20", "a@mx.example", "pass"),  # mx
    ("127.0.0.21", "a@mx.example", "pass"),  # a:host
    ("127.0.0.22", "a@mx.example", "fail"),
    ("127.0.0.5", "a@ptr.example", "pass"),  # PTR, validated by its A record
    ("127.0.0.7", "a@ptr.example", "fail"),  # PTR whose name's A is another address
    ("127.0.0.6", "a@ptr.example", "fail"),  # no PTR
    ("127.0.0.5", "a@exists.example", "pass"),  # exists: with macros
    ("127.0.0.6", "a@exists.example", "fail"),
    ("::1", "a@six.example", "pass"),
    ("2001:db8:1::5", "a@six.example", "pass"),
    ("2001:db9::5", "a@six.example", "fail"),
    ("127.0.0.5", "a@six.example", "fail"),  # ip6: terms never match an IPv4 client
    ("::ffff:127.0.0.5", "a@pass.example", "pass"),  # IPv4-mapped: the IPv4 address
    ("127.0.0.41", "a@split.example", "pass"),  # a record of two strings, joined
    ("127.0.0.42", "a@split.example", "fail"),
    ("127.0.0.5", "a@void.example", "permerror"),  # three void lookups (RFC 7208 §4.6.4)
    ("127.0.0.5", "a@l0.limit.example", "permerror"),  # eleven DNS-querying terms
    ("127.0.0.5", "A@Pass.EXAMPLE", "pass"),
    ("127.0.0.5", '"a@b"@pass.example', "pass"),  # the domain follows the last "@"
])
def test_spf_results(spf_zone, ip, sender, result):
    found = _spf(spf_zone, ip=ip, sender=sender)
    assert found.result == result, found
    assert found.identity == "mailfrom"
    assert found.domain == sender.rpartition("@")[2].lower()
    assert found.sender == sender
    assert found.reason  # pyspf's explanation, or its comment


def test_spf_reasons_say_why(spf_zone):
    assert _spf(spf_zone, ip="127.0.0.5", sender="a@pass.example").reason == \
        "sender SPF authorized"
    assert "Unknown mechanism" in _spf(spf_zone, ip="127.0.0.5", sender="a@bad.example").reason
    assert "Void lookup" in _spf(spf_zone, ip="127.0.0.5", sender="a@void.example").reason
    assert "DNS lookups" in _spf(spf_zone, ip="127.0.0.5", sender="a@l0.limit.example").reason
    assert _spf(spf_zone, ip="127.0.0.5", sender="a@norecord.example").reason == \
        "no SPF record for norecord.example"
    assert "broken.example" in _spf(spf_zone, ip="127.0.0.5", sender="a@broken.example").reason


def test_spf_explanation_of_the_domain_is_cleaned(spf_zone):
    found = _spf(spf_zone, ip="127.0.1.1", sender="a@exp.example")
    assert found.result == "fail"
    assert found.reason == "127.0.1.1 may not send X-Injected: yes"


def test_spf_null_sender_checks_the_helo_name(spf_zone):
    found = _spf(spf_zone, ip="127.0.0.30", sender="", helo="Mail.Helo.Example")
    assert (found.result, found.identity, found.domain, found.sender) == \
        ("pass", "helo", "mail.helo.example", "postmaster@Mail.Helo.Example")
    assert _spf(spf_zone, ip="127.0.0.31", sender="", helo="mail.helo.example").result == "fail"


@pytest.mark.parametrize("helo", ["[127.0.0.1]", "localhost", "127.0.0.1", "", "a@mail.helo.example",
                                  "mail.helo.example\r\nX: y"])
def test_spf_null_sender_with_no_helo_domain_is_none_without_dns(spf_zone, helo):
    before = len(spf_zone.queries)
    found = _spf(spf_zone, ip="127.0.0.30", sender="", helo=helo)
    assert (found.result, found.identity, found.domain) == ("none", "helo", "")
    assert found.sender.isprintable() and found.reason.isprintable()
    assert len(spf_zone.queries) == before


@pytest.mark.parametrize("domain", ["silent.example", "late.example"])
def test_spf_silent_or_slow_dns_is_temperror_within_the_timeout(spf_zone, domain):
    started = time.monotonic()
    found = _spf(spf_zone, ip="127.0.0.5", sender=f"a@{domain}")
    took = time.monotonic() - started
    assert found.result == "temperror"
    assert took < TIMEOUT + 0.5


def test_spf_evaluation_is_bounded_in_time(spf_zone):
    # Four includes each answered 0.3 s late, inside [dns] timeout: the whole evaluation
    # stops at its time limit.
    assert _spf(spf_zone, ip="127.0.0.5", sender="a@slow.example").result == "fail"
    started = time.monotonic()
    found = _spf(spf_zone, ip="127.0.0.5", sender="a@slow.example", time_limit=0.5)
    took = time.monotonic() - started
    assert found.result == "temperror" and "too long" in found.reason
    assert took < 1.0


def test_spf_waiting_on_dns_does_not_hold_up_the_loop(spf_zone):
    found, gap = asyncio.run(ticking(check_spf(_resolver(spf_zone), ip="127.0.0.5", sender="a@silent.example",
                                               helo="x.example")))
    assert found.result == "temperror"
    assert gap < TIMEOUT / 2  # the loop ran on while the resolver waited out the timeout


def test_spf_holds_no_thread(spf_zone):
    # mtad's checks share a few small thread pools: SPF, waiting on a silent DNS server or
    # not, must not keep them (the greylist's calls, the DKIM checks) waiting. With the
    # loop's only executor thread held for the whole check, SPF still finishes.
    async def main():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            loop.set_default_executor(pool)
            held = loop.run_in_executor(None, time.sleep, 3 * TIMEOUT)
            started = time.monotonic()
            results = await asyncio.gather(*(check_spf(_resolver(spf_zone), ip="127.0.0.5", sender=sender,
                                                       helo="x.example")
                                             for sender in ("a@pass.example", "a@silent.example")))
            took = time.monotonic() - started
            await held
            return [r.result for r in results], took
    results, took = asyncio.run(main())
    assert results == ["pass", "temperror"]
    assert took < 2 * TIMEOUT  # not after the held thread's sleep


# -- DNSBL -------------------------------------------------------------------------------

V6 = "2001:db8::1:5"
V6_NAME = ".".join(reversed("20010db8000000000000000000010005"))


def test_dnsbl_query_names():
    from policy.dnsbl import query_name
    assert query_name("127.0.0.5", "bl.example") == "5.0.0.127.bl.example"
    assert query_name("::ffff:127.0.0.5", "bl.example.") == "5.0.0.127.bl.example"
    assert query_name(V6, "bl.example") == V6_NAME + ".bl.example"
    assert V6_NAME + ".ip6.arpa" == __import__("ipaddress").ip_address(V6).reverse_pointer


def test_dnsbl_ipv4_and_ipv6_hits_with_their_reasons():
    zone = {"5.0.0.127.bl.example": {"A": ["127.0.0.4", "127.0.0.2"],
                                     "TXT": ['"Listed: see https://bl.example/q?127.0.0.5"']},
            f"{V6_NAME}.bl.example": {"A": ["127.0.0.3"], "TXT": ['"IPv6 spam source\\013\\010X: y"']},
            "5.0.0.127.nolist.example": {"TXT": ['"a TXT without an A is no listing"']}}
    with DNSZone(zone) as dns:
        r = _resolver(dns)
        v4 = asyncio.run(check_dnsbl(r, "127.0.0.5", ["bl.example", "other.example", "nolist.example"]))
        v6 = asyncio.run(check_dnsbl(r, V6, ["BL.example."]))
        clean = asyncio.run(check_dnsbl(r, "127.0.0.6", ["bl.example"]))
    assert v4 == ([DNSBLHit("bl.example", ("127.0.0.2", "127.0.0.4"),
                            "Listed: see https://bl.example/q?127.0.0.5")], [])
    assert v6 == ([DNSBLHit("bl.example", ("127.0.0.3",), "IPv6 spam source X: y")], [])
    assert clean == ([], [])


def test_dnsbl_listing_without_txt_has_no_reason():
    with DNSZone({"5.0.0.127.bl.example": {"A": ["127.0.0.2"]}}) as dns:
        found = asyncio.run(check_dnsbl(_resolver(dns), "127.0.0.5", ["bl.example"]))
    assert found == ([DNSBLHit("bl.example", ("127.0.0.2",), "")], [])


def test_dnsbl_error_codes_and_strange_answers_are_not_hits():
    zone = {"5.0.0.127.refused.example": {"A": ["127.255.255.254"], "TXT": ['"public resolver"']},
            "5.0.0.127.wild.example": {"A": ["192.0.2.80"]}}
    with DNSZone(zone) as dns:
        found = asyncio.run(check_dnsbl(_resolver(dns), "127.0.0.5", ["refused.example", "wild.example"]))
    assert found == ([], ["refused.example", "wild.example"])


def test_dnsbl_timeouts_are_unanswered_zones_asked_at_once():
    zone = {"5.0.0.127.bl.example": {"A": ["127.0.0.2"]},
            **{f"5.0.0.127.late{i}.example": {"A": ["127.0.0.2"]} for i in range(3)}}
    with DNSZone(zone, silent={"silent1.example", "silent2.example"}, servfail={"failing.example"},
                 slow={f"late{i}.example": 0.3 for i in range(3)}) as dns:
        zones = ["silent1.example", "bl.example", "silent2.example", "failing.example",
                 "late0.example", "late1.example", "late2.example"]
        hits, unanswered = asyncio.run(check_dnsbl(_resolver(dns), "127.0.0.5", zones))
        arrivals = list(dns.arrivals)
    assert [h.zone for h in hits] == ["bl.example", "late0.example", "late1.example", "late2.example"]
    assert unanswered == ["silent1.example", "silent2.example", "failing.example"]
    # Every zone at once: each zone's first query reached the server before a silent zone could
    # have timed out. Asked one after another, the zones after silent1 would wait for its
    # timeout, and those after silent2 for two. (Counted at the server, not in wall time: a
    # loaded machine stretches the run, not the order.)
    first = {zone: min(t for t, name, _ in arrivals if name.endswith("." + zone)) for zone in zones}
    assert max(first.values()) - min(first.values()) < TIMEOUT, first


def test_dnsbl_rejects_a_non_address():
    with pytest.raises(ValueError):
        asyncio.run(check_dnsbl(None, "not-an-address", ["bl.example"]))


def test_spf_of_a_costly_record_moves_off_the_loop():
    # pyspf bounds lookups, not addresses, and starts over at each answer: ten mx terms of
    # ten names of many addresses cost it seconds at 100 addresses a name. Past its loop
    # budget (policy/spf.py INLINE_BUDGET) an evaluation runs in the caller's thread; a
    # record of one term never leaves the loop.
    zone = {"cheap.example": {"TXT": ['"v=spf1 ip4:127.0.0.0/24 -all"']},
            "costly.example": {"TXT": ['"v=spf1 ' + " ".join(f"mx:m{i}.costly.example" for i in range(10)) + ' -all"']}}
    for i in range(10):
        zone[f"m{i}.costly.example"] = {"MX": [f"10 h{j}.m{i}.costly.example." for j in range(10)]}
        for j in range(10):
            zone[f"h{j}.m{i}.costly.example"] = {"A": [f"10.{i}.{j}.{k}" for k in range(25)]}

    async def main(sender):
        loop = asyncio.get_running_loop()
        hops = []
        with ThreadPoolExecutor(1) as pool:
            def run_blocking(fn, *args):
                hops.append(fn)
                return loop.run_in_executor(pool, fn, *args)
            found = await check_spf(_resolver(dns), ip="127.0.0.5", sender=sender, helo="x.example",
                                    run_blocking=run_blocking)
        return found.result, len(hops)
    with DNSZone(zone, ttl=300) as dns:
        assert asyncio.run(main("a@cheap.example")) == ("pass", 0)
        result, hops = asyncio.run(main("a@costly.example"))
    assert result == "fail"
    assert hops > 0
