"""`postroom status` against a running `postroom serve` and a DNS server serving the test's
zone (tests/dnszone.py): the processes with the pids the kernel says hold their locks, the
queue and store counts, the certificate, and per domain the DNS records missing or wrong,
then all well once docs/dns.md's records are published."""

from __future__ import annotations

import datetime
import os
import re
import smtplib
import subprocess

import pytest

from conftest import BIN, CHEAP_HASHER, start_module_daemon
from dnszone import DNSZone
from docs_blocks import commands
from storage import Accounts

import conf
from postroom.status import certificate_section


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    with DNSZone({}) as zone:
        daemon = start_module_daemon(root, storage={"shards": 2},
                                     dns={"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 2})
        daemon.zone = zone
        yield daemon
        assert daemon.stop() == 0, daemon.stderr()


def _run(server, lines: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", "\n".join(["set -e", *lines])], capture_output=True, text=True, env=env,
                          timeout=120)


def _replace(server) -> dict[str, str]:
    return {"/etc/postroom/postroom.toml": str(server.config_path), "example.org": "example.test"}


def _section(out: str, domain: str) -> dict[str, str]:
    """record -> state, from the status lines under `domain`."""
    lines = out.splitlines()
    start = lines.index(f"  {domain}")
    found = {}
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        fields = line.split()
        if fields[0] == "publish:":
            continue
        name = " ".join(fields[:2]) if fields[0] == "DKIM" else fields[0]
        found[name] = fields[2] if fields[0] == "DKIM" else fields[1]
    return found


def test_status_tells_what_runs_and_which_records_to_publish_until_they_are(server):
    # docs/dns.md: add the domain, make its key, print the records.
    made = _run(server, commands("dns.md", "records", _replace(server)))
    assert made.returncode == 0, made.stderr
    # dns-records' zone-file lines (name, TTL, IN, type, data), not keygen's (no TTL).
    records = [line for line in made.stdout.splitlines() if line.split()[1:3] and line.split()[1].isdigit()]
    selector = next(line.split(".")[0] for line in records if "._domainkey." in line)
    with Accounts(server.config.server.data_dir / "accounts.lmdb", hasher=CHEAP_HASHER) as accounts:
        accounts.add_domain("other.test")
        accounts.add_user("u@example.test", "correct horse battery staple")
    address = server.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as smtp:
        for n in range(3):
            smtp.sendmail("s@example.org", ["u@example.test"], f"Subject: {n}\r\n\r\nx\r\n".encode())

    # The zone: an MX elsewhere, two SPF records, no DKIM key, no DMARC for example.test;
    # other.test fails to answer at all.
    server.zone.update({
        "example.test": {"MX": ["10 mx.elsewhere.test."],
                         "TXT": ['"v=spf1 mx -all"', '"v=spf1 a -all"']},
    })
    server.zone.servfail = {"other.test"}
    status = _run(server, commands("dns.md", "status", _replace(server)))
    out = status.stdout
    assert status.returncode == 1, out + status.stderr
    pids = {line.split()[0]: int(line.split()[3]) for line in out.splitlines()
            if line.startswith("  ") and " running " in line}
    assert pids == {"serve": server.process.pid, "mtad": server.child_pid("mtad"),
                    "imapd": server.child_pid("imapd"), "pop3d": server.child_pid("pop3d")}
    assert all(re.search(r" up \d+m \d\ds$", line) for line in out.splitlines() if " running " in line), out
    assert "queue     0 message(s): 0 queued, 0 deferred, 0 held" in out
    assert "store     1 account(s), 3 message(s)" in out
    assert "valid for" in out and "self-signed: mail clients" in out
    assert _section(out, "example.test") == {"MX": "wrong", "SPF": "wrong", f"DKIM {selector}": "missing",
                                             "DMARC": "missing"}
    assert set(_section(out, "other.test").values()) == {"unknown"}
    for wanted in (r for r in records if " SRV " not in r and "v=spf1" not in r):
        assert f"publish: {wanted}" in out  # the line to publish, as dns-records prints it

    # Publish what dns-records said (the SRV records are optional); other.test answers.
    zone: dict[str, dict[str, list[str]]] = {}
    for line in records:
        name, _ttl, _class, kind, data = line.split(None, 4)
        zone.setdefault(name.rstrip("."), {}).setdefault(kind, []).append(data)
    zone["other.test"] = {"MX": ["5 mail.example.test."], "TXT": ['"v=spf1 a:mail.example.test include:x.test ~all"']}
    zone["_dmarc.other.test"] = {"TXT": ['"v=DMARC1; p=reject"']}
    server.zone.update(zone)
    server.zone.servfail = set()
    other_key = f"{selector}._domainkey.other.test"
    status = _run(server, commands("dns.md", "status", _replace(server)))
    assert status.returncode == 0, status.stdout + status.stderr
    assert set(_section(status.stdout, "example.test").values()) == {"ok"}
    assert set(_section(status.stdout, "other.test").values()) == {"ok"}  # no key of its own: no DKIM line
    assert other_key not in status.stdout
    assert status.stdout.endswith("all well\n")


def test_a_certificate_near_its_end_is_trouble(server):
    config = conf.load(server.config_path)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(config.tls.cert.read_bytes())
    for days_left, expected in ((30, []), (3, ["certificate expires on"]), (-1, ["certificate expired on"])):
        trouble: list[str] = []
        certificate_section(config, trouble, now=cert.not_valid_after_utc - datetime.timedelta(days=days_left))
        assert [t.split(" 2")[0] for t in trouble] == expected, trouble


def test_nothing_running_is_trouble(cli):
    done = cli("status", "--no-dns")
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line.split()[:2] for line in done.stdout.splitlines()[1:5]] == [
        ["serve", "stopped"], ["mtad", "stopped"], ["imapd", "stopped"], ["pop3d", "stopped"]]
    assert "dns" not in done.stdout.splitlines()
    assert done.stdout.rstrip().endswith("no daemon is running")
