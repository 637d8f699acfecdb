"""A shard's volume attached before its node takes it and detached after it let it go,
by the commands of [cluster] attach and detach ({shard}: its number, {path}: its
directory). Empty commands do nothing: every node sees the shards' directories (tests, a
single machine).

Why not NFS (or any network file system): LMDB refuses them. Its lock file and its
memory map need memory that every process writing the environment sees coherently, which
only a local file system gives; over NFS two nodes could both believe they hold the
writer lock and corrupt the index. A volume is a block device only one node has attached
at a time (a Ceph RBD image with its exclusive lock, a cloud block volume), with a local
file system on it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

TIMEOUT = 120.0  # seconds an attach or detach may take (a cloud API call, a file system check)


class VolumeError(Exception):
    """The command failed; str() is one line."""


def run(template: str, shard: int, path: Path, timeout: float = TIMEOUT) -> None:
    if not template:
        return
    argv = [part.format(shard=shard, path=path) for part in shlex.split(template)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VolumeError(f"{argv[0]}: {e}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [""])[-1]
        raise VolumeError(f"{argv[0]} exited with status {result.returncode}: {last}")
