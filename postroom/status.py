"""`postroom status`: the server at a glance, for a sysadmin and for cron.

    services      serve, mtad, imapd, pop3d: running (pid, uptime) or not
    queue         messages waiting, by state (a cluster: every shard queue on disk)
    store         accounts, messages and bytes, per shard; the size of each index
    certificate   subject and expiry of [tls] cert
    dns           for each local domain, the MX, SPF, DKIM and DMARC records that are
                  missing or wrong, against what `postroom dns-records` says to publish

Which processes run is read from the data dir's lock files (postroom/datadir.py): each
long-running process holds `<name>.lock` with flock and wrote its pid there. Whether a lock
is held is read from /proc/locks rather than by trying to take it: a probe that took the
lock for an instant would make a daemon starting at that instant refuse to start.

Exit status 1 when something needs the sysadmin (no daemon running, a certificate expired
or expiring within CERT_WARN_DAYS, a DNS record missing or wrong, a DNS lookup failing), 0
otherwise: cron mails the output only then. `--no-dns` skips the lookups.

DNS checks, per record (RFC numbers are where each rule comes from):
- MX: this server's hostname ([server] hostname) must be one of the domain's MX hosts.
- SPF (RFC 7208): exactly one `v=spf1` TXT record (§3.2: more is a permerror), naming this
  server (`mx`, `a`, `a:<hostname>`; an `include:` cannot be judged here and is taken on
  trust) and not ending in `+all` (which lets anyone send as the domain).
- DKIM (RFC 6376 §3.6.1): for each key in <data_dir>/dkim, the selector's TXT record must
  carry this key's `p=` (a record with another key makes every signature fail).
- DMARC (RFC 7489 §6.6.3): exactly one `v=DMARC1` record at _dmarc, with a `p=` tag.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import time
from dataclasses import dataclass
from pathlib import Path

from conf import Config
from conf.values import human_size
from policy import dkim
from policy.resolver import NODATA, NXDOMAIN, OK, Resolver
from postroom.dkimadmin import keys_dir
from postroom.datadir import PROCESSES, Running, open_queues, open_store, running_processes
from postroom.services import DAEMONS, daemons_to_start
from storage import DEFERRED, Accounts, DataDir, NotOwnerError

CERT_WARN_DAYS = 14


def status(config: Config, data_dir: DataDir, accounts: Accounts, args: argparse.Namespace, audit) -> int:
    trouble = []
    running = services_section(data_dir, config, trouble)
    queue_section(config, data_dir)
    store_section(config, data_dir, accounts)
    certificate_section(config, trouble)
    if not args.no_dns:
        dns_section(config, data_dir, accounts, trouble)
    if not running:
        trouble.append("no daemon is running")
    print()
    if trouble:
        print(f"{len(trouble)} thing(s) to fix: " + "; ".join(trouble))
        return 1
    print("all well")
    return 0


# -- services -------------------------------------------------------------------------------


def services_section(data_dir: DataDir, config: Config, trouble: list[str]) -> dict[str, Running]:
    running = running_processes(data_dir.path, config)
    expected = daemons_to_start(config)
    print("services")
    now = time.time()
    for name in PROCESSES:
        process = running.get(name)
        if process is not None:
            print(f"  {name:<8} running  pid {process.pid:<8} up {_duration(now - process.started)}")
        elif name == "serve" and any(d in running for d in DAEMONS):
            print(f"  {name:<8} -        (the daemons run on their own: systemd units)")
        elif name == "serve" or name in expected:
            print(f"  {name:<8} stopped")
        else:
            print(f"  {name:<8} off      (nothing to listen on in the config)")
    if running and any(d in running for d in expected):
        missing = [d for d in expected if d not in running]
        if missing:
            trouble.append(f"not running: {', '.join(missing)}")
    return {name: p for name, p in running.items() if name in DAEMONS}


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s"


# -- queue and store ------------------------------------------------------------------------


def queue_section(config: Config, data_dir: DataDir) -> None:
    """The outbound queue's messages by state (in a cluster, every shard queue on disk)."""
    with open_queues(config, data_dir) as queues:
        queues.refresh()
        messages = queues.list()
        queues_seen = queues.queues() if queues.sharded else None
    counts = {"queued": 0, "deferred": 0, "held": 0}
    for message in messages:
        if message.held:
            counts["held"] += 1
        elif any(r.state == DEFERRED for r in message.pending):
            counts["deferred"] += 1
        else:
            counts["queued"] += 1
    detail = ", ".join(f"{n} {state}" for state, n in counts.items())
    where = f" in {len(queues_seen)} shard queue(s)" if queues_seen is not None else ""
    print(f"queue     {len(messages)} message(s): {detail}{where}")


