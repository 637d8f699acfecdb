"""The one decision (policy/decide.py): evidence and config in, verdict and header fields out.
Pure: no sockets, no DNS."""

from __future__ import annotations

import dataclasses

import authres
import pytest

from conf.schema import ClamAVConfig, PolicyConfig
from policy.decide import ACCEPT, DEFER, JUNK, REJECT, authentication_results, decide, header_fields
from policy.evidence import (
    ARCResult,
    DKIMResult,
    DMARCResult,
    DNSBLHit,
    Evidence,
    MessageFacts,
    SPFResult,
    VirusResult,
)

POLICY = PolicyConfig()
CLAMAV = ClamAVConfig(enabled=True)
FACTS = MessageFacts(from_domains=("example.org",), from_fields=1, has_message_id=True, has_date=True)


def good() -> Evidence:
    return Evidence(client_ip="192.0.2.1", helo="mx.example.org", sender="a@example.org",
                    spf=SPFResult("pass", "mailfrom", "example.org", "a@example.org"),
                    dkim=[DKIMResult("pass", "example.org", "sel", "rsa-sha256", signature="abcdefgh")],
                    arc=ARCResult("none"),
                    dmarc=DMARCResult("pass", "example.org", "reject", "none", True, True),
                    facts=FACTS, virus=VirusResult("clean"))


def test_a_clean_authenticated_message_is_accepted_with_negative_score():
    decision = decide(good(), POLICY, CLAMAV)
    assert decision.action == ACCEPT
    assert dict(decision.signals) == {"spf_pass": -0.5, "dkim_pass": -0.5, "dmarc_pass": -1.0}
    assert decision.score == -2.0


def test_a_virus_is_refused_554_naming_it_before_anything_else():
    evidence = dataclasses.replace(good(), virus=VirusResult("infected", "Eicar-Signature"))
    decision = decide(evidence, POLICY, CLAMAV)
    assert (decision.action, decision.code, decision.enhanced) == (REJECT, 554, "5.7.1")
    assert "Eicar-Signature" in decision.text


@pytest.mark.parametrize("on_failure, action", [("tempfail", DEFER), ("accept", ACCEPT)])
def test_an_unscanned_message_is_deferred_or_accepted_as_configured(on_failure, action):
    evidence = dataclasses.replace(good(), virus=VirusResult("unscanned", reason="clamd timed out"))
    decision = decide(evidence, POLICY, ClamAVConfig(enabled=True, on_failure=on_failure))
    assert decision.action == action
    if action == DEFER:
        assert (decision.code, decision.enhanced) == (451, "4.7.1")
    else:
        fields = header_fields(evidence, decision, "mx.example.test", POLICY).decode()
        assert "X-Virus-Scanned: no, scanner unavailable (mx.example.test)" in fields
        assert "timed out" not in fields


@pytest.mark.parametrize("setting, disposition, action", [
    ("apply", "reject", REJECT), ("apply", "quarantine", JUNK), ("apply", "none", ACCEPT),
    ("quarantine", "reject", JUNK), ("none", "reject", ACCEPT), ("none", "quarantine", ACCEPT)])
def test_dmarc_dispositions_follow_the_setting(setting, disposition, action):
    dmarc = DMARCResult("fail", "example.org", "reject", disposition)
    evidence = dataclasses.replace(good(), dmarc=dmarc, spf=SPFResult("none", "mailfrom", "x.example", "a@x.example"),
                                   dkim=[])
    decision = decide(evidence, dataclasses.replace(POLICY, dmarc=setting), CLAMAV)
    assert decision.action == action
    if action == REJECT:
        assert (decision.code, decision.enhanced) == (550, "5.7.1")
        assert "example.org" in decision.text


def test_the_score_sums_weights_and_crosses_both_thresholds():
    bad = Evidence(spf=SPFResult("fail", "mailfrom", "example.org", "a@example.org"), dkim=[],
                   dmarc=DMARCResult("fail", "example.org", "none", "none"),
                   facts=MessageFacts(from_domains=(), from_fields=0))
    decision = decide(bad, POLICY, CLAMAV)
    # spf_fail 3 + dkim_none 0.5 + dmarc_fail 3 + no_from 2 + no_message_id 0.5 + no_date 0.5
    assert decision.score == 9.5 and decision.action == JUNK and decision.why == "score"
    strict = dataclasses.replace(POLICY, reject_threshold=9.5, junk_threshold=2.0)
    assert decide(bad, strict, CLAMAV).action == REJECT
    lenient = dataclasses.replace(POLICY, weights={"spf_fail": 0.0, "dmarc_fail": 0.0})
    assert decide(bad, lenient, CLAMAV).action == ACCEPT


def test_dnsbl_listings_score_only_when_configured_to():
    evidence = dataclasses.replace(good(), dnsbl=[DNSBLHit("bl.example", ("127.0.0.2",), "listed")] * 2)
    assert "dnsbl" not in dict(decide(evidence, POLICY, CLAMAV).signals)
    scored = decide(evidence, dataclasses.replace(POLICY, dnsbl_action="score"), CLAMAV)
    assert scored.score == -2.0 + 10.0 and scored.action == JUNK


def test_submitted_mail_gets_no_spam_verdict_and_no_authentication_results():
    evidence = Evidence(user="alice@example.test", virus=VirusResult("clean"))
    decision = decide(evidence, dataclasses.replace(POLICY, junk_threshold=-1.0), CLAMAV)
    assert decision.action == ACCEPT
    assert header_fields(evidence, decision, "mx.example.test", POLICY) == \
        b"X-Virus-Scanned: clean (mx.example.test, ClamAV)\r\n"


def test_header_fields_say_every_result_and_parse_back():
    evidence = good()
    decision = decide(evidence, POLICY, CLAMAV)
    raw = header_fields(evidence, decision, "mx.example.test", POLICY).decode()
    assert all(len(line) <= 80 for line in raw.split("\r\n"))
    fields = raw.replace("\r\n\t", " ").split("\r\n")
    result = authres.AuthenticationResultsHeader.parse(fields[0])
    assert result.authserv_id == "mx.example.test"
    assert [r.method for r in result.results] == ["spf", "dkim", "arc", "dmarc"]
    assert "header.d=example.org" in fields[0] and "header.b=abcdefgh" in fields[0]
    assert fields[1] == "X-Spam-Score: -2"
    assert fields[2].startswith("X-Spam-Status: No, score=-2 junk=5 reject=15")
    assert fields[3] == "X-Spam-Report: spf_pass=-0.5, dkim_pass=-0.5, dmarc_pass=-1"


def test_sender_controlled_values_cannot_break_the_field():
    evidence = Evidence(spf=SPFResult("none", "mailfrom", "x.example", '"we;ird\\"@x.example', reason='a"b\r\nX: y'),
                        dkim=[DKIMResult("fail", "bad domain;", "s el", reason="x\r\nInjected: yes")],
                        dmarc=DMARCResult("none", "ok.example"), facts=FACTS)
    field = authentication_results(evidence, "mx.example.test")
    assert "\r\nInjected" not in field and "\r\nX:" not in field
    assert "smtp.mailfrom=@x.example" in field
    parsed = authres.AuthenticationResultsHeader.parse(field.replace("\r\n\t", " "))
    assert [r.method for r in parsed.results] == ["spf", "dkim", "dmarc"]
