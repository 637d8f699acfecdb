"""Inbound delivery side by side with Postfix (issue 17): `bench/smtp_in.py --compare-postfix`.

    .venv/bin/python bench/smtp_in.py --compare-postfix [-m 5000] [--concurrencies 1,10,50]
                                     [--rounds 1] [--workers 2] [--policy] [--log-level info]
                                     [--writer off|on|both]

Two throwaway MXs on loopback, started here and stopped here:
- Debian's Postfix (bench/postfix_peer.py: its own config directory, queue and data dir in
  a temporary directory), `virtual_mailbox_domains` / `virtual_mailbox_maps` delivering
  into a virtual Maildir (mail owned by `nobody`); Postfix's defaults otherwise, so a 250
  means its queue file is fsynced, and its `virtual` agent fsyncs each Maildir file.
- `postroom serve` (bench/policy_chain.py's server: `[smtp] workers = 2`, `[policy] enabled
  = false`, `log_level = "info"`, its default: a line per event, as Postfix logs each
  connection and message to its maillog_file; `--log-level warning` logs none); with --policy
  the whole chain on, DNS answered by a zone on loopback, a real
  clamd with the test suite's one signature, rate limits counted but far above the load).
- with --policy, a second Postfix running the same checks as a Debian sysadmin would add
  them (bench/postfix_checks.py: policyd-spf, reject_rbl_client, opendkim, opendmarc,
  clamav-milter on the same clamd, anvil's rates, unbound as its caching resolver): the
  table gives Postroom's ratio to each Postfix. The issue's figure is the plain one; the
  checked one is the like-for-like comparison (plain Postfix checks nothing).
  `--writer on` gives it `[smtp] writer = true` (mtad/writer.py); `--writer both` runs a
  second Postroom with it, the three servers in turn, and prints a column for each.

Each is driven by Postfix's own load generator, `smtp-source -m M -l 5000 -s C` (HELO,
MAIL, RCPT, DATA, QUIT: a new connection per message, no pipelining; its Message-Id holds
its pid and a message counter, so no two messages are alike), at each concurrency C, the
two servers in turn, the first of each pair alternating. With --policy both get the same
pre-formatted message through `smtp-source -F` instead, DKIM-signed and without a
Message-ID (so that Postroom's dedupe, which needs one, stores every copy), so that the
chain verifies a signature as a real sender's mail would have it.

A run's figure: messages that reached the recipient's Maildir (files in cur/ and new/, the
count before the run subtracted), over the time from starting smtp-source until the last
of them arrived (the newest mtime of those directories, or smtp-source's exit if they were
all there by then). The count is waited for, up to DRAIN_TIMEOUT after smtp-source exits;
smtp-source itself is bounded by SOURCE_TIMEOUT. Each server first takes a warm-up run of
WARMUP messages (processes spawned, caches filled), not counted.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ports import wait_for_port  # noqa: E402
from postfix_checks import PostfixChecks, checks_available  # noqa: E402
from postfix_peer import postfix_available, start_postfix, stop_postfix  # noqa: E402
from procs import tree_cpu_seconds  # noqa: E402

RECIPIENT = "alice@example.test"
SENDER = "bench@example.org"
SOURCE_TIMEOUT = 600.0
DRAIN_TIMEOUT = 120.0
WARMUP = 200
SIZE = 5000


class PostfixMX:
    name = "postfix"

    def __init__(self, work: Path, checks: PostfixChecks | None = None):
        """`checks`: Postfix running the chain's checks too (bench/postfix_checks.py)."""
        self.checks = checks
        if checks is not None:
            self.name = "postfix+checks"
        mail_user = pwd.getpwnam("nobody")  # virtual(8) will not deliver as root
        base = work / "postfix-mail"
        self.maildir = base / "example.test" / "alice"
        base.mkdir(parents=True)
        shutil.chown(base, mail_user.pw_uid, mail_user.pw_gid)
        (work / "vmailbox").write_text(f"{RECIPIENT} example.test/alice/\n")  # the slash: a Maildir
        self.etc, self.port = start_postfix(work, f"""myhostname = postfix.bench.test
mydestination =
virtual_mailbox_domains = example.test
virtual_mailbox_base = {base}
virtual_mailbox_maps = texthash:{work / 'vmailbox'}
virtual_uid_maps = static:{mail_user.pw_uid}
virtual_gid_maps = static:{mail_user.pw_gid}
""" + (checks.main_cf if checks else ""), master_cf=checks.master_cf if checks else "",
                                             wrapper=checks.wrapper if checks else [])

    def mail_dirs(self) -> list[Path]:
        return [self.maildir / "new", self.maildir / "cur"]

    def roots(self) -> list[int]:
        """Its master's pid (every Postfix process of this instance is under it), and the
        checks' (the milters, unbound)."""
        master = int((self.etc.parent / "queue" / "pid" / "master.pid").read_text().split()[0])
        return [master, *(self.checks.pids() if self.checks else ())]

    def stop(self) -> None:
        stop_postfix(self.etc)


