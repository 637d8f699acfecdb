"""Where mail for a recipient domain goes: the hosts to try, in order.

In order of precedence (DESIGN.md, conf/postroom.toml [outbound]):
1. `[outbound.routes]`: "domain" = "host:port", for that domain alone;
2. `[outbound] relay`: a smarthost for every remote domain (AUTH with relay_user);
3. the domain's MX records (RFC 5321 §5.1), each host on `[outbound] port` (25), looked
   up with dnspython's asyncio resolver on `[dns] nameservers` (and `port`), each query
   bounded by `[dns] timeout`:
   - MX hosts by preference, lowest first; hosts of equal preference in random order, so
     the load spreads over them (RFC 5321 §5.1);
   - no MX record (NOERROR, no data): the domain's own A/AAAA records, as an implicit MX
     of preference 0 (RFC 5321 §5.1);
   - a null MX, one record "0 ." (RFC 7505 §3): the domain takes no mail, a permanent
     failure 556 5.1.10 (RFC 7505 §4.2, RFC 7505 §3 for its enhanced code);
   - NXDOMAIN: 550 5.1.2, bad destination system (RFC 3463); SERVFAIL, a timeout or no
     reachable nameserver: 451 4.4.3, tried again later.
Each host name becomes its addresses (A then AAAA: IPv4 first, the family every mail
server still reaches), at most MAX_ADDRESSES in all, so one attempt is bounded.

A route's or the relay's host is resolved by the system (getaddrinfo: /etc/hosts too),
being the sysadmin's own name; an IP literal is used as is.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from conf.schema import DNSConfig, OutboundConfig
from policy.resolver import dnspython_resolver
from storage import AddressError, normalize_domain

SMTP_PORT = 25
MAX_ADDRESSES = 10  # addresses tried in one attempt, over every MX host


class RouteError(Exception):
    """No host to try for a domain: the reply its recipients get (4xx: try again later)."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.code, self.enhanced, self.text = code, enhanced, text

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True)
class Host:
    """One address to connect to. `name` is what TLS checks the certificate against (and
    what the logs and DSNs call the remote MTA)."""

    name: str
    address: str
    port: int = SMTP_PORT

    def __str__(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.name}[{address}]:{self.port}" if self.name != self.address else f"{address}:{self.port}"


@dataclass(frozen=True)
class Route:
    destination: str  # what [queue] per_destination counts: a domain, or a route's "host:port"
    hosts: tuple[Host, ...]  # in the order to try
    relay: bool = False  # the [outbound] relay: log in with relay_user


