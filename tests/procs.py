"""What the tests know of running processes, read from /proc (Linux): no dependency, so
that bench/ can use it too."""

from __future__ import annotations

import os
from typing import NamedTuple

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Process(NamedTuple):
    parent: int
    group: int  # process group
    state: str  # "R", "S", "Z"...
    name: str  # what ps -o comm shows (a daemon sets its own: mtad, imapd, pop3d)
    cmdline: bytes  # NUL-separated arguments
    cpu_ticks: int  # user and system time, its own and its reaped children's (proc(5))


def processes() -> dict[int, Process]:
    """Every process by pid (those that end while being read are left out)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        name, fields = stat.split("(", 1)[1].rsplit(")", 1)[0], stat.rsplit(")", 1)[1].split()
        found[int(entry)] = Process(int(fields[1]), int(fields[2]), fields[0], name, cmdline,
                                    sum(int(v) for v in fields[11:15]))  # utime, stime, cutime, cstime
    return found


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time `pid` has used so far (all its threads, not its
    children); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: proc(5)


def tree_cpu_seconds(root: int) -> float:
    """The CPU time (user and system) used so far by `root` and every process under it,
    those that have ended included: each process's own times plus those of the children it
    reaped (proc(5): cutime, cstime), which hold their reaped children's in turn. What
    escapes: a process whose parent ended before it (reparented away from the tree)."""
    table = processes()
    children: dict[int, list[int]] = {}
    for pid, process in table.items():
        children.setdefault(process.parent, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += table[pid].cpu_ticks if pid in table else 0
        todo.extend(children.get(pid, ()))
    return total / CLOCK_TICKS
