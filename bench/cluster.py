"""Throughput with 1, 2 and 3 Postroom nodes against a real etcd (issue 18, item 7).

    .venv/bin/python bench/cluster.py [--quick] [--nodes 1,2,3] [--shards 12] [-c 50] [-m 60]
                                      [--rounds 3] [--logins 60] [--clients 10] [--seconds 15]

For each node count N: a fresh etcd (tests/etcd_peer.py: one member on loopback, fsync on)
and N `postroom serve` in cluster mode (tests/cluster_nodes.py: one data dir shared as
nodes share the shards' volumes, each node with its own ports and LMTP port, the users
made and pushed into etcd, `log_level = "info"`), `[smtp] workers = 2` and the production
lease TTL (10 s). Ports come from tests/conftest.py's range (POSTROOM_TEST_PORTS, default
12000). The users are --shards x 4, four in every shard. Before each measurement it waits
until every shard is owned and each node owns its share (cluster/balance.py's target), as
etcd's owner keys say, and prints the balance; a shard that moved meanwhile is reported.

Then, each figure in a window of its own:
- SMTP: bench/smtp_in.py's client at C connections, M messages of 4 KiB each, connection i
  to node i mod N and to user i mod the users (every shard gets mail); a warm-up first,
  then --rounds runs (the median rate). Handed off: the share of messages the node that
  took them handed to the owner over LMTP (its `handed_over` log events).
- IMAP logins: LOGIN + LOGOUT over TLS on fresh connections, 4 at a time (bench/imap.py's
  login figure), round-robin over the nodes and ten users in ten shards; then the same at
  each user's owner only, and at a node that does not own the user (proxied: this node
  checks the password, then logs in at the owner over STARTTLS).
- IMAP commands: --clients sessions at once (ten users in ten shards, logged in first, not
  counted), bench/imap.py's mail client mix for --seconds, plaintext: every session at its
  user's owner, then every session at a non-owner (the proxy hop).
CPU: user + system time of every process of every node (serve, mtad, its workers, imapd,
pop3d, the cluster agent), read from /proc before and after each window (SMTP's window
ends a second after the last 250: the files follow the commit), divided by the window's
messages, logins or commands; etcd's and the load generator's (this process) likewise, and
what the machine's other processes used meanwhile (a test run beside it shows there). And
the CPU of one argon2id password check in this process, at each N: it splits a login's
cost, and shows whether the CPU ran slower for one N than for another (a busy VM host).

This machine has 2 cores, shared by every node, etcd and the load generator: the rates
cannot grow with N here. The CPU per operation is the figure to carry to a real cluster
(docs/scale.md): what each node count adds per message (the LMTP hand-off), per login
and per command (the proxy hop). The whole run takes about 10 minutes; --quick, about 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import argon2  # noqa: E402

import conf  # noqa: E402
from cluster.balance import target  # noqa: E402
from cluster.etcd import Etcd  # noqa: E402
from cluster_nodes import owners, start_nodes, stop_nodes  # noqa: E402
from etcd_peer import Etcd as EtcdPeer  # noqa: E402
from flushes import descendants  # noqa: E402 - bench/, beside this script
from imap import Server, client_mix, logins_per_second, open_sessions  # noqa: E402
from procs import CLOCK_TICKS, cpu_seconds  # noqa: E402
from smtp_in import load  # noqa: E402
from spread import shard_of, users_in_every_shard  # noqa: E402

PASSWORD = "bench password 1"
NODE_NAMES = ("node-a", "node-b", "node-c", "node-d", "node-e")
LEASE_TTL = 10  # [cluster] lease_ttl's default
USERS_PER_SHARD = 4
IMAP_USERS = 10  # the login and command loads: ten users in ten shards
BALANCE_TIMEOUT = 60.0
CORES = os.cpu_count() or 1
SETTLE = 1.0  # seconds after the last 250 still counted: the message files follow the commit


@dataclass
class Window:
    """CPU seconds used during one measurement, and its wall time."""
    wall: float = 0.0
    postroom: float = 0.0
    etcd: float = 0.0
    client: float = 0.0
    machine: float = 0.0  # every process of the machine's, ours and others'

    def __iadd__(self, other: Window) -> Window:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def since(self, before: Window) -> Window:
        return Window(*(now - then for now, then in zip(astuple(self), astuple(before), strict=True)))

    @property
    def others(self) -> float:
        """CPU seconds of processes not of this benchmark (say, another test run)."""
        return max(0.0, self.machine - self.postroom - self.etcd - self.client)

    def others_note(self) -> str:
        """What other processes took of the two cores meanwhile, when it is enough to matter."""
        share = self.others / (self.wall * CORES) if self.wall else 0.0
        return f" (other processes: {share:.0%} of the cores)" if share >= 0.02 else ""


@dataclass
class Figures:
    """One node count's results."""
    nodes: int
    balance: str = ""
    smtp_rates: list[float] = field(default_factory=list)
    messages: int = 0
    handed: int = 0
    smtp: Window = field(default_factory=Window)
    logins: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind -> (logins/s, CPU ms each)
    commands: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind -> (commands/s, CPU ms each)
    idle: Window = field(default_factory=Window)
    total: Window = field(default_factory=Window)
    moved: list[str] = field(default_factory=list)
    password_check: float = 0.0  # CPU ms of one argon2id check in this process: the CPU's speed now


