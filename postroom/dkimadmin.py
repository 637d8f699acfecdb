"""The `dkim keygen` and `dns-records` commands of the admin CLI.

`postroom dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519] [--force]` writes a
signing key under `<data_dir>/dkim/<domain>/` and prints where, then the TXT record to
publish as one zone-file line. `postroom dns-records DOMAIN` prints every record the domain
needs for its mail (MX, SPF, DKIM, DMARC, the RFC 6186 SRV records), as zone-file lines,
with the SRV ports of this config's listeners. Both refuse a domain that is not local: a key
for a domain we do not send for would never sign anything.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from conf import Config
from policy import dkim
from postroom.admin import AuditLog
from storage import Accounts, DataDir, UnknownDomainError, normalize_domain


def keys_dir(data_dir: DataDir) -> Path:
    return data_dir.path / "dkim"


def dkim_keygen(config: Config, data_dir: DataDir, accounts: Accounts, args: argparse.Namespace,
                audit: AuditLog) -> int:
    domain = _local_domain(accounts, args.domain)
    selector = args.selector or dkim.default_selector(args.algorithm, time.time())
    record = dkim.keygen(keys_dir(data_dir), domain, selector, args.algorithm, force=args.force)
    path = keys_dir(data_dir) / domain / f"{selector.lower()}.{args.algorithm}.key"
    audit("dkim.keygen", domain=domain, selector=selector.lower(), algorithm=args.algorithm, replaced=args.force)
    size = f"{dkim.RSA_BITS}-bit " if args.algorithm == "rsa" else ""
    print(f"wrote {size}{args.algorithm} key {path}")
    print(f"publish this TXT record (it signs mail from {domain} from now on):")
    print(f"{selector.lower()}._domainkey.{domain}. IN TXT {dkim.zone_txt(record)}")
    return 0


def dns_records(config: Config, data_dir: DataDir, accounts: Accounts, args: argparse.Namespace,
                audit: AuditLog) -> int:
    domain = _local_domain(accounts, args.domain)
    ports = {
        "submission": _port(config.submission.listen),
        "submissions": _port(config.submission.listen_tls),
        "imap": _port(config.imap.listen),
        "imaps": _port(config.imap.listen_tls),
        "pop3s": _port(config.pop3.listen_tls),
    }
    for line in dkim.dns_records(domain, config.server.hostname, keys_dir(data_dir), ports=ports):
        print(line)
    return 0


def _port(listeners) -> int | None:
    return listeners[0].port if listeners else None


def _local_domain(accounts: Accounts, name: str) -> str:
    domain = normalize_domain(name)
    if not accounts.is_local_domain(domain):
        raise UnknownDomainError(f"unknown domain {domain}: add it with 'postroom domain add'")
    return domain