def parse_hostport(text: str, default_port: int = SMTP_PORT) -> tuple[str, int]:
    """"host:port", "host", "[2001:db8::1]:25" or "192.0.2.1:2525": (host, port), or ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host, _, port = text.partition(":") if text.count(":") <= 1 else (text, "", "")
    if not host or port is None:
        raise ValueError(f"expected host:port, got {text!r}")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port in {text!r}")
    return host.lower(), int(port) if port else default_port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Router:
    """Routes domains: `destination(domain)` without DNS (to group recipients), `route(domain)`
    with it. `rng` shuffles MX hosts of equal preference (tests pass a seeded one)."""

    def __init__(self, outbound: OutboundConfig, dns_config: DNSConfig, *, rng: random.Random | None = None,
                 resolver: dns.asyncresolver.Resolver | None = None):
        self._routes = {_domain_key(domain): parse_hostport(target) for domain, target in outbound.routes.items()}
        self._relay = parse_hostport(outbound.relay) if outbound.relay else None
        self._rng = rng or random.Random()
        self._mx_port = outbound.port
        self._timeout = float(dns_config.timeout)
        self._resolver = resolver or dnspython_resolver(dns_config)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one Router per runner, for its life)
    def destination(self, domain: str) -> str:
        """The destination mail for `domain` goes to: the domain itself when it goes by MX."""
        key = _domain_key(domain)
        if key in self._routes:
            return "%s:%d" % self._routes[key]
        if self._relay is not None:
            return "relay"
        return key

    async def route(self, domain: str) -> Route:
        """The hosts to try for `domain`; RouteError when there are none."""
        key = _domain_key(domain)
        if key in self._routes:
            host, port = self._routes[key]
            return Route(self.destination(domain), await self._config_hosts(host, port))
        if self._relay is not None:
            host, port = self._relay
            return Route("relay", await self._config_hosts(host, port), relay=True)
        if key.startswith("["):  # an address literal, RFC 5321 §4.1.3
            literal = key[1:-1].removeprefix("ipv6:")
            if not _is_ip(literal):
                raise RouteError(550, "5.1.2", f"bad address literal {domain}")
            return Route(key, (Host(literal, literal, self._mx_port),))
        return Route(key, await self._mx_hosts(key))

    async def _config_hosts(self, host: str, port: int) -> tuple[Host, ...]:
        if _is_ip(host):
            return (Host(host, host, port),)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self._timeout)
        except (OSError, TimeoutError) as e:
            why = getattr(e, "strerror", None) or "timeout"
            raise RouteError(451, "4.4.3", f"cannot resolve {host}: {why}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        return tuple(Host(host, address, port) for address in addresses[:MAX_ADDRESSES])

    async def _mx_hosts(self, domain: str) -> tuple[Host, ...]:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise RouteError(550, "5.1.2", f"{domain}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX, so the domain itself is the host, preference 0.
            return await self._implicit_mx(domain)
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as e:
            raise RouteError(451, "4.4.3", f"{domain}: MX lookup failed ({_dns_error(e)})") from None
        records = [(r.preference, r.exchange) for r in answer]
        if len(records) == 1 and records[0][1] == dns.name.root:
            raise RouteError(556, "5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
        by_preference: dict[int, list[str]] = {}
        for preference, exchange in records:
            if exchange != dns.name.root:  # a null MX among others is ignored (RFC 7505 §3)
                by_preference.setdefault(preference, []).append(exchange.to_text(omit_final_dot=True).lower())
        names: list[str] = []
        for preference in sorted(by_preference):
            group = sorted(set(by_preference[preference]))
            self._rng.shuffle(group)
            names.extend(group)
        found = await asyncio.gather(*(self._addresses(name) for name in names), return_exceptions=True)
        hosts = [Host(name, address, self._mx_port) for name, result in zip(names, found, strict=True)
                 if not isinstance(result, BaseException) for address in result]
        if not hosts:
            temporary = [r for r in found if isinstance(r, RouteError) and not r.permanent]
            why = temporary[0].text if temporary else "no address for any of its MX hosts"
            # Deferred even when every MX host is missing: a broken zone is usually fixed.
            raise RouteError(451, "4.4.4" if not temporary else "4.4.3", f"{domain}: {why}")
        return tuple(hosts[:MAX_ADDRESSES])

    async def _implicit_mx(self, domain: str) -> tuple[Host, ...]:
        try:
            addresses = await self._addresses(domain)
        except RouteError as e:
            if e.permanent:
                raise RouteError(550, "5.1.2", f"{domain}: no MX and no address record") from None
            raise
        return tuple(Host(domain, address, self._mx_port) for address in addresses[:MAX_ADDRESSES])

    async def _addresses(self, name: str) -> list[str]:
        """A then AAAA records of `name`; RouteError 550 when it has none, 451 on failure."""
        results = await asyncio.gather(*(self._resolver.resolve(name, rdtype) for rdtype in ("A", "AAAA")),
                                       return_exceptions=True)
        addresses = [r.address for result in results if not isinstance(result, BaseException) for r in result]
        if addresses:
            return addresses
        failures = [r for r in results if isinstance(r, BaseException)
                    and not isinstance(r, (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer))]
        if failures:
            raise RouteError(451, "4.4.3", f"{name}: address lookup failed ({_dns_error(failures[0])})")
        raise RouteError(550, "5.1.2", f"{name}: no address record")


def _domain_key(domain: str) -> str:
    """The A-label form routes and lookups use; an address literal as written, lowercased."""
    if domain.startswith("["):
        return domain.lower()
    try:
        return normalize_domain(domain.rstrip("."))
    except AddressError:
        return domain.lower()


def _dns_error(error: BaseException) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "timeout"
    if isinstance(error, dns.resolver.NoNameservers):
        return "SERVFAIL or no nameserver answered"
    return type(error).__name__