def store_section(config: Config, data_dir: DataDir, accounts: Accounts) -> None:
    per_shard: dict[int, list[int]] = {}
    # In a cluster, pinned (cluster/pins.py): a shard being let go waits for this command;
    # and only the shards this node holds (another's volume is not attached here).
    with open_store(data_dir, accounts, config) as store:
        indexes = {shard.number: _index_size(shard.path) for shard in store.shards()}
        for user in accounts.users():
            address = str(user.address)
            number = store.shard_number(address)
            if number not in indexes:
                continue
            try:
                usage = store.usage(address)
            except NotOwnerError:  # released since store.shards()
                continue
            totals = per_shard.setdefault(number, [0, 0, 0])
            totals[0] += 1
            totals[1] += usage.messages
            totals[2] += usage.used
    users = sum(t[0] for t in per_shard.values())
    count = sum(t[1] for t in per_shard.values())
    size = sum(t[2] for t in per_shard.values())
    held = f" ({len(indexes)} held by this node)" if len(indexes) < data_dir.shards else ""
    print(f"store     {users} account(s), {count} message(s), {human_size(size)} in "
          f"{data_dir.shards} shard(s){held}")
    for number in range(data_dir.shards):
        if number not in indexes:
            print(f"  shard {number:<3} not held by this node (`postroom cluster status` names its owner)")
            continue
        users, count, size = per_shard.get(number, [0, 0, 0])
        print(f"  shard {number:<3} {users} account(s), {count} message(s), {human_size(size)}; "
              f"index {human_size(indexes[number])}")


def _index_size(shard_path: Path) -> int:
    try:
        return (shard_path / "index.lmdb" / "data.mdb").stat().st_blocks * 512
    except FileNotFoundError:
        return 0



# -- certificate ----------------------------------------------------------------------------


def certificate_section(config: Config, trouble: list[str], now: datetime.datetime | None = None) -> None:
    path = config.tls.cert
    if path is None:
        print("certificate  none ([tls] cert not set: no TLS)")
        return
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        print(f"certificate  {path}: unreadable: {getattr(e, 'strerror', None) or e}")
        trouble.append(f"certificate {path} unreadable")
        return
    now = now or datetime.datetime.now(datetime.timezone.utc)
    expires = cert.not_valid_after_utc
    days = (expires - now).total_seconds() / 86400
    subject = cert.subject.rfc4514_string()
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if days < 0:
        state = f"EXPIRED {int(-days)} day(s) ago"
        trouble.append(f"certificate expired on {when}")
    elif days < CERT_WARN_DAYS:
        state = f"expires in {int(days)} day(s): renew it"
        trouble.append(f"certificate expires on {when}")
    else:
        state = f"valid for {int(days)} more day(s)"
    if cert.issuer == cert.subject:
        state += "; self-signed: mail clients and other servers will not trust it"
    print(f"certificate  {path}: {subject}, until {when}, {state}")


# -- DNS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    name: str  # without the final dot
    kind: str  # MX, TXT, SRV
    data: str  # as in the zone file
    line: str  # the zone-file line to publish

    @property
    def text(self) -> str:
        """A TXT record's value, its quoted strings joined."""
        parts = self.data.split('"')[1::2]
        return "".join(parts)


@dataclass(frozen=True)
class Finding:
    record: str  # MX, SPF, DKIM <selector>, DMARC
    state: str  # ok, missing, wrong, unknown
    detail: str
    publish: str | None = None


def expected_records(config: Config, data_dir: DataDir, domain: str) -> list[Expected]:
    """What `postroom dns-records DOMAIN` prints, parsed (its SRV records are optional)."""
    rows = []
    for line in dkim.dns_records(domain, config.server.hostname, keys_dir(data_dir)):
        name, _ttl, _class, kind, data = line.split(None, 4)
        rows.append(Expected(name.rstrip(".").lower(), kind, data, line))
    return rows


async def check_domain(resolver: Resolver, expected: list[Expected], domain: str, hostname: str) -> list[Finding]:
    hostname = hostname.lower().rstrip(".")
    findings = [await _check_mx(resolver, domain, hostname, _one(expected, "MX", domain))]
    txt_at_domain = [e for e in expected if e.kind == "TXT" and e.name == domain]
    findings.append(await _check_spf(resolver, domain, hostname, txt_at_domain[0]))
    for key in (e for e in expected if e.kind == "TXT" and "._domainkey." in e.name):
        findings.append(await _check_dkim(resolver, key))
    findings.append(await _check_dmarc(resolver, domain, _one(expected, "TXT", f"_dmarc.{domain}")))
    return findings


def _one(expected: list[Expected], kind: str, name: str) -> Expected:
    return next(e for e in expected if e.kind == kind and e.name == name)


def _lookup_failed(record: str, answer, name: str) -> Finding | None:
    if answer.status in (OK, NXDOMAIN, NODATA):
        return None
    return Finding(record, "unknown", f"lookup of {name} failed ({answer.status}): check again later")


