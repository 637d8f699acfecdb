"""The policy chain: which check runs at which step of an SMTP session, and the evidence they
gather for policy/decide.py. mtad's agents call it; each check is its own module.

    connect   rate of connections per client address (421 4.7.0); DNSBL lookups start
    MAIL      rate of messages (450 4.7.1; per user on submission); SPF of the MAIL FROM
              domain, or of the HELO name for a null sender (550 5.7.23 if configured)
    RCPT      rate of recipients (450 4.7.1); a DNSBL listing (554 5.7.1 with its reason)
    data      MessageScan: the header held and forged Authentication-Results: removed,
              the body hashes DKIM and ARC need computed as the bytes pass
    end       DKIM, ARC, DMARC, the anti-virus scan, greylisting (451 4.7.1), then one
              decision (policy/decide.py) and the header fields that say why

The MX runs all of it (`[policy] enabled`); submission (an authenticated user) runs the
per-user rates and the anti-virus scan only.

Nothing here stalls the event loop: DNS goes through the asyncio Resolver and clamd's
client is a coroutine, so a slow DNS server or clamd holds up only the session waiting for
it. CPU work that is short runs on the loop (pyspf on answers already fetched, for its
first 2 ms; up to two DKIM signatures; a rate bucket): a hop to a thread and back cost the
loop more under load (0.45-0.5 ms). Longer work (pyspf past 2 ms, more signatures, an ARC
chain of several sets) and the greylist table's calls run in the policy's own threads.

Rates and greylisting hold across mtad's SO_REUSEPORT workers: their tables are LMDB files
in the data dir (policy/rates.py, policy/greylist.py), one write transaction per count,
which LMDB serializes across processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from conf.logfmt import EventLogger
from conf.schema import Config
from policy.decide import Decision, decide, header_fields
from policy.evidence import Evidence, VirusResult
from policy.resolver import Resolver
from wire import metrics

# Two pools, so that what may be slow holds up only its own kind (issue 14 item 10; an
# attack with ten slow scans at once delayed every other client's greeting 18 s when all
# shared one pool): the rate and greylist tables (microseconds each, never slow), and the
# checks' longer CPU work (pyspf past its loop budget, DKIM and ARC cryptography past two
# signatures: bounded by their limits). clamd scans hold no thread (policy/antivirus.py).
TABLE_THREADS = 2
CPU_THREADS = 4
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0

_log = EventLogger("policy")


@dataclass(frozen=True)
class Refusal:
    """What a step refuses with: an SMTP reply, and a word for the log."""
    code: int
    enhanced: str
    text: str
    why: str


class PolicyServices:
    """What every session of one mtad process shares: the resolver and its cache, the rate
    and greylist tables, the clamd scanner, the threads."""

    def __init__(self, config: Config, *, rates_path: Path | None, greylist_path: Path | None,
                 clock: Callable[[], float] = time.time):
        from policy.rates import RateLimiter

        self.config = config
        self.policy = config.policy
        self.authserv_id = config.policy.authserv_id or config.server.hostname
        self.resolver = Resolver(config.dns)
        self.rates = RateLimiter(rates_path, clock=clock)
        self.greylist = None
        if config.greylist.enabled:
            from policy.greylist import Greylist

            self.greylist = Greylist(greylist_path, config.greylist, clock=clock)
        self.scanner = None
        if config.clamav.enabled:
            from policy.antivirus import Scanner

            self.scanner = Scanner(config.clamav)
        self._tables = ThreadPoolExecutor(max_workers=TABLE_THREADS, thread_name_prefix="policy-tables")
        self._cpu = ThreadPoolExecutor(max_workers=CPU_THREADS, thread_name_prefix="policy-cpu")
        self._exempt = _networks(config.rates.exempt)
        self._trimming: asyncio.Future | None = None

    def run_blocking(self, function: Callable, *args) -> asyncio.Future:
        """The checks' CPU work (pyspf, DKIM and ARC cryptography), off the event loop."""
        return asyncio.get_running_loop().run_in_executor(self._cpu, function, *args)

    def run_table(self, function: Callable, *args) -> asyncio.Future:
        """A rate or greylist table operation."""
        return asyncio.get_running_loop().run_in_executor(self._tables, function, *args)

    def trim_rates(self) -> None:
        """The rate table past its bound: trimmed in a table thread, once at a time."""
        if self._trimming is not None and not self._trimming.done():
            return
        self._trimming = self.run_table(self.rates.trim)
        self._trimming.add_done_callback(_log_trim_failure)

    def exempt(self, ip: str) -> bool:
        address = _ip_address(ip)
        return address is not None and self.exempt_address(address)

    def exempt_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._exempt)

    def session(self, client_ip: str, *, mx: bool) -> SessionPolicy:
        return SessionPolicy(self, client_ip, mx=mx)

    def reconfigure(self, config: Config) -> None:
        """A reload (postroom/reload.py): sessions from now on decide with `config`'s
        [policy] and [rates]; the resolver, scanner and tables stay (their keys need a
        restart)."""
        self.config = config
        self.policy = config.policy
        self.authserv_id = config.policy.authserv_id or config.server.hostname
        self._exempt = _networks(config.rates.exempt)

    def close(self) -> None:
        for pool in (self._tables, self._cpu):
            pool.shutdown(wait=False, cancel_futures=True)
        self.rates.close()
        if self.greylist is not None:
            self.greylist.close()


