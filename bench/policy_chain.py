"""What the policy chain costs the MX: bench/smtp_in.py's load against two `postroom serve`,
one with the whole chain on and one with it off, in the same run, in alternation.

    .venv/bin/python bench/policy_chain.py [-c 50] [-m 40] [--rounds 3] [--workers 2]

The chain on: SPF, DKIM (each message carries an rsa-sha256 signature of 2048 bits, which
verifies), ARC, DMARC (p=none, aligned), a DNSBL zone, the rate limits counted (loopback
not exempt, limits far above the load), and every message streamed to a real clamd (Debian's
clamav-daemon with the test suite's one-signature database: clamd's own cost per message
is its scan of 4 KiB, not the size of a real database). DNS is a zone served on loopback by
tests/dnszone.py, its answers kept for --ttl seconds (300, as a real sender's records are:
the resolver's cache answers after the first message; --ttl 0 asks every time);
greylisting stays off (it would defer every first message). The chain off: `[policy]
enabled = false`, no clamd.

Prints each run's smtp_in.py line and, per setting, the median msgs/s and p50 latency, and
the ratio on/off.
"""

from __future__ import annotations

import argparse
import base64
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

import conf  # noqa: E402
from clamd_peer import Clamd  # noqa: E402
from dnszone import DNSZone  # noqa: E402
from postroom.datadir import open_accounts  # noqa: E402
from ports import free_port  # noqa: E402 - bench/, beside this script

PY = ROOT / ".venv/bin/python"
POSTROOM = ROOT / ".venv/bin/postroom"
SENDER = "bench@example.org"
RECIPIENT = "alice@example.test"
PLACEHOLDER = b"<bench@example.org>"  # bench/smtp_in.py gives each message its own Message-ID here



def signed_message(size: int) -> tuple[bytes, str]:
    """A message of about `size` bytes signed for example.org (the Message-ID left out of
    h=, since smtp_in.py rewrites it), and the key's TXT record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = (f"From: Bench <mailer@example.org>\r\nTo: <{RECIPIENT}>\r\nSubject: benchmark\r\n"
            f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: {PLACEHOLDER.decode()}\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again, for the benchmark.\r\n"
    raw = head + line * max(1, (size - len(head)) // len(line))
    signature = dkim.sign(raw, b"bench", b"example.org", private, include_headers=[b"from", b"to", b"subject", b"date"])
    return signature + raw, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


def txt(text: str) -> str:
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


def start_server(work: Path, workers: int, chain: dict | None, users: tuple[str, ...] = (),
                 log_level: str = "warning", writer: bool = False) -> tuple[subprocess.Popen, int]:
    """A throwaway `postroom serve` in `work` (made by the caller) with RECIPIENT and `users`;
    (the process, its SMTP port). Its log goes to work/serve.log. `writer`: [smtp] writer."""
    ports = {name: free_port() for name in ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")}
    policy = "[policy]\nenabled = false\n"
    if chain is not None:
        policy = f"""[policy]
enabled = true
dnsbl_zones = ["bl.example"]
[dns]
nameservers = ["127.0.0.1"]
port = {chain['dns_port']}
timeout = 2
[clamav]
enabled = {'true' if chain['clamd'] else 'false'}
address = "{chain['clamd'] or 'unix:/nonexistent'}"
timeout = 10
[rates]
exempt = []
connections_per_minute = 1000000
messages_per_minute = 1000000
recipients_per_minute = 1000000
"""
    config = work / "postroom.toml"
    config.write_text(f"""[server]
