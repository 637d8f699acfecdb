"""What a forger can write in From: and Authentication-Results: (issue 14, findings 1, 6 and
13): the From: domains DMARC evaluates are every domain a mail reader may show, whatever junk
surrounds them, and a From: that cannot be evaluated in full is refused; a forged
Authentication-Results: with our authserv-id is removed however it is written; DMARC record
numbers are ASCII digits. MessageScan and check_dmarc are fed bytes (DMARC records served
by a DNSZone on loopback), then the running MX (tests/test_policy_mx.py's daemon) meets the
attacks as a sender sends them."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import time
import uuid

import pytest

from conf.schema import ClamAVConfig, DNSConfig, PolicyConfig
from conf.values import Duration
from dnszone import DNSZone
from policy.decide import ACCEPT, JUNK, REJECT, decide
from policy.dmarc import MAX_DOMAINS, Record, check_dmarc, parse_record
from policy.evidence import DMARCResult, Evidence, MessageFacts, SPFResult
from policy.message_scan import MAX_ENCODED_WORDS, MAX_FROM_DOMAINS, MAX_NESTING, MessageScan, is_ours
from policy.resolver import Resolver
from test_policy_mx import FORBIDDEN, send, start_mx, stop_mx, stored, txt

OURS = "mail.example.test"
BANK = "bank.example"
ZONE = {
    "_dmarc.bank.example": {"TXT": [txt("v=DMARC1; p=reject")]},
    "attacker.example": {"TXT": [txt("v=spf1 ip4:127.0.0.0/8 -all")]},
    "_dmarc.odd.example": {"TXT": ['"v=DMARC1; p=reject; pct=\\194\\178"']},  # UTF-8 of U+00B2
    "_dmarc.arabic.example": {"TXT": [txt("v=DMARC1; p=reject; pct=\u0663")]},
}


@pytest.fixture(scope="module")
def zone():
    with DNSZone(ZONE) as served:
        yield served


def scan_of(header: bytes, pieces: int = 7) -> tuple[MessageScan, bytes]:
    """The message `header` + a body fed `pieces` bytes at a time; (scan, bytes returned)."""
    message = header + b"Subject: x\r\n\r\nbody\r\n"
    scan = MessageScan(OURS)
    out = b"".join(scan.update(message[i:i + pieces]) for i in range(0, len(message), pieces))
    return scan, out + scan.finish()


def domains_of(*from_values: bytes) -> tuple[str, ...]:
    scan, _ = scan_of(b"".join(b"From: " + value + b"\r\n" for value in from_values), pieces=4096)
    facts = scan.facts()
    assert facts.from_fields == len(from_values)
    return facts.from_domains


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- From: every domain a reader may show ---------------------------------------------------

DECOYS = ", ".join(f"a{i}@x{i}.example" for i in range(8))

# What a reader shows as an address of bank.example, with junk that made the stdlib parsers
# (or the 2000-character cut before them) return no address, or a bound skip it.
HIDDEN = {
    "long display name": '"' + "CEO " * 520 + '" <ceo@bank.example>',
    "long trailing comment": "CEO <ceo@bank.example> (" + "x" * 2001 + ")",
    "folded padding": "<ceo@bank.example>" + "\r\n " * 1001,
    "unterminated quote": '"CEO <ceo@bank.example>',
    "ninth address": DECOYS + ", ceo@bank.example",
    "comment in the domain": "ceo@(x)bank.example",
    "nested comments in the domain": "ceo@" + "(" * MAX_NESTING + "x" + ")" * MAX_NESTING + "bank.example",
    "spaces around @ and dots": "ceo @ bank . example",
    "quoted-pair in the domain": "ceo@bank\\.example",
    "encoded-word display name": f"=?utf-8?b?{b64('ceo@bank.example')}?= <x@attacker.example>",
    "encoded-word address": "<=?utf-8?q?ceo=40bank=2Eexample?=>",
    "split encoded-words": "=?utf-8?q?ceo=40bank?= =?utf-8?q?=2Eexample?= <x@attacker.example>",
    "fullwidth at and stop": "ceo\uff20bank\uff0eexample",
    "ideographic full stop": "ceo@bank\u3002example",
    "zero-width space, NUL": "ceo@bank\u200b.exam\x00ple, x@attacker.example",
    "upper case, trailing dot": "CEO@BANK.EXAMPLE.",
    "NBSP after the domain": "ceo@bank.example\u00a0(CEO), x@attacker.example",
}


@pytest.mark.parametrize("value", HIDDEN.values(), ids=HIDDEN.keys())
def test_every_domain_a_reader_may_show_is_found(value):
    assert BANK in domains_of(value.encode())


def test_a_forged_from_field_after_eight_others_is_found():
    assert domains_of(*[b"a@attacker.example"] * 8, b"ceo@bank.example") == ("attacker.example", BANK)


def test_ordinary_from_fields_give_their_domains_only():
    assert domains_of(b'"Doe, Jane" <jane@example.org>') == ("example.org",)
    assert domains_of(b"=?utf-8?q?J=C3=BCrgen?= <j@B\xc3\xbccher.example>") == ("xn--bcher-kva.example",)
    assert domains_of(b"a@one.example, b@two.example", b"c@one.example") == ("one.example", "two.example")


UNREADABLE = {
    "no address": "undisclosed-recipients:;",
    "address literal": "ceo@[192.0.2.1]",
    "nothing after @": "ceo@",
    "no name after @": "ceo@bank..example",
    "too many domains": ", ".join(f"a@x{i}.example" for i in range(MAX_FROM_DOMAINS)) + ", ceo@bank.example",
    "comments too deep": "ceo@" + "(" * (MAX_NESTING + 1) + "x" + ")" * (MAX_NESTING + 1) + "bank.example",
    "too many encoded-words": "=?us-ascii?q?x?= " * (MAX_ENCODED_WORDS + 1) + "<ceo@bank.example>",
}


@pytest.mark.parametrize("value", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_from_without_a_readable_domain_gives_none(value):
    assert domains_of(value.encode()) == ()


# -- DMARC of what the scan found -----------------------------------------------------------

def resolver_for(zone: DNSZone) -> Resolver:
    return Resolver(DNSConfig(nameservers=("127.0.0.1",), port=zone.port, timeout=Duration(2)))


def dmarc_of(zone: DNSZone, facts: MessageFacts) -> DMARCResult:
    spf = SPFResult("pass", "mailfrom", "attacker.example", "a@attacker.example")
    return asyncio.run(check_dmarc(resolver_for(zone), facts, spf, []))


def test_a_hidden_forgery_fails_with_the_forged_domains_reject(zone):
    seventh = ", ".join(f"a{i}@x{i}.example" for i in range(MAX_DOMAINS - 1)) + ", ceo@bank.example"
    for value in (HIDDEN["long trailing comment"], HIDDEN["unterminated quote"], seventh):
        scan, _ = scan_of(b"From: " + value.encode() + b"\r\n")
        result = dmarc_of(zone, scan.facts())
        assert (result.result, result.domain, result.disposition) == ("fail", BANK, "reject"), value[:40]


def test_a_from_dmarc_cannot_evaluate_in_full_is_refused(zone):
    """RFC 7489 §6.6.1 leaves a From: with no domain, or many, to the receiver: evaluating
    none or some of them would let junk or decoys carry a forgery in, so both are refused
    as a DMARC reject is, under the same `[policy] dmarc` setting. No From: at all is none."""
    too_many = MessageFacts(from_domains=tuple(f"x{i}.example" for i in range(MAX_DOMAINS)) + (BANK,), from_fields=1)
    none_readable = MessageFacts(from_domains=(), from_fields=1)
    for facts in (too_many, none_readable):
        result = dmarc_of(zone, facts)
        assert (result.result, result.disposition, result.domain) == ("permerror", "reject", "")
        evidence = Evidence(dmarc=result, facts=facts)
        decision = decide(evidence, PolicyConfig(), ClamAVConfig())
        assert (decision.action, decision.code, decision.enhanced, decision.why) == (REJECT, 550, "5.7.1", "dmarc")
        assert decision.text == f"Rejected: {result.reason}"
        assert decide(evidence, PolicyConfig(dmarc="quarantine"), ClamAVConfig()).action == JUNK
        assert decide(evidence, PolicyConfig(dmarc="none"), ClamAVConfig()).action == ACCEPT
    assert dmarc_of(zone, MessageFacts(from_domains=(), from_fields=0)) == DMARCResult("none", reason="no From domain")


# -- Authentication-Results: ours however written -------------------------------------------

FORGED = {
    "encoded-word q": b"=?us-ascii?q?mail.example.test?=; dkim=pass header.d=bank.example",
    "encoded-word b": f"=?utf-8?b?{b64(OURS)}?=; dkim=pass".encode(),
    "encoded-words split": b"=?us-ascii?q?mail.example?= =?us-ascii?q?.test?=; dkim=pass",
    "NBSP before": "\u00a0mail.example.test; dkim=pass".encode(),
    "NBSP after": "mail.example.test\u00a0; dkim=pass".encode(),
    "ideographic space": "\u3000mail.example.test; dkim=pass".encode(),
    "US (\\x1f) before": b"\x1fmail.example.test; dkim=pass",
    "FS (\\x1c) after": b"mail.example.test\x1c; dkim=pass",
    "GS, RS around": b"\x1dmail.example.test\x1e; dkim=pass",
    "NUL after": b"mail.example.test\x00; dkim=pass",
    "zero-width space inside": "mail.exam\u200bple.test; dkim=pass".encode(),
    "fullwidth stops": "mail\uff0eexample\uff0etest; dkim=pass".encode(),
    "fullwidth letters": "\uff4dail.example.test; dkim=pass".encode(),
    "comment with ; first": b"(a; b) mail.example.test; dkim=pass",
    "quoted-pair in quotes": b'"mail.exam\\ple.test"; dkim=pass',
    "unclosed comment after": b"mail.example.test(x; dkim=pass",
    "comments too deep": b"(" * (MAX_NESTING + 1) + b")" * (MAX_NESTING + 1) + b" mail.example.test; dkim=pass",
}
OTHERS = {
    "another id": b"relay.example; spf=pass",
    "a longer id": b"mail.example.test.evil; spf=pass",
    "encoded other id": b"=?us-ascii?q?relay.example?=; spf=pass",
    "ours after the id": b"relay.example; dkim=pass header.d=mail.example.test",
}


@pytest.mark.parametrize("value", FORGED.values(), ids=FORGED.keys())
def test_forged_results_however_written_are_removed(value):
    assert is_ours(value, OURS) and is_ours(value, "Mail.Example.Test.")
    scan, out = scan_of(b"Authentication-Results: " + value + b"\r\nFrom: a@attacker.example\r\n")
    assert b"Authentication-Results" not in out and scan.removed == 1


@pytest.mark.parametrize("value", OTHERS.values(), ids=OTHERS.keys())
def test_other_servers_results_are_kept(value):
    assert not is_ours(value, OURS)
    field = b"Authentication-Results: " + value + b"\r\n"
    scan, out = scan_of(field)
    assert out.startswith(field) and scan.removed == 0


# -- DMARC record numbers -----------------------------------------------------------------

@pytest.mark.parametrize("pct, read", [("50", 50), ("0", 0), ("100", 100), ("\u00b2", 100), ("\u0663", 100),
                                       ("\uff15\uff10", 100), ("101", 100), ("1000", 100), ("-5", 100), ("", 100)])
def test_pct_is_ascii_digits_or_the_default(pct, read):
    assert parse_record(f"v=DMARC1; p=reject; pct={pct}") == Record("reject", "reject", pct=read)


def test_a_record_with_a_unicode_digit_is_evaluated_not_crashed_on(zone):
    for domain in ("odd.example", "arabic.example"):
        result = dmarc_of(zone, MessageFacts(from_domains=(domain,), from_fields=1))
        assert (result.result, result.disposition, result.reason) == ("fail", "reject", "")


# -- linear in the input ----------------------------------------------------------------------

JUNK_VALUES = {
    "many @": lambda n: b"@a" * (n // 2),
    "nested comments": lambda n: b"(" * MAX_NESTING + b"x" + b")" * MAX_NESTING + b"@" * (n // 2 - MAX_NESTING),
    "escaped parentheses": lambda n: b"(" + b"\\(" * (n // 2),
    "spaces and dots": lambda n: b" . @ " * (n // 5),
    "unclosed parentheses": lambda n: b"(" * n,
    "encoded-word starts": lambda n: b"=?x?q?a" * (n // 7),
    "non-ASCII letters after @": lambda n: ("@" + "\u00e9" * 200 + " ").encode() * (n // 403),
}


@pytest.mark.parametrize("make", JUNK_VALUES.values(), ids=JUNK_VALUES.keys())
def test_from_and_results_are_read_in_linear_time(make):
    """Size N and 8N of the junk each step of the reading likes least: time per byte stays
    the same (a regex that scans a run from each of its positions grows 64 times)."""
    def cost(size: int) -> float:
        value = make(size)
        header = b"From: " + value + b"\r\nAuthentication-Results: " + value + b"\r\n"
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            scan_of(header, pieces=65536)[0].facts()
            best = min(best, time.perf_counter() - started)
        return best
    small, large = cost(100_000), cost(800_000)
    assert large < small * 8 * 2.5, (small, large)


# -- the running MX ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mx(tmp_path_factory, zone):
    daemon = start_mx(tmp_path_factory.mktemp("mx"), zone)
    yield daemon
    stop_mx(daemon)


def forged(from_value: str, subject: str, extra: bytes = b"") -> bytes:
    return (extra + f"From: {from_value}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@bank.example>\r\n"
            f"\r\nPlease wire the money today.\r\n".encode())


@pytest.mark.parametrize("case", ["long display name", "long trailing comment", "unterminated quote", "ninth address",
                                  "encoded-word display name", "fullwidth at and stop"])
def test_the_mx_refuses_a_hidden_forgery_of_a_reject_domain(mx, case):
    """The attacks of findings/dmarc_long_from.py: each was stored in INBOX. Nine domains
    are more than DMARC evaluates: refused as such."""
    subject = f"forged {uuid.uuid4().hex}"
    code, text = send(mx, forged(HIDDEN[case], subject), sender="a@attacker.example", source=FORBIDDEN)
    want = "Rejected: more than 8 From: domains" if case == "ninth address" else \
        "Rejected by the DMARC policy of bank.example"
    assert (code, text) == (550, f"5.7.1 {want}".encode())
    assert not any(subject.encode() in raw for box in ("INBOX", "Junk") for raw in stored(mx, box))


def test_the_mx_refuses_a_from_it_cannot_evaluate(mx):
    for value, reason in (("undisclosed-recipients:;", "no domain readable in From:"),
                          (UNREADABLE["too many domains"], "no domain readable in From:"),
                          (", ".join(f"a@x{i}.example" for i in range(MAX_DOMAINS + 1)), "more than 8 From: domains")):
        code, text = send(mx, forged(value, f"unreadable {uuid.uuid4().hex}"), sender="a@attacker.example",
                          source=FORBIDDEN)
        assert (code, text) == (550, f"5.7.1 Rejected: {reason}".encode())


def test_the_mx_stores_no_forged_results_a_reader_takes_for_ours(mx):
    """Read back as Python's email reads them (policy.default decodes encoded-words): the one
    field with our authserv-id is the one we wrote."""
    for name in ("encoded-word q", "NBSP before", "US (\\x1f) before", "ideographic space", "fullwidth stops"):
        subject = f"forged-ar {uuid.uuid4().hex}"
        field = b"Authentication-Results: " + FORGED[name] + b" header.from=bank.example\r\n"
        code, _ = send(mx, forged("a@attacker.example", subject, extra=field), sender="a@attacker.example",
                       source=FORBIDDEN)
        assert code == 250, name
        [raw] = [raw for raw in stored(mx) if subject.encode() in raw]
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        fields = [str(value) for value in parsed.get_all("Authentication-Results")]
        assert len(fields) == 1 and "bank.example" not in fields[0], (name, fields)
        assert fields[0].startswith(f"{OURS};")

