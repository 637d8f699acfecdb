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

Then, each figure in a window of its own, each load in three kinds: round-robin over the
nodes (the headline: how a load balancer spreads clients), every operation at its user's
owner, and every operation at the node after the owner (never the owner). The kinds take
turns, each round in another order, so that a machine whose load drifts touches them
alike; "another node - owner" is then the cost of the hop, measured in one cluster. On one
node only round-robin runs (every node is the owner).
- SMTP: bench/smtp_in.py's client at C connections, M messages of 4 KiB each, connection i
  writing to user i mod the users (every shard gets mail); a warm-up first, then --rounds
  loads of each kind (the median rate). Handed off: the share of messages the node that
  took them handed to the owner over LMTP (its `handed_over` log events).
- IMAP logins: LOGIN + LOGOUT over TLS on fresh connections, 4 at a time (bench/imap.py's
  login figure), ten users in ten shards, --logins of each kind in --rounds parts. Proxied:
  the node asked checks the password, then logs in at the owner over STARTTLS, where it is
  not checked again (the node proves itself with the cluster's secret, wire/node_proof.py).
  The nodes hash passwords at argon2id's cheapest cost (the test configs'
  CHEAP_PASSWORDS, tests/conftest.py), so these figures are a login's path without its
  hash: add one argon2id check at the production cost (measured apart, below) per login.
- IMAP commands: --clients sessions at once (the ten users, logged in first, not counted),
  bench/imap.py's mail client mix, plaintext, at the owner and through another node, in
  two halves of --seconds each.
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
and per command (the proxy hop). The whole run takes about 5 minutes on a quiet machine; --quick, about 2.
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
class Tally:
    """Operations of one kind over several windows, and what they cost."""
    done: int = 0
    spent: Window = field(default_factory=Window)
    rates: list[float] = field(default_factory=list)  # each window's operations per second
    handed: int = 0  # SMTP: messages handed to their owner over LMTP

    def add(self, done: int, spent: Window, rate: float) -> None:
        self.done += done
        self.spent += spent
        self.rates.append(rate)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_ms(self) -> float:
        """Postroom's CPU ms per operation."""
        return self.spent.postroom / self.done * 1000


@dataclass
class Figures:
    """One node count's results. Kinds: "round-robin" (over the nodes), "owner" (each
    operation at its user's owner), "other" (at a node that does not own the user)."""
    nodes: int
    balance: str = ""
    smtp: dict[str, Tally] = field(default_factory=dict)
    logins: dict[str, Tally] = field(default_factory=dict)
    commands: dict[str, Tally] = field(default_factory=dict)
    idle: Window = field(default_factory=Window)
    moved: list[str] = field(default_factory=list)
    password_check: float = 0.0  # CPU ms of one argon2id check in this process: the CPU's speed now

    def tally(self, table: dict[str, Tally], kind: str) -> Tally:
        return table.setdefault(kind, Tally())

    @property
    def total(self) -> Window:
        """Every measured window's."""
        total = Window()
        for table in (self.smtp, self.logins, self.commands):
            for tally in table.values():
                total += tally.spent
        return total


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


def placements(cluster: Cluster, owner_of: dict[int, str], users: list[str], shards: int
               ) -> dict[str, list[str]]:
    """kind -> the node for each of `users`: in turn over the nodes ("round-robin"), its
    owner, and (more than one node) the node after its owner ("other")."""
    names = cluster.names
    owner = [owner_of[shard_of(user, shards)] for user in users]
    kinds = {"round-robin": [names[i % len(names)] for i in range(len(users))], "owner": owner}
    if len(names) > 1:
        kinds["other"] = [names[(names.index(node) + 1) % len(names)] for node in owner]
    return kinds


def measured(at: dict[str, list[str]]) -> list[str]:
    """The kinds worth a load of their own: on one node, round-robin is every user's owner."""
    return list(at) if "other" in at else ["round-robin"]


def alternated(kinds: list[str], rounds: int) -> list[str]:
    """`rounds` turns of every kind, each round in another order: a machine whose load
    drifts (another test run) touches every kind alike."""
    return [kinds[(r + i) % len(kinds)] for r in range(rounds) for i in range(len(kinds))]


