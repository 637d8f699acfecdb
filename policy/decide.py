"""One decision from the evidence (STYLE.md §4): what happens to a message once every check
has spoken, and the header fields that say why.

`decide(evidence, policy, clamav)` is pure: the same evidence and config give the same
Decision. In order:
1. a virus is refused 554 5.7.1 naming it, and never stored;
2. a message clamd could not scan is deferred 451 4.7.1 (`[clamav] on_failure =
   "tempfail"`) or accepted with a header saying so; one over clamd's stream limit, which
   no retry can change, is refused 552 5.3.4;
3. a DMARC `reject` disposition (RFC 7489 §6.6.4, after pct=) is refused 550 5.7.1, or sent
   to Junk when `[policy] dmarc = "quarantine"`; `quarantine` goes to Junk; `dmarc = "none"`
   only records and scores;
4. the spam score: the sum of the weights (`[policy] weights`, conf/schema.py
   DEFAULT_WEIGHTS) of the signals the evidence shows; at or over `reject_threshold` 550
   5.7.1, at or over `junk_threshold` to Junk.

`header_fields` writes what a user or sysadmin reads to see why: one Authentication-Results:
field (RFC 8601, written with authres) with the spf, dkim (one per signature), arc and dmarc
results, and X-Spam-Score:, X-Spam-Status: and X-Spam-Report: (each signal and its weight).
What a sender put in them cannot break the field: values that are not RFC 8601 tokens are
reduced to what is safe, and the field is folded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import authres
import authres.arc
import authres.dmarc

from conf.schema import ClamAVConfig, PolicyConfig
from policy.evidence import Evidence

ACCEPT, JUNK, REJECT, DEFER = "accept", "junk", "reject", "defer"
MAX_REASON = 80
MAX_LINE = 78  # RFC 5322 §2.1.1: fold header lines before this where possible

# RFC 5322 §3.2.3 dot-atom (and RFC 6532's UTF-8): a local part written as it is.
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~"
                       r"\u0080-\U0010ffff-]+)*$")
_DOMAIN = re.compile(r"^[A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff.-]*[A-Za-z0-9\u0080-\U0010ffff])?$")
_UNSAFE_TEXT = re.compile(r'["\\\x00-\x1f\x7f]')


@dataclass(frozen=True)
class Decision:
    action: str  # ACCEPT, JUNK, REJECT or DEFER
    score: float
    signals: tuple[tuple[str, float], ...]  # (signal, weight) of every signal shown
    code: int = 250  # the reply for REJECT and DEFER
    enhanced: str = ""
    text: str = ""
    why: str = ""  # for the log line: "virus", "dmarc", "score", "clamd"

    @property
    def refused(self) -> bool:
        return self.action in (REJECT, DEFER)


def signals(evidence: Evidence, policy: PolicyConfig) -> list[tuple[str, float]]:
    """Every signal the evidence shows, with its configured weight."""
    shown: list[str] = []
    if evidence.spf is not None and f"spf_{evidence.spf.result}" in _SIGNALS:
        shown.append(f"spf_{evidence.spf.result}")
    if evidence.user is None:  # mail from another server: the checks only it gets
        results = [d.result for d in evidence.dkim]
        if "pass" in results:
            shown.append("dkim_pass")
        elif "fail" in results:
            shown.append("dkim_fail")
        elif not results:
            shown.append("dkim_none")
        if evidence.dmarc is not None and evidence.dmarc.result in ("pass", "fail"):
            shown.append(f"dmarc_{evidence.dmarc.result}")
        if evidence.arc is not None and evidence.arc.result == "fail":
            shown.append("arc_fail")
        if policy.dnsbl_action == "score":
            shown.extend("dnsbl" for _ in evidence.dnsbl)
        facts = evidence.facts
        if facts is not None:
            if facts.from_fields != 1 or len(facts.from_domains) != 1:
                shown.append("no_from")
            if not facts.has_message_id:
                shown.append("no_message_id")
            if not facts.has_date:
                shown.append("no_date")
    if evidence.virus is not None and evidence.virus.result == "unscanned":
        shown.append("not_scanned")
    return [(signal, policy.weight(signal)) for signal in shown]


def decide(evidence: Evidence, policy: PolicyConfig, clamav: ClamAVConfig) -> Decision:
    weighed = tuple(signals(evidence, policy))
    score = round(sum(weight for _, weight in weighed), 2)

    def refuse(code: int, enhanced: str, text: str, why: str, action: str = REJECT) -> Decision:
        return Decision(action, score, weighed, code, enhanced, text, why)

    virus = evidence.virus
    if virus is not None and virus.result == "infected":
        return refuse(554, "5.7.1", f"Virus found: {_text(virus.signature) or 'unknown'}", "virus")
    if virus is not None and virus.result == "too_big":
        # Sent again it would be as big: a permanent refusal, whatever on_failure says.
        return refuse(552, "5.3.4", "Message too big to be scanned for viruses", "clamd")
    if virus is not None and virus.result == "unscanned" and clamav.on_failure == "tempfail":
        return refuse(451, "4.7.1", "Virus scan unavailable, try again later", "clamd", DEFER)
    if evidence.user is not None:  # submitted by one of our users: no spam verdict
        return Decision(ACCEPT, score, weighed)
    dmarc = evidence.dmarc
    disposition = dmarc.disposition if dmarc is not None and policy.dmarc != "none" else "none"
    if disposition == "reject" and policy.dmarc == "apply":
        # No domain: a From: DMARC could not evaluate in full (policy/dmarc.py, RFC 7489 §6.6.1).
        text = f"Rejected by the DMARC policy of {_text(dmarc.domain)}" if dmarc.domain else \
            f"Rejected: {_text(dmarc.reason) or 'no From: domain'}"
        return refuse(550, "5.7.1", text, "dmarc")
    if score >= policy.reject_threshold:
        return refuse(550, "5.7.1", f"Message refused as spam (score {score:g})", "score")
    if disposition in ("reject", "quarantine"):
        return Decision(JUNK, score, weighed, why="dmarc")
    if score >= policy.junk_threshold:
        return Decision(JUNK, score, weighed, why="score")
    return Decision(ACCEPT, score, weighed)


def header_fields(evidence: Evidence, decision: Decision, authserv_id: str, policy: PolicyConfig) -> bytes:
    """The fields put in front of the stored message, CRLF-terminated, as bytes."""
    lines = []
    if evidence.user is None:
        lines.append(authentication_results(evidence, authserv_id))
        report = ", ".join(f"{signal}={weight:g}" for signal, weight in decision.signals) or "none"
        status = "Yes" if decision.action == JUNK or decision.score >= policy.junk_threshold else "No"
        lines.append(f"X-Spam-Score: {decision.score:g}")
        lines.append(f"X-Spam-Status: {status}, score={decision.score:g} junk={policy.junk_threshold:g} "
                     f"reject={policy.reject_threshold:g}")
        lines.append(_fold(f"X-Spam-Report: {report}"))
    if evidence.virus is not None and evidence.virus.result == "unscanned":
        # Not the scanner's reason: it names the clamd socket, which is not the recipient's business.
        lines.append(f"X-Virus-Scanned: no, scanner unavailable ({authserv_id})")
    elif evidence.virus is not None:
        lines.append(f"X-Virus-Scanned: clean ({authserv_id}, ClamAV)")
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def authentication_results(evidence: Evidence, authserv_id: str) -> str:
    """One Authentication-Results: field (RFC 8601 §2.2), folded, without its CRLF."""
    results: list = []
    spf = evidence.spf
    if spf is not None:
        identity = {"smtp_helo": _domain(spf.domain)} if spf.identity == "helo" else \
            {"smtp_mailfrom": _pvalue(spf.sender)}
        results.append(authres.SPFAuthenticationResult(result=spf.result, reason=_why(spf.result, spf.reason),
                                                       **identity))
    for dkim in evidence.dkim:
        properties = [authres.AuthenticationResultProperty("header", "b", _token(dkim.signature))] \
            if _token(dkim.signature) else []
        results.append(authres.DKIMAuthenticationResult(
            result=dkim.result, reason=_why(dkim.result, dkim.reason), header_d=_domain(dkim.domain),
            header_s=_token(dkim.selector) or None, header_a=_token(dkim.algorithm) or None,
            header_i=_pvalue(dkim.identity) if dkim.identity else None, properties=properties))
    if evidence.facts is not None and not evidence.dkim:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    if evidence.arc is not None:
        results.append(authres.arc.ARCAuthenticationResult(result=evidence.arc.result,
                                                           reason=_why(evidence.arc.result, evidence.arc.reason)))
    dmarc = evidence.dmarc
    if dmarc is not None:
        results.append(authres.dmarc.DMARCAuthenticationResult(
            result=dmarc.result, reason=_why(dmarc.result, dmarc.reason), header_from=_domain(dmarc.domain),
            policy=dmarc.policy or None))
    header = authres.AuthenticationResultsHeader(authserv_id=_domain(authserv_id), results=results)
    return _fold(str(header))


def _fold(field: str) -> str:
    """Folded at spaces so that lines stay under MAX_LINE where a word allows (RFC 5322
    §2.2.3: a fold is a CRLF before whitespace; unfolding gives the field back as it was)."""
    words = field.split(" ")
    lines, line = [], words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > MAX_LINE:
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


_SIGNALS = frozenset({"spf_fail", "spf_softfail", "spf_neutral", "spf_none", "spf_permerror", "spf_pass"})


def _text(value: str) -> str:
    """A sender-controlled text for a reply line or a comment: no quotes, controls or
    backslashes, bounded."""
    return _UNSAFE_TEXT.sub("?", value or "")[:MAX_REASON]


def _why(result: str, reason: str) -> str | None:
    """A result's reason, where it tells something: why it did not pass."""
    return None if result == "pass" else _text(reason) or None


def _token(value: str) -> str:
    return value if value and re.fullmatch(r"[A-Za-z0-9+/=._-]{1,64}", value) else ""


def _domain(value: str) -> str:
    value = (value or "").rstrip(".")
    return value if len(value) <= 253 and _DOMAIN.match(value) else "invalid"


def _pvalue(address: str) -> str:
    """RFC 8601 §2.2 pvalue for an address: local@domain when the local part is a dot-atom,
    else "@domain" (the local part may be omitted), so a quoted local part's ";" or '"'
    never reaches the field."""
    local, _, domain = (address or "").rpartition("@")
    if not _:
        return _domain(address)
    if local and len(local) <= 64 and _DOT_ATOM.match(local):
        return f"{local}@{_domain(domain)}"
    return f"@{_domain(domain)}"
