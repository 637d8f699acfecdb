"""The data dir as the commands open it: accounts, store, the outbound queues, and the lock
that keeps a second instance of a daemon off it.

Each long-running process takes `<data dir>/<name>.lock` with `flock(LOCK_EX | LOCK_NB)`:
`postroom serve` takes serve.lock, and the mtad, imapd and pop3d processes (under serve or
alone under systemd) take mtad.lock, imapd.lock and pop3d.lock. The lock is held on an open
descriptor for the life of the process, so the kernel drops it however the process ends
(SIGKILL included): no stale lock is ever guessed at. Without it a second mtad on the same
data dir would share port 25 with the first (SO_REUSEPORT) and nobody would notice. The
file holds the holder's pid, for the refusal's one line. It is never removed (removing a
locked file would let a second process lock a new one beside it).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import argon2

from conf import Config
from conf.schema import AccountsConfig
from postroom.services import DAEMONS
import storage
from storage import Accounts, DataDir, open_data_dir

if TYPE_CHECKING:
    from storage import QueueSet, Store


class DataDirInUseError(Exception):
    """Another process holds the lock; str() is one line for the sysadmin."""


def password_hasher(accounts: AccountsConfig) -> argon2.PasswordHasher:
    """argon2id at the configured cost ([accounts] password_*), for new hashes; a check
    uses the cost written in the stored hash."""
    return argon2.PasswordHasher(time_cost=accounts.password_passes, memory_cost=accounts.password_memory // 1024,
                                 parallelism=accounts.password_lanes, type=argon2.Type.ID)


def open_accounts(config: Config) -> tuple[DataDir, Accounts]:
    data_dir = open_data_dir(config.server.data_dir, config.storage.shards)
    accounts = Accounts(data_dir.accounts_path, recipient_delimiter=config.accounts.recipient_delimiter,
                        hasher=password_hasher(config.accounts))
    return data_dir, accounts


def open_store(data_dir: DataDir, accounts: Accounts | None, config: Config | None = None, *,
               reads_wait: bool = True) -> Store:
    """The store (without `accounts`, no quotas: a reader's); in a cluster, fenced (every
    commit checked against this node's claims), pinned (each shard it opens keeps its
    volume attached until closed: cluster/pins.py), and opening only the shards this node
    holds: another's volume is not attached here, and opening its empty mount point would
    make an index there (a daemon's closes those it releases, cluster/follow.py; the CLI's
    commands see the node's own shards, `store.shards()`)."""
    def quota_of(account: str) -> storage.Quota:
        user = accounts.get_user(account)
        return storage.Quota(user.quota, user.message_quota) if user else storage.NO_QUOTA

    quotas = quota_of if accounts is not None else None
    if config is None:
        return storage.Store(data_dir, quota_of=quotas, reads_wait=reads_wait)
    fence = held = pin = None
    if config.cluster.enabled:  # every commit checked against this node's claims (cluster/)
        from cluster.local import open_node_table

        table = open_node_table(config, data_dir)
        fence = table.holds
        pin = shard_pins(config, data_dir)

        def held(number: int) -> bool:  # as cluster/follow.py's Follower.held
            return table.claim(number) is not None and table.lease_left() > 0
    return storage.Store(data_dir, quota_of=quotas, dedupe_window=float(config.storage.dedupe_window), fence=fence,
                         held=held, pin=pin, reads_wait=reads_wait)


def shard_pins(config: Config, data_dir: DataDir) -> Callable[[int], Callable[[], None]]:
    """A cluster node's pin of a shard for this process (cluster/pins.py): pin(shard) ->
    its release. The agent detaches a shard's volume once every pin of it is let go."""
    from cluster.local import node_name
    from cluster.pins import process_pins

    return process_pins(data_dir.cluster_pins_path(node_name(config))).pin


def open_queues(config: Config, data_dir: DataDir, store: Store | None = None, *, on_disk: bool = False) -> QueueSet:
    """The outbound queues (storage/queues.py): a single node's one queue; in a cluster, the
    queues of the shards this node holds (the runner and the enqueues), or with `on_disk`
    every shard queue on disk (the CLI). Writes to a cluster's shard queue pass the check
    its store's commits pass (open_store): the node table's claim against the revision
    recorded in the shard (Store.fence_revision), so `store` must be the fenced store of
    open_store; without one (status, metrics, backup: readers) nothing is written."""
    if not config.cluster.enabled:
        return storage.QueueSet(data_dir)
    from cluster.local import open_node_table

    table = open_node_table(config, data_dir)
    runner_lock = data_dir.path / f"{lock_name(config, 'runner')}.lock"
    pin = shard_pins(config, data_dir)
    if store is None:
        return storage.QueueSet(data_dir, shards=lambda: storage.queues_on_disk(data_dir),
                                fence=lambda number: False, runner_lock=runner_lock, pin=pin)

    def fence(number: int) -> bool:
        try:
            return table.holds(number, store.fence_revision(number))
        except storage.NotOwnerError:
            return False  # the shard is closed here: this node released it (cluster/follow.py)

    def shards():
        return storage.queues_on_disk(data_dir) if on_disk else table.claims().keys()

    return storage.QueueSet(data_dir, shards=shards, fence=fence, shard_of=store.shard_number,
                            runner_lock=runner_lock, pin=pin)


def lock_name(config: Config, name: str) -> str:
    """The data dir lock `name` of this process: in a cluster, of this node's, so that the
    nodes of a test machine can share one data dir as they share the shards' volumes."""
    if config.cluster.enabled:
        return f"{name}.{config.cluster.node or config.server.hostname}"
    return name


def lock(data_dir: Path, name: str, holder: str, *, wait: float = 0.0, log=None) -> int:
    """Hold `<data_dir>/<name>.lock` for the life of the process (the descriptor is returned
    and must stay open), or DataDirInUseError naming the process (`holder`) that has it.
    With `wait`, a held lock is tried again for that many seconds first: a daemon that serve
    starts after a `kill -9` of the previous serve finds the old daemon still finishing its
    sessions (it was told to stop when its supervisor died), and takes over once it is gone."""
    path = data_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = _holder_pid(fd)
                if time.monotonic() >= deadline:
                    raise DataDirInUseError(f"data dir {data_dir} is in use by another {holder} "
                                            f"(pid {pid or 'unknown'})") from None
                if log is not None:
                    left = round(deadline - time.monotonic())
                    log.warning("lock_wait", lock=name, holder_pid=pid or "unknown", seconds=left)
                    log = None  # once
                time.sleep(0.1)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder_pid(fd: int) -> int | None:
    # The holder writes its pid right after locking: a refusal in between reads an empty file.
    for _ in range(20):
        text = os.pread(fd, 32, 0).strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def become_data_dir_owner(data_dir: Path) -> None:
    """Run as root, work as the user who owns the data dir (the `postroom` user of the
    systemd unit): whatever root would create there, the daemon could not open later."""
    if os.geteuid() != 0:
        return
    try:
        owner = data_dir.stat()
    except FileNotFoundError:
        return
    if owner.st_uid == 0:
        return
    try:
        name = pwd.getpwuid(owner.st_uid).pw_name
        os.initgroups(name, owner.st_gid)
    except KeyError:
        os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


# -- who holds the locks: `postroom status` and `postroom reload` ---------------------------

PROCESSES = ("serve", *DAEMONS)  # the lock names, serve first


@dataclass(frozen=True)
class Running:
    name: str
    pid: int
    started: float  # epoch seconds


def running_processes(data_dir: Path, config: Config | None = None) -> dict[str, Running]:
    """The Postroom processes that hold their lock in `data_dir`, by name (in a cluster,
    those of `config`'s node)."""
    held = storage.held_flocks()
    found = {}
    for name in PROCESSES:
        path = data_dir / f"{lock_name(config, name) if config is not None else name}.lock"
        try:
            st = path.stat()
            text = path.read_text().strip()
        except (FileNotFoundError, PermissionError):
            continue
        pid = int(text) if text.isdigit() else None
        if held is not None:
            holders = held.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
            if not holders:
                continue
            pid = pid if pid in holders else min(holders)
        if pid is None or not Path(f"/proc/{pid}").exists():
            continue
        started = _start_time(pid)
        found[name] = Running(name, pid, started if started is not None else time.time())
    return found


def _start_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5): starttime
    return int(boot.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