class Cluster:
    """etcd and N nodes, started; `stop()` ends them."""

    def __init__(self, count: int, shards: int, users: list[str], work: Path):
        self.names = NODE_NAMES[:count]
        self.shards = shards
        self.etcd_peer = EtcdPeer().start()
        self.running: dict = {}
        try:
            self.running, configs = start_nodes(
                work, self.etcd_peer.endpoint, self.names, shards=shards, users=users, password=PASSWORD,
                lease_ttl=LEASE_TTL, smtp={"workers": 2},
                imap={"plaintext_auth": True, "max_connections_per_ip": 500})
            self.etcd = Etcd(conf.load(configs[self.names[0]]).cluster)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_nodes(self.running)
        self.etcd_peer.stop()

    def port(self, node: str, listener: str) -> int:
        return self.running[node].listen(listener).port

    def balanced(self) -> dict[int, str]:
        """Shard -> owner, once every shard is owned and each node owns its share, the same
        on two looks a second apart (the daemons follow the owners within a second)."""
        deadline, last = time.monotonic() + BALANCE_TIMEOUT, None
        while time.monotonic() < deadline:
            found = owners(self.etcd)
            counts = [sum(1 for node in found.values() if node == name) for name in self.names]
            if len(found) == self.shards and \
                    counts == [target(self.shards, name, set(self.names)) for name in self.names]:
                if found == last:
                    return found
                last = found
            else:
                last = None
            time.sleep(1.0)
        raise SystemExit(f"shards not balanced over {self.names} within {BALANCE_TIMEOUT:g} s: "
                         f"{owners(self.etcd)}")

    def handed_over(self) -> int:
        """`handed_over` events logged so far by every node (one per message and owner)."""
        return sum(daemon.stderr().count("event=handed_over") for daemon in self.running.values())

    def cpu(self) -> Window:
        """CPU seconds used so far; `wall`: now."""
        postroom = sum(cpu_seconds(pid) for daemon in self.running.values()
                       for pid in descendants(daemon.process.pid))
        return Window(time.perf_counter(), postroom, cpu_seconds(self.etcd_peer.process.pid),
                      cpu_seconds(os.getpid()), machine_busy())