def smtp(cluster: Cluster, owner_of: dict[int, str], figures: Figures, args, users: list[str]) -> None:
    """After a warm-up (every process started, every mailbox made), --rounds loads of each
    kind in turn. Connection i writes to one user, users[i mod their number], at the node
    its kind says."""
    recipients = [users[i % len(users)] for i in range(args.concurrency)]
    at = placements(cluster, owner_of, recipients, args.shards)
    to = ",".join(recipients)

    def ports(kind: str) -> list[int]:
        return [cluster.port(node, "smtp.listen") for node in at[kind]]

    asyncio.run(load("127.0.0.1", ports("round-robin"), 10, 5, args.size, to))
    for kind in alternated(measured(at), args.rounds):
        handed, before = cluster.handed_over(), cluster.cpu()
        done = asyncio.run(load("127.0.0.1", ports(kind), args.concurrency, args.messages, args.size, to))
        time.sleep(SETTLE)
        spent = cluster.cpu().since(before)
        tally = figures.tally(figures.smtp, kind)
        tally.add(done.accepted, spent, done.rate)
        tally.handed += cluster.handed_over() - handed
        print(f"  SMTP {kind:11} {done.line()}; {spent.postroom / done.accepted * 1000:.2f} ms of Postroom CPU "
              f"each{spent.others_note()}", flush=True)


