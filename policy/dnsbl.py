"""DNS blocklists (RFC 5782): is the client address listed in any of the configured zones?

The address is asked as a name under each zone: an IPv4 address's octets reversed
(127.0.0.2 in zen.example is 2.0.0.127.zen.example, RFC 5782 §2.1), an IPv6 address's 32
nibbles reversed (§2.4); an IPv4-mapped IPv6 address (a dual-stack socket's view of an
IPv4 client) as the IPv4 address. All zones are asked at once.

An A record in 127.0.0.0/8 is a listing (§2.1); its codes say why (Spamhaus: 127.0.0.2 SBL,
.4 XBL ...) and the TXT record of the same name is the list's reason, asked only for a
listed address. Some answers are not listings:
- 127.255.255.0/24 are the list's own error codes (Spamhaus: query refused through a public
  resolver, over quota, malformed query): the zone did not answer.
- An address outside 127.0.0.0/8 is not a DNSBL answer (an expired list's domain that now
  resolves everything): the zone did not answer.
- A timeout or SERVFAIL: the zone did not answer. A DNS failure never rejects mail.
NXDOMAIN (or no A record) is "not listed".

The reason text is the list's to choose and goes into a 554 reply: it is cleaned to one
line of printable ASCII, bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Iterable

from policy.evidence import DNSBLHit
from policy.resolver import NODATA, NXDOMAIN, OK, Resolver

LISTED = ipaddress.ip_network("127.0.0.0/8")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")  # RFC 5782 has none; Spamhaus's
MAX_REASON = 200  # characters of a list's TXT reason kept
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


def query_name(ip: str, zone: str) -> str:
    """The name to ask `zone` about `ip` (RFC 5782 §2.1, §2.4). ValueError if `ip` is not
    an address."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        reversed_ = ".".join(reversed(str(address).split(".")))
    else:
        reversed_ = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{reversed_}.{zone.strip('.')}"


async def check_dnsbl(resolver: Resolver, ip: str, zones: Iterable[str]) -> tuple[list[DNSBLHit], list[str]]:
    """The zones that list `ip` (with their codes and reasons), and those that did not
    answer (timeout, server failure, an error code). Zones in the order given."""
    zones = [zone.strip(".").lower() for zone in zones]
    names = [query_name(ip, zone) for zone in zones]  # ValueError before any lookup
    answers = await asyncio.gather(*(_ask(resolver, name, zone) for name, zone in zip(names, zones)))
    hits = [answer for answer in answers if isinstance(answer, DNSBLHit)]
    unanswered = [zone for zone, answer in zip(zones, answers) if answer is _UNANSWERED]
    return hits, unanswered


_UNANSWERED = object()


async def _ask(resolver: Resolver, name: str, zone: str) -> DNSBLHit | object | None:
    """A hit, None (not listed) or _UNANSWERED."""
    answer = await resolver.query(name, "A")
    if answer.status in (NXDOMAIN, NODATA):
        return None
    if answer.status != OK:
        return _UNANSWERED
    codes = []
    for record in answer.records:
        try:
            address = ipaddress.ip_address(record)
        except ValueError:
            return _UNANSWERED
        if address not in LISTED or address in ERROR_CODES:
            return _UNANSWERED
        codes.append(record)
    txt = await resolver.txt(name)
    reason = " ".join(r.decode("ascii", "replace") for r in txt.records) if txt.status == OK else ""
    return DNSBLHit(zone, tuple(sorted(codes, key=ipaddress.ip_address)), _clean(reason))


def _clean(text: str) -> str:
    """Printable ASCII on one line, bounded: safe in a log line and in a reply."""
    return _NOT_PRINTABLE.sub(" ", text).strip()[:MAX_REASON]