def machine_busy() -> float:
    """CPU seconds all cores have been busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def password_check_ms(checks: int = 5) -> float:
    """CPU ms of one argon2id verification with the accounts' parameters (argon2-cffi's
    defaults, storage/accounts.py), in this process: what a login pays for its password."""
    hasher = argon2.PasswordHasher(type=argon2.Type.ID)
    stored = hasher.hash(PASSWORD)
    times = []
    for _ in range(checks):
        before = cpu_seconds(os.getpid())
        hasher.verify(stored, PASSWORD)
        times.append((cpu_seconds(os.getpid()) - before) * 1000)
    return statistics.median(times)


def measure(count: int, args, users: list[str], work: Path) -> Figures:
    figures = Figures(count)
    started = time.perf_counter()
    cluster = Cluster(count, args.shards, users, work)
    try:
        owner_of = cluster.balanced()
        figures.balance = "/".join(str(sum(1 for n in owner_of.values() if n == name)) for name in cluster.names)
        print(f"{count} node(s) ready and balanced in {time.perf_counter() - started:.0f} s: shards per node "
              f"{figures.balance} ({', '.join(cluster.names)}); load average {os.getloadavg()[0]:.1f}", flush=True)
        before = cluster.cpu()
        time.sleep(args.idle)
        figures.idle = cluster.cpu().since(before)
        print(f"  idle {args.idle:g} s: Postroom {figures.idle.postroom / figures.idle.wall * 100:.1f}% of a core, "
              f"etcd {figures.idle.etcd / figures.idle.wall * 100:.1f}%, other processes "
              f"{figures.idle.others / figures.idle.wall * 100:.0f}%", flush=True)
        figures.password_check = password_check_ms()
        print(f"  argon2id, one password check in this process: {figures.password_check:.0f} ms of CPU", flush=True)
        for what, run in (("SMTP", smtp), ("IMAP", imap)):
            run(cluster, owner_of, figures, args, users)
            if (now := owners(cluster.etcd)) != owner_of:
                figures.moved.append(what)
                print(f"  shards moved during {what}: {now}", flush=True)
    finally:
        cluster.stop()
    return figures


def smtp(cluster: Cluster, owner_of: dict[int, str], figures: Figures, args, users: list[str]) -> None:
    """--rounds loads after a warm-up (every process started, every mailbox made)."""
    ports = [cluster.port(name, "smtp.listen") for name in cluster.names]
    to = ",".join(users)
    asyncio.run(load("127.0.0.1", ports, 10, 5, args.size, to))
    for _ in range(args.rounds):
        handed, before = cluster.handed_over(), cluster.cpu()
        done = asyncio.run(load("127.0.0.1", ports, args.concurrency, args.messages, args.size, to))
        time.sleep(SETTLE)
        spent = cluster.cpu().since(before)
        figures.smtp += spent
        figures.total += spent
        figures.smtp_rates.append(done.rate)
        figures.messages += done.accepted
        figures.handed += cluster.handed_over() - handed
        print(f"  SMTP {done.line()}; {spent.postroom / done.accepted * 1000:.2f} ms of Postroom CPU each"
              f"{spent.others_note()}", flush=True)


def imap(cluster: Cluster, owner_of: dict[int, str], figures: Figures, args, users: list[str]) -> None:
    """Logins, then the command mix, of ten users in ten shards (they have the SMTP load's
    mail); a node that does not own a user: the next one."""
    names, imap_users = cluster.names, users[:IMAP_USERS]
    owner = {user: owner_of[shard_of(user, args.shards)] for user in imap_users}
    other = {user: names[(names.index(owner[user]) + 1) % len(names)] for user in imap_users}
    logins = {"round-robin": [(names[i % len(names)], user) for i, user in enumerate(imap_users)],
              "owner": [(owner[user], user) for user in imap_users]}
    if len(names) > 1:
        logins["proxied"] = [(other[user], user) for user in imap_users]
    for kind, pairs in logins.items():
        targets = [Server(f"127.0.0.1:{cluster.port(node, 'imap.listen_tls')}", user, PASSWORD, mode="tls",
                          cafile=None) for node, user in pairs]
        before = cluster.cpu()
        rate = logins_per_second(targets, args.logins)
        spent = cluster.cpu().since(before)
        figures.total += spent
        figures.logins[kind] = (rate, spent.postroom / args.logins * 1000)
        proxied = sum(1 for node, user in pairs if node != owner[user]) / len(pairs)
        print(f"  IMAP logins, {kind} ({proxied:.0%} proxied): {args.logins} in {spent.wall:.1f} s = "
              f"{rate:.1f}/s, {figures.logins[kind][1]:.0f} ms of Postroom CPU each{spent.others_note()}",
              flush=True)
    for kind in ("owner", "proxied") if len(names) > 1 else ("owner",):
        at = owner if kind == "owner" else other
        chosen = [imap_users[i % len(imap_users)] for i in range(args.clients)]
        sessions = open_sessions([(cluster.port(at[user], "imap.listen"), user, PASSWORD) for user in chosen])
        try:
            before = cluster.cpu()
            commands, elapsed = client_mix(sessions, args.seconds)
            spent = cluster.cpu().since(before)
        finally:
            for session, _ in sessions:
                session.close()
        figures.total += spent
        figures.commands[kind] = (commands / elapsed, spent.postroom / commands * 1000)
        print(f"  IMAP mix, {args.clients} clients at the {'owner' if kind == 'owner' else 'non-owner'}: "
              f"{commands} commands in {elapsed:.1f} s = {commands / elapsed:.0f}/s, "
              f"{figures.commands[kind][1]:.2f} ms of Postroom CPU each{spent.others_note()}", flush=True)


def table(results: list[Figures], args) -> str:
    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(f) for f in results) + " |"

    def pair(figures: dict[str, tuple[float, float]], index: int, fmt: str) -> str:
        owner = format(figures["owner"][index], fmt)
        return f"{owner} / {format(figures['proxied'][index], fmt)}" if "proxied" in figures else f"{owner} / -"

    def pct(part: float, whole: float) -> str:
        return f"{part / whole * 100:.1f}%" if whole else "-"

    def hop(figures: dict[str, tuple[float, float]], fmt: str) -> str:
        return format(figures["proxied"][1] - figures["owner"][1], "+" + fmt) if "proxied" in figures else "-"

    one = next((f for f in results if f.nodes == 1), None)

    def handoff(f: Figures) -> str:
        if one is None or not f.handed:
            return "-"
        per_message = (f.smtp.postroom / f.messages - one.smtp.postroom / one.messages) * 1000
        return f"{per_message / (f.handed / f.messages):+.2f}"

    lines = [
        "| figure | " + " | ".join(f"{f.nodes} node{'s' if f.nodes > 1 else ''}" for f in results) + " |",
        "|---|" + "---|" * len(results),
        row("shards per node (balanced before each measurement)", lambda f: f.balance),
        row(f"SMTP C={args.concurrency}, {args.size} B, msgs/s (median of {args.rounds})",
            lambda f: f"{statistics.median(f.smtp_rates):.0f}"),
        row("handed off to the owner over LMTP", lambda f: pct(f.handed, f.messages)),
        row("CPU ms per message, all Postroom processes", lambda f: f"{f.smtp.postroom / f.messages * 1000:.2f}"),
        row("IMAP logins/s, TLS, 4 at a time, round-robin", lambda f: f"{f.logins['round-robin'][0]:.1f}"),
        row("CPU ms per login, round-robin", lambda f: f"{f.logins['round-robin'][1]:.0f}"),
        row("CPU ms per login, at the owner / proxied", lambda f: pair(f.logins, 1, ".0f")),
        row(f"IMAP mix, {args.clients} clients, commands/s at the owner / proxied",
            lambda f: pair(f.commands, 0, ".0f")),
        row("CPU ms per command, at the owner / proxied", lambda f: pair(f.commands, 1, ".2f")),
        row("argon2id, CPU ms of one password check in the bench process (a proxied login pays two)",
            lambda f: f"{f.password_check:.0f}"),
        row("proxy hop: CPU ms per command, proxied - owner", lambda f: hop(f.commands, ".2f")),
        row("proxy hop: CPU ms per login, proxied - owner", lambda f: hop(f.logins, ".0f")),
        row("LMTP hand-off: CPU ms more per message handed off, against 1 node", handoff),
        row("etcd CPU, % of a core idle / during the loads", lambda f: f"{pct(f.idle.etcd, f.idle.wall)} / "
            f"{pct(f.total.etcd, f.total.wall)}"),
        row("etcd's share of all server CPU during the loads",
            lambda f: pct(f.total.etcd, f.total.etcd + f.total.postroom)),
        row(f"Postroom CPU during SMTP, % of the {CORES} cores", lambda f: pct(f.smtp.postroom, f.smtp.wall * CORES)),
        row(f"load generator CPU during SMTP, % of the {CORES} cores",
            lambda f: pct(f.smtp.client, f.smtp.wall * CORES)),
        row(f"other processes' CPU during the loads, % of the {CORES} cores (not this benchmark's)",
            lambda f: pct(f.total.others, f.total.wall * CORES)),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run for trying: -m 20 --rounds 1 "
                        "--logins 12 --seconds 4 --idle 2 unless given")
    parser.add_argument("--nodes", default="1,2,3", help="node counts, in turn")
    parser.add_argument("--shards", type=int, default=12, help="shards (12: an even share on 1, 2 and 3 nodes)")
    parser.add_argument("-c", "--concurrency", type=int, default=50, help="SMTP connections at once")
    parser.add_argument("-m", "--messages", type=int, help="SMTP messages per connection per round (60)")
    parser.add_argument("-s", "--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--rounds", type=int, help="SMTP rounds (3)")
    parser.add_argument("--logins", type=int, help="IMAP logins of each kind (60)")
    parser.add_argument("--clients", type=int, default=10, help="IMAP sessions of the command mix")
    parser.add_argument("--seconds", type=float, help="seconds of each command mix (15)")
    parser.add_argument("--idle", type=float, help="seconds of idle CPU measured first (5)")
    args = parser.parse_args()
    quick = {"messages": 20, "rounds": 1, "logins": 12, "seconds": 4, "idle": 2}
    full = {"messages": 60, "rounds": 3, "logins": 60, "seconds": 15, "idle": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    counts = [int(n) for n in args.nodes.split(",")]
    if not 1 <= max(counts) <= len(NODE_NAMES):
        parser.error(f"--nodes: 1 to {len(NODE_NAMES)}")
    # `timeout` and Ctrl-C must not leave a node behind: SIGTERM unwinds as an exit does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    users = users_in_every_shard(args.shards, USERS_PER_SHARD)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as work:
        for count in counts:
            root = Path(work) / f"n{count}"
            root.mkdir()
            results.append(measure(count, args, users, root))
    print(f"\n{args.shards} shards, {len(users)} users, `workers = 2`, lease TTL {LEASE_TTL} s, "
          f"{CORES} cores shared by every node, etcd and the load generator; "
          f"run time {time.perf_counter() - started:.0f} s\n")
    print(table(results, args))
    for figures in results:
        if figures.moved:
            print(f"{figures.nodes} node(s): shards moved during {', '.join(figures.moved)}")


if __name__ == "__main__":
    main()
