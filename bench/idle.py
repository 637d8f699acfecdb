"""What each daemon costs when no mail comes: CPU over a quiet window, beside Postfix.

    .venv/bin/python bench/idle.py [--settle 12] [--window 20]

Starts `postroom serve` (every daemon, the default shards, `[smtp] workers = 2`, the policy
chain off: bench/policy_chain.py's) and a private
Postfix (bench/compare_postfix.py's), waits `--settle` seconds (past the outbound runner's
IDLE_AFTER: mtad/outbound/runner.py), then reads each process's user + system CPU from /proc
at the start and the end of `--window` seconds and prints it as a share of one core. A
server that wakes up many times a second for nothing keeps a laptop's CPU out of its deep
sleep states and shows in `top` on a quiet box.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_postfix import PostfixMX, PostroomMX  # noqa: E402
from postfix_peer import postfix_available  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat(int(entry))[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


def name(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:90]


def measure(label: str, root: int, window: float) -> None:
    pids = tree(root)
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(window)
    total = 0.0
    for pid in pids:
        try:
            used = cpu_seconds(pid) - before[pid]
        except OSError:
            continue  # ended meanwhile
        total += used
        print(f"  {label} {pid:>7} {100 * used / window:6.2f}% of a core  {name(pid)}")
    print(f"{label}: {100 * total / window:.2f}% of a core over {window:.0f} s idle, {len(pids)} processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle", type=float, default=12.0)
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="idle-"))
    servers = []
    try:
        postroom = PostroomMX(work / "postroom", 2, None)
        servers.append(postroom)
        postfix = None
        if postfix_available():
            postfix = PostfixMX(work)
            servers.append(postfix)
        time.sleep(args.settle)
        measure("postroom", postroom.process.pid, args.window)
        if postfix is not None:
            master = postfix.etc.parent / "queue" / "pid" / "master.pid"
            measure("postfix", int(master.read_text().split()[0]), args.window)
        else:
            print("postfix: not installed (make bench-peers)")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