async def _check_mx(resolver: Resolver, domain: str, hostname: str, expected: Expected) -> Finding:
    answer = await resolver.query(domain, "MX")
    failed = _lookup_failed("MX", answer, domain)
    if failed:
        return failed
    hosts = [r.split()[-1].lower().rstrip(".") for r in answer.records]
    if not hosts:
        return Finding("MX", "missing", "no MX record: other servers cannot find this one", expected.line)
    if hostname in hosts:
        return Finding("MX", "ok", ", ".join(answer.records))
    return Finding("MX", "wrong", f"MX is {', '.join(hosts)}, not this server ({hostname})", expected.line)


async def _txts(resolver: Resolver, name: str, prefix: str):
    answer = await resolver.txt(name)
    texts = [bytes(r).decode("utf-8", "replace") for r in answer.records] if answer.status == OK else []
    return answer, [t for t in texts if t.lower().startswith(prefix)]


async def _check_spf(resolver: Resolver, domain: str, hostname: str, expected: Expected) -> Finding:
    answer, records = await _txts(resolver, domain, "v=spf1")
    failed = _lookup_failed("SPF", answer, domain)
    if failed:
        return failed
    if not records:
        return Finding("SPF", "missing", "no v=spf1 TXT record: receivers cannot tell your mail from forgeries",
                       expected.line)
    if len(records) > 1:
        return Finding("SPF", "wrong", f"{len(records)} v=spf1 records (RFC 7208 §3.2: one at most): merge them",
                       expected.line)
    record = records[0]
    terms = [t.lower() for t in record.split()[1:]]
    if record == expected.text:
        return Finding("SPF", "ok", record)
    if "+all" in terms or "all" in terms:
        return Finding("SPF", "wrong", f"{record!r} lets anyone send as {domain}", expected.line)
    names_us = {"mx", "+mx", "a", "+a", f"a:{hostname}", f"+a:{hostname}", f"mx:{domain}", f"+mx:{domain}"}
    if names_us & set(terms) or any(t.lstrip("+").startswith("include:") for t in terms):
        return Finding("SPF", "ok", record)
    return Finding("SPF", "wrong", f"{record!r} does not name this server (mx, or a:{hostname})", expected.line)


def _tag(text: str, tag: str) -> str | None:
    """The value of `tag` in a tag=value list (DKIM key records, DMARC), spaces removed."""
    for part in text.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == tag:
            return "".join(value.split())
    return None


async def _check_dkim(resolver: Resolver, expected: Expected) -> Finding:
    selector = expected.name.split("._domainkey.")[0]
    record = f"DKIM {selector}"
    answer = await resolver.txt(expected.name)
    failed = _lookup_failed(record, answer, expected.name)
    if failed:
        return failed
    texts = [bytes(r).decode("utf-8", "replace") for r in answer.records] if answer.status == OK else []
    keys = [t for t in texts if _tag(t, "p") is not None]
    if not keys:
        return Finding(record, "missing", f"no key record at {expected.name}: mail signed with it fails DKIM",
                       expected.line)
    if any(_tag(t, "p") == _tag(expected.text, "p") for t in keys):
        return Finding(record, "ok", f"{expected.name} has this server's key")
    return Finding(record, "wrong", f"{expected.name} publishes another key: signatures with this one fail",
                   expected.line)


async def _check_dmarc(resolver: Resolver, domain: str, expected: Expected) -> Finding:
    name = f"_dmarc.{domain}"
    answer, records = await _txts(resolver, name, "v=dmarc1")
    failed = _lookup_failed("DMARC", answer, name)
    if failed:
        return failed
    if not records:
        return Finding("DMARC", "missing", f"no v=DMARC1 record at {name}", expected.line)
    if len(records) > 1:
        return Finding("DMARC", "wrong", f"{len(records)} DMARC records (RFC 7489 §6.6.3: none applies)",
                       expected.line)
    policy = _tag(records[0], "p")
    if not policy:
        return Finding("DMARC", "wrong", f"{records[0]!r} has no p= policy", expected.line)
    return Finding("DMARC", "ok", records[0])


def dns_section(config: Config, data_dir: DataDir, accounts: Accounts, trouble: list[str]) -> None:
    domains = [d.name for d in accounts.domains()]
    print("dns" + ("" if domains else "       no local domains"))

    async def check_all() -> list[list[Finding]]:
        resolver = Resolver(config.dns)
        return list(await asyncio.gather(*(check_domain(resolver, expected_records(config, data_dir, domain), domain,
                                                        config.server.hostname) for domain in domains)))

    for domain, findings in zip(domains, asyncio.run(check_all()) if domains else [], strict=True):
        print(f"  {domain}")
        for finding in findings:
            print(f"    {finding.record:<16} {finding.state:<8} {finding.detail}")
            if finding.publish:
                print(f"    {'':<16} {'':<8} publish: {finding.publish}")
            if finding.state != "ok":
                trouble.append(f"{domain} {finding.record} {finding.state}")
