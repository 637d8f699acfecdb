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

    def __init__(self, work: Path):
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
""")

    def mail_dirs(self) -> list[Path]:
        return [self.maildir / "new", self.maildir / "cur"]

    def root(self) -> int:
        """Its master's pid: every Postfix process of this instance is under it."""
        return int((self.etc.parent / "queue" / "pid" / "master.pid").read_text().split()[0])

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

    def root(self) -> int:
        """`postroom serve`'s pid: its daemons, mtad's workers and writer are under it."""
        return self.process.pid

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
    cpu_before = tree_cpu_seconds(server.root())
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
    cpu = 1000 * (tree_cpu_seconds(server.root()) - cpu_before) / max(1, total - before)
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


def compare(messages: int, concurrencies: list[int], rounds: int, workers: int, policy: bool,
            log_level: str = "info", writer: str = "off") -> None:
    """`writer`: Postroom's [smtp] writer "off", "on", or "both" (two Postrooms in turn)."""
    if not postfix_available() or shutil.which("smtp-source") is None:
        raise SystemExit("Debian's postfix (postfix, smtp-source) is not installed: `make bench-peers` installs it")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: stop the servers
    work = Path(tempfile.mkdtemp(prefix="compare-postfix-"))
    servers: list = []
    try:
        with _policy_peers(policy, work) as (chain, message_file):
            servers.append(PostfixMX(work))
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
                print(_chain_verdict(servers[-1]), flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    chain_state = "on" if policy else "off"
    payload = f"-F (DKIM-signed, {SIZE} B)" if policy else f"-l {SIZE}"
    print(f"\nsmtp-source -m {messages} {payload} -s C, Postroom [smtp] workers = {workers}, writer = {writer}, "
          f"log_level = {log_level}, policy chain {chain_state}; median of {rounds} run(s) each; CPU: what the "
          f"server's processes used (user + system, every process under its master or serve) per message\n")
    names = [server.name for server in servers[1:]]
    label = {"postroom": "Postroom", "postroom+w": "Postroom, writer"}
    print("| concurrency | Postfix msgs/s | CPU ms | "
          + " | ".join(f"{label[n]} msgs/s | ratio | CPU ms" for n in names) + " |")
    print("|---|---|---|" + "---|---|---|" * len(names))
    for c in concurrencies:
        postfix = statistics.median(rates[("postfix", c)])
        cells = []
        for n in names:
            postroom = statistics.median(rates[(n, c)])
            per_round = " ".join(f"{r / p:.2f}" for r, p in zip(rates[(n, c)], rates[("postfix", c)]))
            cells.append(f"{postroom:.0f} | {postroom / postfix:.2f} ({per_round}) | {statistics.median(cpus[(n, c)]):.2f}")
        print(f"| {c} | {postfix:.0f} | {statistics.median(cpus[('postfix', c)]):.2f} | " + " | ".join(cells) + " |")


def _chain_verdict(server: PostroomMX) -> str:
    """What the chain said of one stored message: that it did its work."""
    for d in server.mail_dirs():
        for entry in os.scandir(d):
            head = Path(entry.path).read_bytes().split(b"\r\n\r\n", 1)[0].decode()
            found = re.search(r"^Authentication-Results:.*?(?=\r\n\S)", head, re.MULTILINE | re.DOTALL)
            return " ".join(found.group(0).split()) if found else "no Authentication-Results in a stored message"
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