class PostroomMX:

    def __init__(self, work: Path, workers: int, chain: dict | None, log_level: str = "info", writer: bool = False):
        from policy_chain import start_server  # its imports need the venv: only here
        self.name = "postroom+w" if writer else "postroom"
        work.mkdir()
        self.shards = work / "var" / "shards"
        self.process, self.port = start_server(work, workers, chain, log_level=log_level, writer=writer)
        wait_for_port(self.port, self.process)

    def mail_dirs(self) -> list[Path]:
        return [Path(root) for root, dirs, _ in os.walk(self.shards) if os.path.basename(root) in ("cur", "new")]

    def roots(self) -> list[int]:
        """`postroom serve`'s pid: its daemons, mtad's workers and writer are under it."""
        return [self.process.pid]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def count(dirs: list[Path]) -> tuple[int, float]:
    """Messages in `dirs` and the newest of their mtimes (when the last one arrived)."""
    total, newest = 0, 0.0
    for d in dirs:
        try:
            total += sum(1 for entry in os.scandir(d) if not entry.name.startswith("."))
            newest = max(newest, d.stat().st_mtime)
        except FileNotFoundError:
            pass
    return total, newest


def drive(server, concurrency: int, messages: int, message_file: Path | None) -> tuple[float, float, str]:
    """One smtp-source run against `server`: (msgs/s reaching the Maildir, the CPU its
    processes used a message in ms, a line saying so)."""
    before, _ = count(server.mail_dirs())
    cpu_before = _cpu(server)
    payload = ["-F", str(message_file)] if message_file else ["-l", str(SIZE)]
    command = ["smtp-source", "-m", str(messages), *payload, "-s", str(concurrency), "-f", SENDER, "-t", RECIPIENT,
               "-M", "bench.example.org", f"127.0.0.1:{server.port}"]
    start = time.time()
    source = subprocess.run(command, capture_output=True, text=True, timeout=SOURCE_TIMEOUT)
    source_end = time.time()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        total, newest = count(server.mail_dirs())
        if total - before >= messages or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cpu = 1000 * (_cpu(server) - cpu_before) / max(1, total - before)
    arrived = total - before
    end = max(source_end, newest)
    rate = arrived / (end - start)
    line = (f"{server.name:8} C={concurrency:<3} {arrived}/{messages} in the Maildir in {end - start:.1f} s "
            f"= {rate:.0f} msgs/s (smtp-source done after {source_end - start:.1f} s), CPU {cpu:.2f} ms a message")
    if source.returncode != 0:
        line += f"; smtp-source exited {source.returncode}: {source.stderr.strip()[:200]}"
    if arrived < messages:
        line += f"; {messages - arrived} missing after {DRAIN_TIMEOUT:.0f} s"
    return rate, cpu, line


def _cpu(server) -> float:
    return sum(tree_cpu_seconds(root) for root in server.roots())


