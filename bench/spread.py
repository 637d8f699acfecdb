"""One user against mail spread over sixteen shards (issue 17, item 3):

    .venv/bin/python bench/spread.py [-c 50] [-m 40] [-s 4096] [--rounds 3]

One throwaway `postroom serve` (bench/policy_chain.py's: `[smtp] workers = 2`, the chain
off, 16 shards) with alice and sixteen users, one in each shard,
driven by bench/smtp_in.py's client at concurrency C, M messages per connection, three
loads in turn, each round in a new order:
- one user: every message to alice (one shard: its committer batches them all);
- sixteen users: one recipient per message, connection i writing to user i mod 16 (every
  shard's committer gets a sixteenth of the load);
- sixteen recipients: every message to all sixteen users (each message touches sixteen
  shards); its rate is in messages, and each message is sixteen deliveries.
Before each load the server is left to finish what the one before deferred (the full-text
indexer's work, which runs once a shard is quiet): no load pays for another's. Each run also
prints the server's CPU (every process, ms a message) and its threads' context switches a
message: where a sixteen-shard load falls behind, these say why.
Prints each run and the medians; the target is that neither sixteen-shard load falls below
the one user's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from idle import cpu_seconds, tree  # noqa: E402
from policy_chain import start_server  # noqa: E402
from smtp_in import run  # noqa: E402

SHARDS = 16  # conf/schema.py's default, which start_server keeps
QUIET_CPU = 0.03  # of a core: the server is done with deferred work below this
QUIET_WINDOW = 0.5  # seconds
QUIET_WAIT = 120.0  # seconds at most


class Usage:
    """CPU seconds and context switches of a process tree, summed over its processes and their
    threads (those alive when read)."""

    def __init__(self, root: int):
        self.pids = tree(root)
        self.cpu = self.switches = 0.0
        for pid in self.pids:
            try:
                self.cpu += cpu_seconds(pid)
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/status") as f:
                        self.switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
            except (OSError, ValueError):
                continue  # gone meanwhile


def wait_until_quiet(root: int) -> float:
    """Seconds until the server's processes use less than QUIET_CPU of a core."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_WAIT:
        before = Usage(root).cpu
        time.sleep(QUIET_WINDOW)
        if Usage(root).cpu - before < QUIET_CPU * QUIET_WINDOW:
            break
    return time.monotonic() - started


def shard_of(account: str, shards: int = SHARDS) -> int:
    """storage/store.py's Store.shard_number."""
    return int.from_bytes(hashlib.blake2b(account.encode(), digest_size=8).digest(), "big") % shards


def users_in_every_shard(shards: int, each: int = 1) -> list[str]:
    """`each` users `userN@example.test` of every one of `shards` shards: the first user of
    each shard in shard order, then the second of each, and so on."""
    found: dict[int, list[str]] = {shard: [] for shard in range(shards)}
    n = 0
    while any(len(users) < each for users in found.values()):
        account = f"user{n}@example.test"
        if len(found[shard_of(account, shards)]) < each:
            found[shard_of(account, shards)].append(account)
        n += 1
    return [found[shard][i] for i in range(each) for shard in range(shards)]


def sixteen_users() -> list[str]:
    """The first `userN` of each shard: one user per shard."""
    return sorted(users_in_every_shard(SHARDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("-m", "--messages", type=int, default=40, help="messages per connection")
    parser.add_argument("-s", "--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    users = sixteen_users()
    work = Path(tempfile.mkdtemp(prefix="spread-"))
    loads = {"one user": ("alice@example.test", False), "sixteen users": (",".join(users), False),
             "sixteen recipients": (",".join(users), True)}
    rates: dict[str, list[float]] = {name: [] for name in loads}
    process = None
    try:
        (work / "server").mkdir()
        process, port = start_server(work / "server", 2, None, tuple(users))
        for to, together in loads.values():  # warm-up: processes, caches, every account's mailboxes
            asyncio.run(run("127.0.0.1", port, 10, 5, args.size, to, together=together))
        names = list(loads)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                to, together = loads[name]
                settled = wait_until_quiet(process.pid)
                print(f"{name:18} (after {settled:.1f} s settling)", end=" ", flush=True)
                before = Usage(process.pid)
                rates[name].append(asyncio.run(run("127.0.0.1", port, args.concurrency, args.messages, args.size,
                                                   to, together=together)))
                after, sent = Usage(process.pid), args.concurrency * args.messages
                print(f"  server: {(after.cpu - before.cpu) * 1000 / sent:.2f} ms CPU, "
                      f"{(after.switches - before.switches) / sent:.0f} context switches a message", flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(rates["one user"])
    print(f"\nC={args.concurrency}, {args.messages} messages per connection, {args.size} B, `workers = 2`, "
          f"median of {args.rounds}:")
    for name, values in rates.items():
        median = statistics.median(values)
        deliveries = f" ({median * 16:.0f} deliveries/s)" if loads[name][1] else ""
        print(f"  {name:18} {median:6.0f} msgs/s{deliveries}   {median / one:.2f}x one user's")


if __name__ == "__main__":
    main()