class SessionPolicy:
    """The chain for one SMTP session; `mx`: mail from other servers (all checks) rather
    than submission (per-user rates and the anti-virus scan)."""

    def __init__(self, services: PolicyServices, client_ip: str, *, mx: bool):
        self.services = services
        self.config = services.config
        self.ip = client_ip
        self.mx = mx
        self.checks = mx and services.policy.enabled  # SPF, DKIM, DMARC, DNSBL, score
        # Read once: a session's policy is made for every connection, checks on or off.
        address = _ip_address(client_ip)
        self.limited = address is None or not services.exempt_address(address)
        self.client = client_ip if address is None else _client_key(address)  # what the per-address rates count
        self.helo = ""
        self.evidence = Evidence(client_ip=client_ip)
        self.scan = None  # the message's MessageScan, from its first byte
        self._dnsbl: asyncio.Task | None = None

    # -- the steps ------------------------------------------------------------------------

    async def connect(self) -> Refusal | None:
        return _counted("connect", await self._connect())

    async def mail(self, sender: str, user: str | None) -> Refusal | None:
        """A new transaction: the evidence of the last one goes."""
        return _counted("mail", await self._mail(sender, user))

    async def recipient(self, address: str, user: str | None) -> Refusal | None:
        return _counted("rcpt", await self._recipient(address, user))

    async def _connect(self) -> Refusal | None:
        rates = self.config.rates
        if self.mx and self.limited and not await self._take(f"c:{self.client}", MINUTE, rates.connections_per_minute):
            return Refusal(421, "4.7.0", "Too many connections from your address, try again later", "rate")
        if self.checks and self.services.policy.dnsbl_zones:
            self._dnsbl = asyncio.ensure_future(self._lookup_dnsbl())
        return None

    def hello(self, name: str) -> None:
        self.helo = name
        self.evidence.helo = name

    async def _mail(self, sender: str, user: str | None) -> Refusal | None:
        self.evidence = Evidence(client_ip=self.ip, helo=self.helo, sender=sender, user=user,
                                 dnsbl=self.evidence.dnsbl)
        self.scan = None
        rates = self.config.rates
        if user is not None:
            if not await self._take_user(f"um:{user}", rates.user_messages_per_hour, rates.user_messages_per_day):
                return Refusal(450, "4.7.1", "You have sent too many messages, try again later", "rate")
        elif self.mx and self.limited and not await self._take(f"m:{self.client}", MINUTE, rates.messages_per_minute):
            return Refusal(450, "4.7.1", "Too many messages from your address, try again later", "rate")
        if self.checks:
            from policy.spf import check_spf

            spf = await check_spf(self.services.resolver, ip=self.ip, sender=sender, helo=self.helo,
                                  run_blocking=self.services.run_blocking)
            self.evidence.spf = spf
            if spf.result == "fail" and self.services.policy.spf_fail == "reject":
                # RFC 7208 §8.4, RFC 7372 §3.2
                return Refusal(550, "5.7.23", f"SPF of {spf.domain} does not allow mail from {self.ip}", "spf")
        return None

    async def _recipient(self, address: str, user: str | None) -> Refusal | None:
        rates = self.config.rates
        if user is not None:
            if not await self._take_user(f"ur:{user}", rates.user_recipients_per_hour, rates.user_recipients_per_day):
                return Refusal(450, "4.7.1", "You have sent to too many recipients, try again later", "rate")
        elif self.mx and self.limited and not await self._take(f"r:{self.client}", MINUTE, rates.recipients_per_minute):
            return Refusal(450, "4.7.1", "Too many recipients from your address, try again later", "rate")
        if self._dnsbl is not None:
            await self._dnsbl
            hits = self.evidence.dnsbl
            if hits and self.services.policy.dnsbl_action == "reject":
                hit = hits[0]
                reason = _printable(hit.reason) or f"listed at {hit.zone}"
                return Refusal(554, "5.7.1", f"Client address {self.ip} is blocked: {reason}", "dnsbl")
        return None

    # -- the message ----------------------------------------------------------------------

    def message_bytes(self, data: bytes) -> bytes:
        """The sender's bytes as they arrive; what to store of them (the header section is
        held until it ends, forged Authentication-Results: removed)."""
        if not self.checks:
            return data
        if self.scan is None:
            from policy.message_scan import MessageScan

            self.scan = MessageScan(self.services.authserv_id)
        return self.scan.update(data)

    def message_end(self) -> bytes:
        """What is still held at the end of the data."""
        if self.scan is None:
            return b""
        return self.scan.finish()

    def waits(self) -> bool:
        """Whether end_of_data has checks that wait on a peer (DNS, clamd): without them it
        decides at once."""
        return (self.checks and self.scan is not None) or self.services.scanner is not None

    async def end_of_data(self, stored: Callable[[], Iterable[bytes]], recipients: list[str]) -> Decision:
        """Every check that needs the message, then the decision. `stored()` reads back the
        message as stored so far, for the anti-virus scan."""
        services, evidence = self.services, self.evidence
        tasks = []
        if self.checks and self.scan is not None:
            tasks.append(self._authenticate())
        if services.scanner is not None:
            tasks.append(self._scan_for_viruses(stored))
        if tasks:
            await asyncio.gather(*tasks)
        decision = decide(evidence, services.policy, self.config.clamav)
        if not decision.refused and self.checks and services.greylist is not None:
            wait = await self._greylisted(recipients)
            if wait > 0:
                decision = Decision("defer", decision.score, decision.signals, 451, "4.7.1",
                                    f"Greylisted, please try again in {int(wait) + 1} seconds", "greylist")
        metrics.policy_verdict("data", decision.action, decision.why if decision.action != "accept" else "")
        return decision

    def header_fields(self, decision: Decision) -> bytes:
        if not self.checks and self.evidence.virus is None:
            return b""
        return header_fields(self.evidence, decision, self.services.authserv_id, self.services.policy)

    def summary(self, decision: Decision | None = None) -> dict[str, str]:
        """The results for the message's log line."""
        evidence, out = self.evidence, {}
        if evidence.spf is not None:
            out["spf"] = evidence.spf.result
        if self.scan is not None:
            out["dkim"] = ",".join(f"{d.result}:{d.domain}" for d in evidence.dkim) or "none"
        if evidence.dmarc is not None:
            out["dmarc"] = evidence.dmarc.result
        if evidence.arc is not None and evidence.arc.result != "none":
            out["arc"] = evidence.arc.result
        if evidence.virus is not None:
            out["virus"] = evidence.virus.signature or evidence.virus.result
        if decision is not None and (self.checks or decision.signals):
            out["score"] = f"{decision.score:g}"
            out["action"] = decision.action
        return out

    def accepted(self, decision: Decision) -> None:
        """The message was stored: a domain that passed aligned is trusted by greylisting."""
        greylist, dmarc = self.services.greylist, self.evidence.dmarc
        if greylist is not None and dmarc is not None and dmarc.domain and (dmarc.spf_aligned or dmarc.dkim_aligned):
            asyncio.ensure_future(self.services.run_table(greylist.remember_domain, dmarc.domain))

    # -- the checks -----------------------------------------------------------------------

    async def _authenticate(self) -> None:
        from policy.arc import verify_arc
        from policy.dkim_verify import verify_dkim
        from policy.dmarc import check_dmarc

        services, evidence, scan = self.services, self.evidence, self.scan
        evidence.facts = scan.facts()
        evidence.dkim, evidence.arc = await asyncio.gather(
            verify_dkim(scan, services.resolver, services.run_blocking),
            verify_arc(scan, services.resolver, services.run_blocking))
        # pct= sampling (RFC 7489 §6.6.4) drawn from the message itself: a message sent again
        # (our 250 lost) gets the same verdict, so it is not stored once in INBOX and once
        # in Junk, where deduplication (per mailbox) would not see the second copy.
        sample = int.from_bytes(hashlib.sha256(scan.header or b"").digest()[:8], "big") / 2**64
        evidence.dmarc = await check_dmarc(services.resolver, evidence.facts, evidence.spf, evidence.dkim,
                                           random=lambda: sample)

    async def _scan_for_viruses(self, stored: Callable[[], Iterable[bytes]]) -> None:
        scanner = self.services.scanner
        try:
            self.evidence.virus = await scanner.scan(stored())
        except Exception as e:  # noqa: BLE001 - the message could not be read back: not scanned
            _log.error("scan_failed", error=type(e).__name__)
            self.evidence.virus = VirusResult("unscanned", reason=type(e).__name__)

    async def _greylisted(self, recipients: list[str]) -> float:
        greylist, evidence = self.services.greylist, self.evidence
        dmarc = evidence.dmarc
        if dmarc is not None and dmarc.domain and (dmarc.spf_aligned or dmarc.dkim_aligned) and \
                await self.services.run_table(greylist.known_domain, dmarc.domain):
            return 0.0
        delimiter = self.config.accounts.recipient_delimiter
        # One triplet per mailbox, not per "+detail": a sender must not fill the table with
        # alice+1@, alice+2@ ... (an attack made 1,900 triplets a second that way).
        mailboxes = dict.fromkeys(_without_detail(r, delimiter) for r in recipients)
        waits = [await self.services.run_table(greylist.check, self.ip, evidence.sender, recipient)
                 for recipient in mailboxes]
        return max(waits, default=0.0)

    async def _lookup_dnsbl(self) -> None:
        from policy.dnsbl import check_dnsbl

        hits, failed = await check_dnsbl(self.services.resolver, self.ip, self.services.policy.dnsbl_zones)
        self.evidence.dnsbl = list(hits)
        if failed:
            _log.info("dnsbl_unanswered", client=self.ip, zones=",".join(failed))

    async def _take(self, key: str, per: float, limit: int) -> bool:
        if limit <= 0:
            return True
        # On the loop: an unsynced LMDB write, 10 us, where a hop through the table threads
        # cost 450-520 us of the loop's time (three a message from a client not exempt).
        rates = self.services.rates
        allowed = rates.take(key, per, limit)
        if rates.wants_trim:
            self.services.trim_rates()
        return allowed

    async def _take_user(self, key: str, hourly: int, daily: int) -> bool:
        # Both buckets are asked, so that a refused hour does not use up the day.
        hour = await self._take(f"{key}:h", HOUR, hourly)
        return hour and await self._take(f"{key}:d", DAY, daily)


def client_key(ip: str) -> str:
    """The client the per-address rates count: an IPv4 address, or an IPv6 address's /64
    (one site's usual allocation: counted per /128, a client with a /64 has 2^64 fresh
    addresses). An IPv4-mapped IPv6 address is its IPv4 address."""
    address = _ip_address(ip)
    return ip if address is None else _client_key(address)


def _ip_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def _client_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _without_detail(address: str, delimiter: str) -> str:
    local, at, domain = address.rpartition("@")
    if delimiter and at and delimiter in local:
        local = local.split(delimiter, 1)[0]
    return f"{local}{at}{domain}".lower()


def _networks(values: Iterable[str]) -> list:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            continue
    return networks


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in text or "")[:200]


def _counted(stage: str, refusal: Refusal | None) -> Refusal | None:
    """A step's refusal, counted in the metrics by stage (a step that lets the client go
    on is not: it would count every RCPT)."""
    if refusal is not None:
        metrics.policy_verdict(stage, "defer" if refusal.code < 500 else "reject", refusal.why)
    return refusal


def _log_trim_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        _log.error("rates_trim_failed", error=str(future.exception()))