def compare(messages: int, concurrencies: list[int], rounds: int, workers: int, policy: bool,
            log_level: str = "info", writer: str = "off") -> None:
    """`writer`: Postroom's [smtp] writer "off", "on", or "both" (two Postrooms in turn).
    With `policy`, a second Postfix runs the chain's checks (bench/postfix_checks.py)."""
    if not postfix_available() or shutil.which("smtp-source") is None:
        raise SystemExit("Debian's postfix (postfix, smtp-source) is not installed: `make bench-peers` installs it")
    if policy and (missing := checks_available()):
        raise SystemExit(f"Postfix's checks are not installed ({', '.join(missing)}): `make bench-peers` installs them")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: stop the servers
    work = Path(tempfile.mkdtemp(prefix="compare-postfix-"))
    work.chmod(0o755)  # Postfix's daemons, as the postfix user, look under it
    servers: list = []
    try:
        with _policy_peers(policy, work) as (chain, message_file), contextlib.ExitStack() as stack:
            servers.append(PostfixMX(work / "plain"))
            if policy:
                checks = stack.enter_context(PostfixChecks(work / "checked", dns_port=chain["dns_port"],
                                                           clamd=chain["clamd"]))
                servers.append(PostfixMX(work / "checked", checks))
            for with_writer in {"off": (False,), "on": (True,), "both": (False, True)}[writer]:
                name = "postroom-writer" if with_writer else "postroom"
                servers.append(PostroomMX(work / name, workers, chain, log_level, writer=with_writer))
            for server in servers:
                print(drive(server, 10, WARMUP, message_file)[2] + "  (warm-up)", flush=True)
            rates: dict[tuple[str, int], list[float]] = {}
            cpus: dict[tuple[str, int], list[float]] = {}
            turn = 0
            for _ in range(rounds):
                for c in concurrencies:
                    order = servers if turn % 2 == 0 else servers[::-1]
                    turn += 1
                    for server in order:
                        rate, cpu, line = drive(server, c, messages, message_file)
                        rates.setdefault((server.name, c), []).append(rate)
                        cpus.setdefault((server.name, c), []).append(cpu)
                        print(line, flush=True)
            if policy:
                for server in servers[1:]:
                    print(f"{server.name}: {_chain_verdict(server)}", flush=True)
            for server in servers:
                server.stop()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    chain_state = "on" if policy else "off"
    payload = f"-F (DKIM-signed, {SIZE} B)" if policy else f"-l {SIZE}"
    print(f"\nsmtp-source -m {messages} {payload} -s C, Postroom [smtp] workers = {workers}, writer = {writer}, "
          f"log_level = {log_level}, policy chain {chain_state}; median of {rounds} run(s) each; CPU: what the "
          f"server's processes used (user + system, every process under its master or serve, and the "
          f"checks' milters and resolver) per message; ratio: Postroom's msgs/s over that Postfix's, per "
          f"round in brackets\n")
    peers = [server.name for server in servers if isinstance(server, PostfixMX)]
    ours = [server.name for server in servers if not isinstance(server, PostfixMX)]
    label = {"postfix": "Postfix", "postfix+checks": "Postfix, checks", "postroom": "Postroom",
             "postroom+w": "Postroom, writer"}
    print("| concurrency | " + " | ".join(f"{label[n]} msgs/s | CPU ms" for n in peers) + " | "
          + " | ".join(f"{label[n]} msgs/s | " + " | ".join(f"ratio to {label[p]}" for p in peers) + " | CPU ms"
                       for n in ours) + " |")
    print("|---|" + "---|---|" * len(peers) + ("---|" * (len(peers) + 2)) * len(ours))
    for c in concurrencies:
        cells = [f"{statistics.median(rates[(p, c)]):.0f} | {statistics.median(cpus[(p, c)]):.2f}" for p in peers]
        for n in ours:
            ratios = []
            for p in peers:
                per_round = " ".join(f"{r / q:.2f}" for r, q in zip(rates[(n, c)], rates[(p, c)]))
                ratios.append(f"{statistics.median(rates[(n, c)]) / statistics.median(rates[(p, c)]):.2f} ({per_round})")
            cells.append(f"{statistics.median(rates[(n, c)]):.0f} | " + " | ".join(ratios)
                         + f" | {statistics.median(cpus[(n, c)]):.2f}")
        print(f"| {c} | " + " | ".join(cells) + " |")


def _chain_verdict(server) -> str:
    """What the checks said of one stored message (its Authentication-Results and the like):
    that they did their work."""
    for d in server.mail_dirs():
        for entry in os.scandir(d):
            head = Path(entry.path).read_bytes().replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
            fields = re.findall(r"^(?:Authentication-Results|Received-SPF|X-Virus-Scanned|X-Virus-Status):.*?(?=\n\S|\Z)",
                                head, re.MULTILINE | re.DOTALL | re.IGNORECASE)
            return " / ".join(" ".join(f.split()) for f in fields) or "no Authentication-Results in a stored message"
    return "no message stored"


@contextlib.contextmanager
def _policy_peers(policy: bool, work: Path):
    """With the chain on: bench/policy_chain.py's DNS zone and clamd for as long as the
    comparison runs, and its DKIM-signed message less its Message-ID (not signed: h= leaves
    it out) as LF lines for `smtp-source -F`; without it, (None, None)."""
    if not policy:
        yield None, None
        return
    from policy_chain import signed_message, txt  # the venv's modules: only when asked
    from clamd_peer import Clamd
    from dnszone import DNSZone
    raw, key_record = signed_message(SIZE)
    message = work / "message.txt"
    message.write_bytes(b"".join(line for line in raw.replace(b"\r\n", b"\n").splitlines(keepends=True)
                                 if not line.startswith(b"Message-ID:")))
    zone = {
        "example.org": {"TXT": [txt("v=spf1 ip4:127.0.0.0/8 -all")]},
        "bench._domainkey.example.org": {"TXT": [txt(key_record)]},
        "_dmarc.example.org": {"TXT": [txt("v=DMARC1; p=none")]},
    }
    with DNSZone(zone, ttl=300) as dns, Clamd() as clamd:
        yield {"dns_port": dns.port, "clamd": clamd.address}, message
