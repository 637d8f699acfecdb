"""A `[cluster] detach` command for the tests: instead of detaching anything, it records
what every process of the machine holds open under the shard's directory at the moment the
agent detaches it (tests/test_cluster_release.py). A real `umount` or `rbd unmap` fails on
any of it, or yanks the volume from under it.

    detach_probe.py SHARD PATH RECORD [HOLD]

appends one JSON line to RECORD, {"shard": N, "open": ["pid 123 (imapd) fd 7: ...", ...],
"started": T, "ended": T}, from /proc/<pid>/fd (descriptors) and /proc/<pid>/maps
(mappings: LMDB's), and exits 0. With HOLD, it takes that many seconds first, as a real
detach does (an RBD unmap, a cloud API call); the times are time.time()'s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def open_under(pid: int, root: Path) -> list[str]:
    """What process `pid` holds open under `root`: descriptors, and mappings (LMDB's); an
    empty list for a process gone meanwhile or not ours to look at."""
    prefix = str(root) + "/"
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue  # closed meanwhile
            if target.startswith(prefix) or target == str(root):
                found.append(f"fd {fd}: {target}")
        with open(f"/proc/{pid}/maps") as maps:
            found += sorted({f"map: {line.split(None, 5)[-1].strip()}" for line in maps if prefix in line})
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return found


def open_anywhere(root: Path) -> list[str]:
    """What every other process of the machine holds open under `root`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        held = open_under(int(entry), root)
        if held:
            try:
                name = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                name = "?"
            found += [f"pid {entry} ({name}) {what}" for what in held]
    return found


def main(argv: list[str]) -> int:
    shard, path, record = int(argv[1]), Path(argv[2]), Path(argv[3])
    started = time.time()
    found = open_anywhere(path)
    if len(argv) > 4:
        time.sleep(float(argv[4]))
    line = json.dumps({"shard": shard, "open": found, "started": started, "ended": time.time()})
    with open(record, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