hostname = "mail.bench.test"
data_dir = "{work / 'var'}"
log_level = "{log_level}"
[tls]
cert = "{work / 'var/tls/cert.pem'}"
key = "{work / 'var/tls/key.pem'}"
self_signed = true
[smtp]
listen = ["127.0.0.1:{ports['smtp']}"]
workers = {workers}
writer = {'true' if writer else 'false'}
max_connections_per_ip = 500
[submission]
listen = ["127.0.0.1:{ports['submission']}"]
listen_tls = ["127.0.0.1:{ports['submissions']}"]
[imap]
listen = ["127.0.0.1:{ports['imap']}"]
listen_tls = ["127.0.0.1:{ports['imaps']}"]
[pop3]
listen = ["127.0.0.1:{ports['pop3']}"]
listen_tls = ["127.0.0.1:{ports['pop3s']}"]
{policy}""")
    _, accounts = open_accounts(conf.load(config))
    with accounts:
        accounts.add_domain("example.test")
        for user in (RECIPIENT, *users):
            accounts.add_user(user, "bench password 1")
    log = open(work / "serve.log", "wb")
    process = subprocess.Popen([POSTROOM, "--config", str(config), "serve"], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"postroom serve exited {process.returncode}: see {work / 'serve.log'}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", ports["smtp"])) == 0:
                return process, ports["smtp"]
        time.sleep(0.2)
    process.kill()
    raise SystemExit("postroom serve did not listen within 60 s")


_LINE = re.compile(r"= (\d+) msgs/s; end of DATA to reply p50 ([\d.]+) ms")


def load(port: int, message: Path, args) -> tuple[float, float, str]:
    out = subprocess.run([PY, ROOT / "bench/smtp_in.py", f"127.0.0.1:{port}", "-c", str(args.concurrency),
                          "-m", str(args.messages), "--message", str(message), "--sender", SENDER,
                          "--to", RECIPIENT], capture_output=True, text=True, timeout=600, check=True).stdout.strip()
    found = _LINE.search(out)
    if not found or "refused" in out or "failed" in out:
        raise SystemExit(f"the load did not go through: {out}")
    return float(found.group(1)), float(found.group(2)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("-m", "--messages", type=int, default=40, help="messages per connection")
    parser.add_argument("-s", "--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternated")
    parser.add_argument("--workers", type=int, default=2, help="[smtp] workers of both servers")
    parser.add_argument("--split", action="store_true",
                        help="a third server: the chain on but for clamd, to tell the scan's share")
    parser.add_argument("--ttl", type=int, default=300,
                        help="the zone's TTL: 0 makes every message ask DNS again (no cache)")
    args = parser.parse_args()

    raw, key_record = signed_message(args.size)
    zone = {
        "example.org": {"TXT": [txt("v=spf1 ip4:127.0.0.0/8 -all")]},
        "bench._domainkey.example.org": {"TXT": [txt(key_record)]},
        "_dmarc.example.org": {"TXT": [txt("v=DMARC1; p=none")]},
    }
    with tempfile.TemporaryDirectory(prefix="policy-bench-") as tmp, DNSZone(zone, ttl=args.ttl) as dns, \
            Clamd() as clamd:
        work = Path(tmp)
        message = work / "message.eml"
        message.write_bytes(raw.replace(b"\r\n.", b"\r\n.."))
        settings = {"off": None, "on": {"dns_port": dns.port, "clamd": clamd.address}}
        if args.split:
            settings["noav"] = {"dns_port": dns.port, "clamd": ""}
        servers = {}
        for label, chain in settings.items():
            (work / label).mkdir()
            servers[label] = start_server(work / label, args.workers, chain)
        figures: dict[str, list[tuple[float, float]]] = {label: [] for label in settings}
        try:
            for round_ in range(args.rounds):
                for label in list(settings) if round_ % 2 == 0 else list(settings)[::-1]:
                    rate, p50, line = load(servers[label][1], message, args)
                    figures[label].append((rate, p50))
                    print(f"chain {label:4}: {line}", flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(60)
        medians = {label: (statistics.median(r for r, _ in runs), statistics.median(p for _, p in runs))
                   for label, runs in figures.items()}
        for label, (rate, p50) in medians.items():
            print(f"median chain {label}: {rate:.0f} msgs/s, p50 {p50:.1f} ms")
        print(f"chain on / off: {medians['on'][0] / medians['off'][0]:.2f} of the throughput")
        if args.split:
            print(f"chain on without clamd / off: {medians['noav'][0] / medians['off'][0]:.2f} of the throughput")
        stored = sorted((work / "on/var/shards").rglob("cur/*"))
        print(f"messages stored with the chain on: {len(stored)} "
              f"(expected {args.rounds * args.concurrency * args.messages})")
        if stored:  # the chain did its work: what one message says of it
            head = stored[0].read_bytes().split(b"\r\n\r\n", 1)[0].decode()
            results = re.search(r"^Authentication-Results:.*?(?=\r\n\S)", head, re.MULTILINE | re.DOTALL)
            print(" ".join(results.group(0).split()) if results else "no Authentication-Results in a stored message")
            print("\n".join(line for line in head.split("\r\n") if line.startswith("X-")))


if __name__ == "__main__":
    main()
