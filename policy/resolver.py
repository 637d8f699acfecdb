"""The one DNS resolver of the policy checks: asynchronous (dnspython's asyncio resolver on
`[dns] nameservers` and `port`), each query bounded by `[dns] timeout`, with a cache.

Every check that needs DNS (SPF, DKIM keys, DMARC records, DNSBL zones) is given this
object, never a resolver of its own, so a sysadmin's `[dns]` settings hold everywhere and
one cache serves them all. An answer is a DNSAnswer: its records as text (TXT records as
bytes, their strings joined, RFC 7208 §3.3), or why there are none: NXDOMAIN and NODATA are
answers (cached, RFC 2308), a SERVFAIL or a timeout is `temperror` (not cached: a check
records a temporary error and never rejects on it).

The cache keeps each answer for its TTL, at most MAX_TTL (a record published wrong is not
kept a day), negative answers for NEGATIVE_TTL; at most `cache_size` entries, the least
recently used going first. Queries for the same name and type at once share one lookup.

Checks that block (pyspf runs in a thread) reach the same resolver through `blocking()`:
the query runs on the event loop, the thread waits for it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from conf.schema import DNSConfig

MAX_TTL = 3600
NEGATIVE_TTL = 60
CACHE_SIZE = 10_000

OK, NXDOMAIN, NODATA, TEMPERROR = "ok", "nxdomain", "nodata", "temperror"


@dataclass(frozen=True)
class DNSAnswer:
    status: str  # OK, NXDOMAIN, NODATA or TEMPERROR
    # A, AAAA: addresses; MX: "pref host."; PTR, CNAME, NS: "host."; TXT: bytes, the
    # strings of one record joined.
    records: tuple = ()

    @property
    def found(self) -> bool:
        return self.status == OK


class Resolver:
    def __init__(self, config: DNSConfig, *, cache_size: int = CACHE_SIZE, clock: Callable[[], float] = time.monotonic):
        resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            resolver.nameservers = list(config.nameservers)
        resolver.port = config.port
        resolver.lifetime = float(config.timeout)
        resolver.timeout = float(config.timeout)
        self.timeout = float(config.timeout)
        self._resolver = resolver
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[float, DNSAnswer]] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Future] = {}
        self.lookups = 0  # queries sent (not answered from the cache), for tests and logs

    async def query(self, name: str, rdtype: str) -> DNSAnswer:
        """`name`'s records of type `rdtype` ("A", "TXT" ...). Never raises for DNS trouble."""
        key = (name.lower().rstrip("."), rdtype.upper())
        cached = self._cache.get(key)
        if cached is not None:
            expires, answer = cached
            if expires > self._clock():
                self._cache.move_to_end(key)
                return answer
            del self._cache[key]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            answer, ttl = await self._lookup(*key)
            if ttl > 0:
                self._remember(key, answer, ttl)
            future.set_result(answer)
            return answer
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody shares it
            raise
        finally:
            del self._pending[key]

    async def txt(self, name: str) -> DNSAnswer:
        return await self.query(name, "TXT")

    def blocking(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, str], DNSAnswer]:
        """query() for a thread: runs on `loop`, which must not be the calling thread's."""
        def query(name: str, rdtype: str) -> DNSAnswer:
            future = asyncio.run_coroutine_threadsafe(self.query(name, rdtype), loop)
            try:
                return future.result(self.timeout + 1)
            except TimeoutError:
                future.cancel()
                return DNSAnswer(TEMPERROR)
        return query

    async def _lookup(self, name: str, rdtype: str) -> tuple[DNSAnswer, float]:
        try:
            answer = await self._resolver.resolve(dns.name.from_text(name), rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return DNSAnswer(NXDOMAIN), NEGATIVE_TTL
        except (dns.exception.DNSException, OSError, ValueError):
            # Timeout, SERVFAIL from every server, no server reachable, a bad name.
            return DNSAnswer(TEMPERROR), 0
        if answer.rrset is None:
            return DNSAnswer(NODATA), NEGATIVE_TTL
        kind = dns.rdatatype.from_text(rdtype)
        if kind == dns.rdatatype.TXT:
            records = tuple(b"".join(r.strings) for r in answer.rrset)
        else:
            records = tuple(r.to_text() for r in answer.rrset)
        return DNSAnswer(OK, records), min(answer.rrset.ttl, MAX_TTL)

    def _remember(self, key: tuple[str, str], answer: DNSAnswer, ttl: float) -> None:
        self._cache[key] = (self._clock() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
