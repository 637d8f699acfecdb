"""The one DNS resolver of the policy checks: asynchronous (dnspython's asyncio resolver on
`[dns] nameservers` and `port`), each query bounded by `[dns] timeout`, with a cache.

Every check that needs DNS (SPF, DKIM keys, DMARC records, DNSBL zones) is given this
object, never a resolver of its own, so a sysadmin's `[dns]` settings hold everywhere and
one cache serves them all. An answer is a DNSAnswer: its records as text (TXT records as
bytes, their strings joined, RFC 7208 §3.3), or why there are none: NXDOMAIN and NODATA are
answers, a SERVFAIL or a timeout is `temperror` (not cached: a check records a temporary
error and never rejects on it).

The cache keeps each answer for its TTL, at most MAX_TTL (a record published wrong is not
kept a day); a TTL of 0 is not kept. A negative answer is kept for its SOA's negative TTL,
at most NEGATIVE_TTL, and not at all without an SOA (RFC 2308 §5). At most `cache_size`
entries, the least recently used going first. Queries for the same name and type at once
share one lookup, which runs as a task of its own: one asker cancelled (its session gone)
does not cancel it for the others.

Checks that block (pyspf runs in a thread) reach the same resolver through `blocking()`:
the query runs on the event loop, the thread waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from conf.schema import DNSConfig

MAX_TTL = 3600
NEGATIVE_TTL = 60
CACHE_SIZE = 10_000
# The cache is bounded in bytes too: a sender's zone decides how big its answers are (an
# attack cached 40 KB TXT records under fresh names: +40 KB of memory per MAIL FROM, kept for
# the TTL). An answer over MAX_CACHED_ANSWER is used once and not kept; every record the
# checks need (an SPF or DMARC record, a 4096-bit DKIM key) is far smaller.
CACHE_BYTES = 16 << 20
MAX_CACHED_ANSWER = 4096

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


def dnspython_resolver(config: DNSConfig) -> dns.asyncresolver.Resolver:
    """dnspython's asyncio resolver as `[dns]` says: its servers (or the system's) and port,
    every query bounded by `timeout`. The policy checks and the outbound MX lookups
    (mtad/outbound/routes.py) both use it."""
    resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    if config.nameservers:
        resolver.nameservers = list(config.nameservers)
    resolver.port = config.port
    resolver.lifetime = float(config.timeout)
    resolver.timeout = float(config.timeout)
    return resolver


class Resolver:
    def __init__(self, config: DNSConfig, *, cache_size: int = CACHE_SIZE, clock: Callable[[], float] = time.monotonic):
        self.timeout = float(config.timeout)
        self._resolver = dnspython_resolver(config)
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[float, DNSAnswer]] = OrderedDict()
        self._cache_bytes = 0
        self._pending: dict[tuple[str, str], asyncio.Task] = {}
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
            self._forget(key)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._lookup_and_remember(key))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._forget_pending(key, done))
        # shield: cancelling this asker leaves the lookup running for the others (and the cache).
        return await asyncio.shield(task)

    async def _lookup_and_remember(self, key: tuple[str, str]) -> DNSAnswer:
        self.lookups += 1
        answer, ttl = await self._lookup(*key)
        if ttl > 0:
            self._remember(key, answer, ttl)
        return answer

    def _forget_pending(self, key: tuple[str, str], task: asyncio.Future) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every asker left

    async def txt(self, name: str) -> DNSAnswer:
        return await self.query(name, "TXT")

    def blocking(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, str], DNSAnswer]:
        """query() for a thread: runs on `loop`, which must not be the calling thread's.
        A loop that stops or closes meanwhile (the daemon stopping) is a temperror."""
        def query(name: str, rdtype: str) -> DNSAnswer:
            if _running_loop() is loop:
                # It would wait on itself for the whole timeout, stalling every session.
                raise RuntimeError("Resolver.blocking called on its own event loop's thread")
            coroutine = self.query(name, rdtype)
            try:
                future = asyncio.run_coroutine_threadsafe(coroutine, loop)
            except RuntimeError:  # the loop is closed
                coroutine.close()
                return DNSAnswer(TEMPERROR)
            try:
                return future.result(self.timeout + 1)
            except TimeoutError:  # the loop stopped, or is too busy to answer in time
                future.cancel()
                return DNSAnswer(TEMPERROR)
            except concurrent.futures.CancelledError:  # the loop cancelled it on its way out
                return DNSAnswer(TEMPERROR)
        return query

    async def _lookup(self, name: str, rdtype: str) -> tuple[DNSAnswer, float]:
        if not name:
            return DNSAnswer(TEMPERROR), 0  # not a name a check means to ask (the root)
        try:
            answer = await self._resolver.resolve(dns.name.from_text(name), rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            responses = e.responses()
            response = next(iter(responses.values()), None)
            return DNSAnswer(NXDOMAIN), _negative_ttl(response)
        except (dns.exception.DNSException, OSError, ValueError):
            # Timeout, SERVFAIL from every server, no server reachable, a bad name.
            return DNSAnswer(TEMPERROR), 0
        if answer.rrset is None:
            return DNSAnswer(NODATA), _negative_ttl(answer.response)
        kind = dns.rdatatype.from_text(rdtype)
        if kind == dns.rdatatype.TXT:
            records = tuple(b"".join(r.strings) for r in answer.rrset)
        else:
            records = tuple(r.to_text() for r in answer.rrset)
        return DNSAnswer(OK, records), min(answer.rrset.ttl, MAX_TTL)

    def _remember(self, key: tuple[str, str], answer: DNSAnswer, ttl: float) -> None:
        size = _size(key, answer)
        if size > MAX_CACHED_ANSWER:
            return
        self._forget(key)
        self._cache[key] = (self._clock() + ttl, answer)
        self._cache_bytes += size
        while len(self._cache) > self._cache_size or self._cache_bytes > CACHE_BYTES:
            self._forget(next(iter(self._cache)))

    def _forget(self, key: tuple[str, str]) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._cache_bytes -= _size(key, entry[1])


def _size(key: tuple[str, str], answer: DNSAnswer) -> int:
    return len(key[0]) + sum(len(record) for record in answer.records) + 64 * (1 + len(answer.records))


def _negative_ttl(response: dns.message.Message | None) -> float:
    """How long a negative answer may be kept: the SOA's TTL or its minimum, whichever is
    less (RFC 2308 §3), at most NEGATIVE_TTL; 0 (not kept) without an SOA (§5)."""
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum, NEGATIVE_TTL)
    return 0


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