def imap(cluster: Cluster, owner_of: dict[int, str], figures: Figures, args, users: list[str]) -> None:
    """Logins, then the command mix, of ten users in ten shards (they have the SMTP load's
    mail), each kind in turn: --rounds parts of --logins logins, and two halves of
    --seconds of the mix."""
    imap_users = users[:IMAP_USERS]
    at = placements(cluster, owner_of, imap_users, args.shards)
    targets = {kind: [Server(f"127.0.0.1:{cluster.port(node, 'imap.listen_tls')}", user, PASSWORD, mode="tls",
                             cafile=None) for node, user in zip(nodes, imap_users, strict=True)]
               for kind, nodes in at.items()}
    part = max(1, args.logins // args.rounds)
    for kind in alternated(measured(at), args.rounds):
        before = cluster.cpu()
        rate = logins_per_second(targets[kind], part)
        spent = cluster.cpu().since(before)
        figures.tally(figures.logins, kind).add(part, spent, rate)
        proxied = sum(1 for node, owner in zip(at[kind], at["owner"], strict=True) if node != owner) / len(imap_users)
        print(f"  IMAP logins {kind:11} ({proxied:.0%} proxied): {part} in {spent.wall:.1f} s = {rate:.1f}/s, "
              f"{spent.postroom / part * 1000:.0f} ms of Postroom CPU each{spent.others_note()}", flush=True)
    chosen = [i % len(imap_users) for i in range(args.clients)]
    kinds = [kind for kind in at if kind != "round-robin"]
    sessions = {kind: open_sessions([(cluster.port(at[kind][i], "imap.listen"), imap_users[i], PASSWORD)
                                     for i in chosen]) for kind in kinds}
    try:
        for kind in alternated(kinds, 2):
            before = cluster.cpu()
            commands, elapsed = client_mix(sessions[kind], args.seconds / 2)
            spent = cluster.cpu().since(before)
            figures.tally(figures.commands, kind).add(commands, spent, commands / elapsed)
            print(f"  IMAP mix    {kind:11} {args.clients} clients: {commands} commands in {elapsed:.1f} s = "
                  f"{commands / elapsed:.0f}/s, {spent.postroom / commands * 1000:.2f} ms of Postroom CPU each"
                  f"{spent.others_note()}", flush=True)
    finally:
        for opened in sessions.values():
            for session, _ in opened:
                session.close()


def table(results: list[Figures], args) -> str:
    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(f) for f in results) + " |"

    def pct(part: float, whole: float) -> str:
        return f"{part / whole * 100:.1f}%" if whole else "-"

    def pair(tallies: dict[str, Tally], figure, fmt: str) -> str:
        """owner / other, or owner / - on one node."""
        other = format(figure(tallies["other"]), fmt) if "other" in tallies else "-"
        return f"{format(figure(tallies.get('owner') or tallies['round-robin']), fmt)} / {other}"

    def hop(tallies: dict[str, Tally], fmt: str) -> str:
        return format(tallies["other"].cpu_ms - tallies["owner"].cpu_ms, "+" + fmt) if "other" in tallies else "-"

    def cpu_ms(tally: Tally) -> float:
        return tally.cpu_ms

    def rate(tally: Tally) -> float:
        return tally.rate

    lines = [
        "| figure | " + " | ".join(f"{f.nodes} node{'s' if f.nodes > 1 else ''}" for f in results) + " |",
        "|---|" + "---|" * len(results),
        row("shards per node (balanced before each measurement)", lambda f: f.balance),
        row(f"SMTP C={args.concurrency}, {args.size} B, round-robin over the nodes: msgs/s (median of {args.rounds})",
            lambda f: f"{f.smtp['round-robin'].rate:.0f}"),
        row("SMTP round-robin: share handed off to the owner over LMTP",
            lambda f: pct(f.smtp["round-robin"].handed, f.smtp["round-robin"].done)),
        row("SMTP round-robin: CPU ms per message, all Postroom processes",
            lambda f: f"{f.smtp['round-robin'].cpu_ms:.2f}"),
        row("SMTP sent to the owner / to another node (all handed off): msgs/s", lambda f: pair(f.smtp, rate, ".0f")),
        row("SMTP to the owner / to another node: CPU ms per message", lambda f: pair(f.smtp, cpu_ms, ".2f")),
        row("LMTP hand-off: CPU ms per message, another node - owner", lambda f: hop(f.smtp, ".2f")),
        row("IMAP logins (TLS, 4 at a time, passwords hashed at the cheapest cost) round-robin: logins/s", lambda f: f"{f.logins['round-robin'].rate:.1f}"),
        row("IMAP logins round-robin: CPU ms per login, without the hash", lambda f: f"{f.logins['round-robin'].cpu_ms:.0f}"),
        row("IMAP logins at the owner / proxied: logins/s", lambda f: pair(f.logins, rate, ".1f")),
        row("IMAP logins at the owner / proxied: CPU ms per login", lambda f: pair(f.logins, cpu_ms, ".0f")),
        row("proxy hop: CPU ms per login, proxied - owner", lambda f: hop(f.logins, ".0f")),
        row("argon2id at the production cost: CPU ms of one check in the bench process (add one per login)",
            lambda f: f"{f.password_check:.0f}"),
        row(f"IMAP mix, {args.clients} clients at the owner / proxied: commands/s",
            lambda f: pair(f.commands, rate, ".0f")),
        row("IMAP mix at the owner / proxied: CPU ms per command", lambda f: pair(f.commands, cpu_ms, ".2f")),
        row("proxy hop: CPU ms per command, proxied - owner", lambda f: hop(f.commands, ".2f")),
        row("etcd CPU, % of a core idle / during the loads", lambda f: f"{pct(f.idle.etcd, f.idle.wall)} / "
            f"{pct(f.total.etcd, f.total.wall)}"),
        row("etcd's share of all server CPU during the loads",
            lambda f: pct(f.total.etcd, f.total.etcd + f.total.postroom)),
        row(f"Postroom CPU during the SMTP loads, % of the {CORES} cores",
            lambda f: pct(sum(t.spent.postroom for t in f.smtp.values()),
                          sum(t.spent.wall for t in f.smtp.values()) * CORES)),
        row(f"load generator CPU during the loads, % of the {CORES} cores",
            lambda f: pct(f.total.client, f.total.wall * CORES)),
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
    parser.add_argument("--rounds", type=int, help="rounds of the SMTP loads and the logins (3)")
    parser.add_argument("--logins", type=int, help="IMAP logins of each kind, over the rounds (60)")
    parser.add_argument("--clients", type=int, default=10, help="IMAP sessions of the command mix")
    parser.add_argument("--seconds", type=float, help="seconds of the command mix of each kind (15)")
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
