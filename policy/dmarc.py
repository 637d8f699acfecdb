"""DMARC (RFC 7489): does an authenticated identifier (the SPF-checked MAIL FROM or HELO
domain, a DKIM signing domain) align with the From: domain a reader sees, and if not, what
does the From domain's owner ask a receiver to do?

- Policy discovery (§6.6.3): the TXT records at `_dmarc.<From domain>`; records that do not
  start with `v=DMARC1` are discarded; none left: the same at `_dmarc.<organizational
  domain>` (§3.2, found with publicsuffixlist's private suffix, a maintained list); several
  left: no DMARC processing (result none). DNS trouble: temperror.
- Alignment (§3.1): relaxed (the default) when both domains have the same organizational
  domain, strict (`adkim=s`, `aspf=s`) when they are equal. A pass of either aligns.
- Policy (§6.3): `p=`, or `sp=` when the record was found at the organizational domain of a
  subdomain's From; a record without a valid p= (or with a bad sp=) is read as p=none when
  it has a rua= address (§6.6.3 step 6), else it is a permerror (RFC 7489 §11.2's word for
  a syntactically incorrect record).
- pct= (§6.6.4): a failing message outside the sample gets the next less strict policy
  (reject -> quarantine, quarantine -> none). `random` is an argument, for tests.
- Several From: domains (§6.6.1): each is evaluated and the strictest disposition wins
  (then the worse result). No From: field: none ("no From domain"). A From: that gives no
  domain (policy/message_scan.py finds none, or cannot read it) or more than MAX_DOMAINS:
  permerror with the disposition `reject`. §6.6.1 leaves such messages to the receiver, and
  a reader still shows them: evaluating some domains only, or none, would let decoys or junk
  carry a forged address past its domain's p=reject (DMARCbis: "If not all Author Domains
  are processed, then the DMARC evaluation is incomplete"). policy/decide.py refuses them
  as it refuses a DMARC reject, under the same `[policy] dmarc` setting.
- Numbers (pct=) are ASCII digits only: str.isdigit() takes "²" (which int() refuses) and
  int() reads "٣" as 3.
"""

from __future__ import annotations

import asyncio
import functools
import random as _random
import re
from collections.abc import Callable
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from policy.evidence import DKIMResult, DMARCResult, MessageFacts, SPFResult
from policy.resolver import OK, TEMPERROR, Resolver

MAX_DOMAINS = 8  # From domains evaluated (the strictest of them decides); more: refused
POLICIES = ("none", "quarantine", "reject")
_LESS_STRICT = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_RESULT_ORDER = ("pass", "none", "temperror", "permerror", "fail")  # worse to the right
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|$)")  # §6.4: v= first, "DMARC1" exactly
_URI = re.compile(r"\s*[a-z][a-z0-9+.-]*:\S+", re.IGNORECASE)
_PERCENT = re.compile(r"[0-9]{1,3}")  # ASCII digits: str.isdigit() and int() take others


@functools.lru_cache(maxsize=1)
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registered domain (§3.2): one label below the public suffix; the domain itself
    when it is a public suffix or unknown."""
    domain = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not identifier or not from_domain:
        return False
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


@dataclass(frozen=True)
class Record:
    policy: str  # p=
    subdomain_policy: str  # sp= (p= when absent)
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


async def check_dmarc(resolver: Resolver, facts: MessageFacts, spf: SPFResult | None, dkim: list[DKIMResult],
                      *, random: Callable[[], float] = _random.random) -> DMARCResult:
    if not facts.from_domains:
        if facts.from_fields:
            return DMARCResult("permerror", disposition="reject", reason="no domain readable in From:")
        return DMARCResult("none", reason="no From domain")
    if len(facts.from_domains) > MAX_DOMAINS:
        return DMARCResult("permerror", disposition="reject", reason=f"more than {MAX_DOMAINS} From: domains")
    results = await asyncio.gather(*(_evaluate(resolver, domain, spf, dkim, random) for domain in facts.from_domains))
    return max(results, key=lambda r: (POLICIES.index(r.disposition), _RESULT_ORDER.index(r.result)))


async def _evaluate(resolver: Resolver, domain: str, spf: SPFResult | None, dkim: list[DKIMResult],
                    random: Callable[[], float]) -> DMARCResult:
    found = await _discover(resolver, domain)
    if isinstance(found, DMARCResult):
        return found
    record_domain, text = found
    record = parse_record(text)
    if isinstance(record, str):
        return DMARCResult("permerror", domain, record_domain=record_domain, reason=record)
    policy = record.subdomain_policy if record_domain != domain else record.policy
    spf_aligned = bool(spf is not None and spf.result == "pass" and aligned(spf.domain, domain, record.aspf))
    dkim_aligned = any(r.result == "pass" and aligned(r.domain, domain, record.adkim) for r in dkim)
    if spf_aligned or dkim_aligned:
        return DMARCResult("pass", domain, policy, "none", spf_aligned, dkim_aligned, record_domain)
    disposition = policy
    reason = ""
    if policy != "none" and not random() * 100 < record.pct:
        disposition = _LESS_STRICT[policy]
        reason = f"pct={record.pct}: outside the sample, {policy} applied as {disposition}"
    return DMARCResult("fail", domain, policy, disposition, False, False, record_domain, reason)


async def _discover(resolver: Resolver, domain: str) -> tuple[str, str] | DMARCResult:
    """(where the record was found, its text), or the result when there is none (§6.6.3)."""
    organizational = organizational_domain(domain)
    for where in dict.fromkeys((domain, organizational)):
        answer = await resolver.txt(f"_dmarc.{where}")
        if answer.status == TEMPERROR:
            return DMARCResult("temperror", domain, reason=f"DNS: no answer for _dmarc.{where}")
        texts = [record.decode("utf-8", "replace") for record in answer.records] if answer.status == OK else []
        texts = [text for text in texts if _VERSION.match(text)]
        if len(texts) > 1:
            return DMARCResult("none", domain, record_domain=where, reason=f"several DMARC records at _dmarc.{where}")
        if texts:
            return where, texts[0]
    return DMARCResult("none", domain, reason="no DMARC record")


def parse_record(text: str) -> Record | str:
    """The record's tags (§6.3; unknown tags ignored, bad optional values left at their
    defaults), or why it cannot be used."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        name = name.strip().lower()
        if equals and name and name not in tags:
            tags[name] = value.strip()
    policy = tags.get("p", "").lower()
    subdomain = tags.get("sp", policy).lower()
    if policy not in POLICIES or subdomain not in POLICIES:
        if any(_URI.match(uri) for uri in tags.get("rua", "").split(",")):
            policy = subdomain = "none"  # §6.6.3 step 6
        else:
            return "DMARC record without a valid p= or sp="
    pct = tags.get("pct", "100")
    return Record(policy, subdomain,
                  adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
                  aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
                  pct=int(pct) if _PERCENT.fullmatch(pct) and int(pct) <= 100 else 100)
