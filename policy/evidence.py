"""What the policy checks find, as plain values (STYLE.md §4: evidence first, then one
decision). Each check module returns one of these; policy/decide.py turns them, with the
config, into what happens to the message, and the Authentication-Results: header (RFC 8601)
is written from them.

The result words are RFC 8601's (§2.7), so they go into the header as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# RFC 7208 §2.6 / RFC 8601 §2.7.2
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# RFC 8601 §2.7.1 (dkim), §2.7.3 (dmarc: RFC 7489 §11.2), RFC 8617 §4.4 (arc)
DKIM_RESULTS = ("pass", "fail", "neutral", "policy", "temperror", "permerror")
DMARC_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
ARC_RESULTS = ("pass", "fail", "none")


@dataclass(frozen=True)
class SPFResult:
    result: str  # one of SPF_RESULTS
    identity: str  # "mailfrom", or "helo" for a null sender (RFC 7208 §2.3)
    domain: str  # the domain whose record was evaluated
    sender: str  # smtp.mailfrom (the MAIL FROM address, or postmaster@HELO name)
    reason: str = ""  # pyspf's explanation or the problem, for logs and the header comment


@dataclass(frozen=True)
class DKIMResult:
    """One DKIM-Signature: header field's verification (RFC 6376 §6)."""
    result: str  # one of DKIM_RESULTS
    domain: str  # d=
    selector: str  # s=
    algorithm: str = ""  # a=, e.g. "rsa-sha256", "ed25519-sha256"
    identity: str = ""  # i= (header.i)
    signature: str = ""  # the first 8 characters of b= (header.b, RFC 6008)
    reason: str = ""  # why it failed: "body hash mismatch", "no key", ...


@dataclass(frozen=True)
class ARCResult:
    """The ARC chain's validation (RFC 8617 §5.2)."""
    result: str  # one of ARC_RESULTS
    instances: int = 0  # ARC sets in the message
    reason: str = ""


@dataclass(frozen=True)
class DMARCResult:
    """RFC 7489 §6.6 for the message's From: domain."""
    result: str  # one of DMARC_RESULTS
    domain: str = ""  # the RFC5322.From domain (header.from)
    policy: str = ""  # the record's p= (or sp= for a subdomain): "none", "quarantine", "reject"; "" without one
    disposition: str = "none"  # what pct= left of the policy: "none", "quarantine" or "reject"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    # The domain the record was found at (the From domain or its organizational domain).
    record_domain: str = ""
    reason: str = ""


@dataclass(frozen=True)
class DNSBLHit:
    zone: str  # the list, e.g. "zen.spamhaus.org"
    codes: tuple[str, ...]  # the A records it answered (127.0.0.x)
    reason: str = ""  # its TXT record, if any


@dataclass(frozen=True)
class VirusResult:
    # "clean", "infected", "too_big" (over clamd's StreamMaxLength: never scannable), or
    # "unscanned" (clamd down, slow, or in error)
    result: str
    signature: str = ""  # clamd's name for what it found
    reason: str = ""  # why it was not scanned


@dataclass(frozen=True)
class MessageFacts:
    """What the header section says that the checks and the score use."""
    from_domains: tuple[str, ...] = ()  # the domain of each From: address (RFC 5322 §3.6.2)
    from_fields: int = 0  # how many From: fields
    has_message_id: bool = False
    has_date: bool = False


@dataclass
class Evidence:
    """Everything known about one message from one client, gathered as the session goes."""
    client_ip: str = ""
    helo: str = ""
    sender: str = ""
    user: str | None = None  # authenticated (submission)
    spf: SPFResult | None = None
    dkim: list[DKIMResult] = field(default_factory=list)
    arc: ARCResult | None = None
    dmarc: DMARCResult | None = None
    dnsbl: list[DNSBLHit] = field(default_factory=list)
    virus: VirusResult | None = None
    facts: MessageFacts | None = None
